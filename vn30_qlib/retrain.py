"""Scheduled retraining: ``vn30-qlib retrain [--store models] [--provider P] [--step 20] [--models lgb,lstm]
[--date D] [--train-window expanding|sliding]``, run after ``data update``, before ``predict``.

For each pooled store entry (or those named) the latest version's stored task is the model's window. The data
of a retrain for trading day D (default: the HOSE trading day after the provider's last day) ends at day t, the
provider's last trading day before D (`vn30_qlib.predict.signal_days`, the close the signal reads); the last
labelled day is ``t`` minus the label's reach (2 trading days: its label reads the closes of t-1 and t). The
window rolls as Qlib's `RollingGen` rolls it: every segment moves forward by whole ``step``-day steps on the
provider's trading calendar (train's start stays with ``expanding``, moves with ``sliding``; valid and test keep
their lengths), so the purge gaps between train/valid and valid/test stay as stored (2 trading days in the
workflows). A retrain is **due** when the provider labels at least ``step`` trading days from the stored test
segment's first day on, i.e. when the next window's first test day is labelled (its fit is evaluated there):
with the workflows' purge that is ``step + 3`` labelled days past the stored valid end. The window moves by as
many whole steps as the labelled days allow, so run every day, the new valid segment ends (purged) three trading
days before the provider's last labelled day, which opens the new test segment; the test end is cut at the last
labelled day. The handler's data ends at t and its processors are fitted on the new train segment.

A due entry is fitted through the loop's own fit (`vn30_qlib.loop._fit_and_store`: the same recorder run,
metrics, metadata with provider fingerprint and data span, the entry's lock, ``latest`` moved last); an entry
not due is reported and nothing is written. A second run on the same provider and day finds every window
current and trains nothing. `vn30_qlib.predict` then loads the new version as the entry's latest, and its
in-sample check passes from the day after the new valid end.

From Qlib's online serving only `RollingGen`'s segment arithmetic (``gen_following_tasks``, the call
`RollingStrategy.prepare_tasks` makes) is used. `OnlineManager` and `RollingStrategy` keep their models as
recorder pickles (``params.pkl``, ``task`` objects) and load them with ``pickle``; this store holds models as
files that cannot run code and must never unpickle, and it already keeps versions and ``latest`` atomically.
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pandas and Qlib are imported where used: `vn30-qlib --help` stays fast
    import pandas as pd

TRAIN_WINDOWS = ("expanding", "sliding")


class RetrainError(ValueError):
    """A retrain asked for a model the store lacks, an impossible step or window (the CLI exits 2); nothing has
    been written."""


@dataclass(frozen=True)
class RetrainDecision:
    """One pooled entry's latest version and whether its next window is due (``task`` is that window's)."""

    name: str
    version: Path
    reason: str
    task: dict | None = None

    @property
    def due(self) -> bool:
        return self.task is not None


def plan_retrain(store_root: str | Path, provider: str | Path, step: int, models: Sequence[str] | None = None,
                 date: str | None = None, train_window: str = "expanding"
                 ) -> tuple[pd.Timestamp, list[RetrainDecision]]:
    """(t, the decision per entry): t is the last close the data reads (see the module docstring). Qlib is
    initialised on ``provider``; nothing is written."""
    import pandas as pd

    from vn30_qlib import store
    from vn30_qlib.loop import init_qlib_for
    from vn30_qlib.predict import signal_days

    if step < 1:
        raise RetrainError(f"step must be 1 or more trading days, got {step}")
    if train_window not in TRAIN_WINDOWS:
        raise RetrainError(f"train window {train_window!r}: use one of {', '.join(TRAIN_WINDOWS)}")
    provider = Path(provider).expanduser().resolve()
    if not (provider / "calendars" / "day.txt").is_file():
        raise RetrainError(f"{provider}: not a Qlib provider (calendars/day.txt missing); pass --provider")
    root = Path(store_root).expanduser()
    names = store.named_pooled_entries(root, models)
    _, signal_day = signal_days(provider, date)
    init_qlib_for(provider)
    from qlib.data import D

    from vn30_qlib.cv import label_horizon

    calendar = pd.DatetimeIndex(D.calendar(freq="day"))
    decisions = []
    for name in names:
        version = store.latest(root / "pooled" / name)
        store.read_metadata(version)  # a damaged version is refused before anything is fitted from it
        task = store.read_task(version)
        store.require_trusted_classes([task["model"], task["dataset"]], version / "config.yaml")
        if task["model"].get("class") == "ModelEnsemble":  # its members' handlers keep their own fit window
            raise RetrainError(f"{version}: retrain does not move a ModelEnsemble's member handlers yet; refit it "
                               f"with vn30-qlib rolling --workflow workflows/ensemble_vn30.yaml, or leave it out "
                               f"with --models")
        last_labelled = calendar[calendar.get_loc(signal_day) - label_horizon(task)]
        decisions.append(_decide(name, version, task, calendar, step, last_labelled, signal_day, train_window))
    return signal_day, decisions


def _decide(name: str, version: Path, task: dict, calendar: pd.DatetimeIndex, step: int,
            last_labelled: pd.Timestamp, signal_day: pd.Timestamp, train_window: str) -> RetrainDecision:
    import pandas as pd

    segments = task["dataset"]["kwargs"]["segments"]
    test_start = calendar[min(calendar.searchsorted(pd.Timestamp(segments["test"][0])), len(calendar) - 1)]
    labelled = int(calendar.get_loc(last_labelled)) - int(calendar.get_loc(test_start))
    where = (f"{name} {version.name}: valid ends {pd.Timestamp(segments['valid'][1]):%Y-%m-%d}, test starts "
             f"{test_start:%Y-%m-%d}; the provider labels up to {last_labelled:%Y-%m-%d}")
    if labelled < step:
        return RetrainDecision(name, version, f"{where}, {max(labelled, 0)} of the {step} trading days after the "
                                              "test start: not due")
    shifted = next_window(task, step, last_labelled, signal_day, train_window)
    new = shifted["dataset"]["kwargs"]["segments"]
    return RetrainDecision(name, version, f"{where}, {labelled} trading days after the test start: due, "
                                          f"{labelled // step} step(s) of {step}, train {new['train'][0]}.."
                                          f"{new['train'][1]}, valid {new['valid'][0]}..{new['valid'][1]}, test from "
                                          f"{new['test'][0]}", shifted)


def next_window(task: dict, step: int, last_labelled: pd.Timestamp, signal_day: pd.Timestamp,
                train_window: str) -> dict:
    """``task`` rolled by `RollingGen` (Qlib initialised on the provider) to the last window whose test starts on
    or before ``last_labelled``; the test end cut there, the handler's data ending at ``signal_day`` and its
    processors fitted on the new train segment. Segments are stored as YYYY-MM-DD strings, as in a workflow."""
    import pandas as pd
    from qlib.workflow.task.gen import RollingGen

    rolling = RollingGen(step=step, rtype=RollingGen.ROLL_EX if train_window == "expanding" else RollingGen.ROLL_SD,
                         ds_extra_mod_func=None)
    base = copy.deepcopy(task)
    base["dataset"]["kwargs"]["segments"] = {name: tuple(pd.Timestamp(day) for day in span)
                                             for name, span in task["dataset"]["kwargs"]["segments"].items()}
    *_, shifted = rolling.gen_following_tasks(base, last_labelled)
    segments = shifted["dataset"]["kwargs"]["segments"]
    test_start, test_end = segments["test"]
    segments["test"] = (test_start, last_labelled if test_end is None else min(test_end, last_labelled))
    shifted["dataset"]["kwargs"]["segments"] = {name: [f"{day:%Y-%m-%d}" for day in span]
                                                for name, span in segments.items()}
    handler = shifted["dataset"]["kwargs"]["handler"]["kwargs"]
    handler["end_time"] = f"{signal_day:%Y-%m-%d}"
    handler["fit_start_time"], handler["fit_end_time"] = shifted["dataset"]["kwargs"]["segments"]["train"]
    return shifted


def retrain(store_root: str | Path, provider: str | Path, step: int, models: Sequence[str] | None = None,
            date: str | None = None, train_window: str = "expanding") -> list[dict]:
    """Fit and store the next window of every due entry (see the module docstring); one result per entry:
    name, the version it was read from, ``status`` (``retrained``, ``current`` or ``not due``), the new
    version and the reason."""
    import pandas as pd

    from vn30_qlib import store
    from vn30_qlib.loop import (LoopEntry, _fit_and_store, _require_writable, config_hash, create_tracking_store,
                                provider_fingerprint, sqlite_tracking_uri)
    from vn30_qlib.predict import fingerprint_until

    provider = Path(provider).expanduser().resolve()
    store_root = Path(store_root).expanduser().resolve()
    signal_day, decisions = plan_retrain(store_root, provider, step, models, date, train_window)
    results = [{"name": d.name, "from": str(d.version), "status": "not due", "reason": d.reason}
               for d in decisions]
    if not any(d.due for d in decisions):
        return results
    fingerprint = provider_fingerprint(provider)
    if pd.Timestamp(fingerprint["last_day"]) != signal_day:  # data read up to t: the provider as it was then
        fingerprint.update(sha256=fingerprint_until(provider, f"{signal_day:%Y-%m-%d}"),
                           last_day=f"{signal_day:%Y-%m-%d}")
    _require_writable(store_root)
    tracking_uri = sqlite_tracking_uri(store_root)
    create_tracking_store(tracking_uri)
    for decision, result in zip(decisions, results):
        if not decision.due:
            continue
        entry = LoopEntry(**store.read_metadata(decision.version)["entry"])
        if entry.mode != "pooled" or entry.stored_as != decision.name:
            raise RetrainError(f"{decision.version}: its metadata names entry {entry.label()}, not pooled "
                               f"{decision.name}; the version is damaged")
        version, stored = _fit_and_store(entry, decision.task, config_hash(decision.task), fingerprint,
                                         str(provider), decision.version.parent, tracking_uri, force=False)
        result.update(status="retrained" if stored else "current", version=str(version))
    return results


def format_retrain(results: Sequence[dict]) -> str:
    """One line per entry (status, window, new version) and the counts."""
    lines = [f"{r['status']:<9} {r['reason']}" + (f" -> {r['version']}" if "version" in r else "") for r in results]
    counts = {status: sum(r["status"] == status for r in results) for status in ("retrained", "current", "not due")}
    lines.append(f"retrain: {counts['retrained']} retrained, {counts['current']} already current, "
                 f"{counts['not due']} not due")
    return "\n".join(lines)


def add_retrain_command(commands) -> None:
    """Register ``retrain`` on the CLI's subcommands."""
    from vn30_qlib.cli import positive_int

    p = commands.add_parser("retrain", help="retrain the pooled models whose next rolling window is due on an "
                                            "updated provider; store them as new versions")
    p.add_argument("--store", default="models", help="model store folder (default: %(default)s)")
    p.add_argument("--provider", default="~/.qlib/qlib_data/vn30_sim",
                   help="Qlib provider folder, updated with vn30-qlib data update (default: %(default)s)")
    p.add_argument("--step", type=positive_int("trading days"), default=20,
                   help="trading days per rolling step: a model is retrained once STEP new days are labelled "
                        "after its test start (default: %(default)s)")
    p.add_argument("--models", help="pooled store entries, comma-separated, e.g. lgb,lstm (default: every one)")
    p.add_argument("--date", help="trading day the models will trade, YYYY-MM-DD; the data ends at the close before "
                                  "it (default: the HOSE trading day after the provider's last day)")
    p.add_argument("--train-window", default="expanding", choices=TRAIN_WINDOWS,
                   help="expanding: train keeps its start; sliding: train keeps its length (default: %(default)s)")
    p.set_defaults(handler=retrain_command)


def retrain_command(args: argparse.Namespace) -> int:
    models = [name.strip() for name in args.models.split(",") if name.strip()] if args.models else None
    try:
        results = retrain(args.store, args.provider, args.step, models, args.date, args.train_window)
    except RetrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_retrain(results))
    return 0
