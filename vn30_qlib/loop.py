"""The symbol loop: every (symbol, model) trained per symbol, plus one pooled model per workflow, resumably.

It reads the same ``qrun`` workflow YAMLs (no second configuration system). Per-symbol mode restricts the
handler to one instrument and replaces the per-day (cross-sectional) label z-score, meaningless on one
instrument, by Qlib's time-series ``ZScoreNorm`` fitted on the train segment. Pooled mode fits the workflow
as is and evaluates it per symbol. Each fit is one Qlib recorder run (experiment ``vn30_loop``) tagged with
symbol, model, mode and config hash, and one version in the model store (`vn30_qlib.store`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import platform
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib.metadata import version as package_version
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Sequence

import pandas as pd

from vn30_qlib import store
from vn30_qlib.data.provider import read_instruments
from vn30_qlib.metrics import cross_sectional_metrics, time_series_metrics
from vn30_qlib.workflow_config import load_workflow

EXPERIMENT = "vn30_loop"
CROSS_SECTIONAL_LABEL_PROCESSORS = {"CSZScoreNorm", "CSRankNorm", "CrossSectionalZScore"}
PACKAGES = ("pyqlib", "torch", "lightgbm", "pandas", "numpy", "mlflow", "vn30-qlib")


@dataclass(frozen=True)
class LoopEntry:
    """One fit: a workflow in a mode; ``symbol`` is None for the pooled fit."""

    workflow: str
    mode: str
    symbol: str | None

    @property
    def model(self) -> str:
        return Path(self.workflow).stem.removesuffix("_vn30")

    def label(self) -> str:
        return f"{self.model}/{self.mode}/{self.symbol or 'all'}"


def init_qlib_for(provider: str | Path, mlflow_uri: str | None = None) -> None:
    """Qlib on ``provider``; with ``mlflow_uri`` the recorder writes there (an sqlite store)."""
    import qlib

    kwargs = {}
    if mlflow_uri:
        kwargs["exp_manager"] = {"class": "MLflowExpManager", "module_path": "qlib.workflow.expm",
                                 "kwargs": {"uri": mlflow_uri, "default_exp_name": EXPERIMENT}}
    qlib.init(provider_uri=str(Path(provider).expanduser()), region="cn", kernels=1, **kwargs)


def provider_fingerprint(provider: str | Path) -> dict:
    """sha256 over the provider's calendar, instrument lists and feature files, plus its span."""
    root = Path(provider).expanduser().resolve()
    digest = hashlib.sha256()
    for path in sorted(p for sub in ("calendars", "instruments", "features") for p in (root / sub).rglob("*")
                       if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    days = (root / "calendars" / "day.txt").read_text().split()
    return {"path": str(root), "sha256": digest.hexdigest(), "first_day": days[0], "last_day": days[-1]}


def adapt_task(task: dict, mode: str, symbol: str | None) -> dict:
    """The workflow's task for one loop entry (see the module docstring for what per-symbol mode changes)."""
    task = copy.deepcopy(task)
    if mode == "pooled":
        return task
    if mode != "per_symbol":
        raise ValueError(f"unknown mode {mode!r}: use 'per_symbol' or 'pooled'")
    handler = task["dataset"]["kwargs"]["handler"]["kwargs"]
    handler["instruments"] = [symbol]
    learn = handler.get("learn_processors") or _default_learn_processors(task)
    handler["learn_processors"] = [
        {"class": "ZScoreNorm", "kwargs": {"fields_group": "label"}}
        if p.get("class") in CROSS_SECTIONAL_LABEL_PROCESSORS else p for p in learn
    ]
    return task


def _default_learn_processors(task: dict) -> list[dict]:
    from qlib.utils import get_callable_kwargs
    import inspect

    handler_class, _ = get_callable_kwargs(task["dataset"]["kwargs"]["handler"])
    default = inspect.signature(handler_class.__init__).parameters["learn_processors"].default
    return copy.deepcopy(list(default))


def config_hash(task: dict) -> str:
    return hashlib.sha256(json.dumps(task, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _failure_path(store_root: Path, entry: LoopEntry) -> Path:
    return store_root / "failures" / f"{entry.model}__{entry.mode}__{entry.symbol or 'all'}.json"


def fit_entry(entry: LoopEntry, provider: str, store_root: str, force: bool = False) -> dict:
    """Fit, evaluate and store one entry; never raises: a failure comes back (and is saved) with its error."""
    store_root = Path(store_root)
    started = time.perf_counter()
    try:
        config = load_workflow(entry.workflow, {"VN30_PROVIDER": provider})
        task = adapt_task(config["task"], entry.mode, entry.symbol)
        task_hash = config_hash(task)
        fingerprint = provider_fingerprint(provider)
        target = store.entry_dir(store_root, entry.model, entry.symbol)
        current = store.latest(target)
        if current and not force:
            meta = store.read_metadata(current)
            if meta["config_hash"] == task_hash and meta["provider"]["sha256"] == fingerprint["sha256"]:
                return {**asdict(entry), "status": "skipped", "version": str(current)}
        version = _fit_and_store(entry, task, task_hash, fingerprint, provider, store_root, target)
        _failure_path(store_root, entry).unlink(missing_ok=True)
        return {**asdict(entry), "status": "done", "version": str(version),
                "seconds": time.perf_counter() - started}
    except Exception as error:  # one failing entry must not stop the loop
        failure = {**asdict(entry), "status": "failed", "error": f"{type(error).__name__}: {error}",
                   "traceback": traceback.format_exc(), "seconds": time.perf_counter() - started}
        path = _failure_path(store_root, entry)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(failure, indent=2))
        return failure


def _fit_and_store(entry: LoopEntry, task: dict, task_hash: str, fingerprint: dict, provider: str,
                   store_root: Path, target: Path) -> Path:
    from qlib.data.dataset.handler import DataHandlerLP
    from qlib.utils import init_instance_by_config
    from qlib.workflow import R

    init_qlib_for(provider, _tracking_uri(store_root))
    timings = {}
    with R.start(experiment_name=EXPERIMENT, recorder_name=entry.label()):
        R.set_tags(symbol=entry.symbol or "all", model=entry.model, mode=entry.mode, config_hash=task_hash)
        clock = time.perf_counter()
        dataset = init_instance_by_config(task["dataset"])
        model = init_instance_by_config(task["model"])
        timings["data_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        model.fit(dataset)
        timings["fit_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        pred = model.predict(dataset, segment="test")
        timings["predict_s"] = time.perf_counter() - clock
        label = dataset.prepare("test", col_set="label", data_key=DataHandlerLP.DK_R).iloc[:, 0]
        metrics = evaluate(pred, label, entry.mode)
        R.save_objects(**{"pred.pkl": pred, "label.pkl": label})
        R.log_metrics(**_flat_numbers(metrics))
        run_id = R.get_recorder().id
    segments = task["dataset"]["kwargs"]["segments"]
    metadata = {
        "entry": asdict(entry), "model": entry.model, "mode": entry.mode, "symbol": entry.symbol,
        "provider": fingerprint, "config_hash": task_hash,
        "data_span": {name: [str(d) for d in span] for name, span in segments.items()},
        "seed": task["model"].get("kwargs", {}).get("seed"),
        "packages": {name: package_version(name) for name in PACKAGES} | {"python": platform.python_version()},
        "metrics": metrics, "timings": timings, "mlflow_run_id": run_id,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return store.save_version(target, model, task, pred, metadata)


def evaluate(pred: pd.Series, label: pd.Series, mode: str) -> dict:
    """Per-symbol time-series metrics; a pooled model also gets the daily cross-sectional ones."""
    per_symbol = {
        symbol: time_series_metrics(pred.xs(symbol, level="instrument"), group.droplevel("instrument"))
        for symbol, group in label.groupby(level="instrument")
    }
    metrics = {"per_symbol": per_symbol}
    if mode == "pooled":
        metrics["cross_sectional"] = cross_sectional_metrics(pred, label)
    return metrics


def _flat_numbers(metrics: dict) -> dict:
    flat = {}
    for symbol, values in metrics["per_symbol"].items():
        flat.update({f"{symbol}.{k}": float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    flat.update({k: float(v) for k, v in metrics.get("cross_sectional", {}).items() if v is not None})
    return flat


def _tracking_uri(store_root: Path) -> str:
    return f"sqlite:///{store_root.resolve() / 'mlruns.db'}"


def _create_tracking_store(store_root: Path) -> None:
    """Create the sqlite store and the experiment once, before workers start (parallel schema setup races)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=_tracking_uri(store_root))
    if client.get_experiment_by_name(EXPERIMENT) is None:
        client.create_experiment(EXPERIMENT)


def plan(workflows: Sequence[str | Path], provider: str | Path, symbols: Iterable[str] | None = None,
         modes: Sequence[str] = ("per_symbol", "pooled")) -> list[LoopEntry]:
    """Every entry of a loop: per workflow, one per symbol (per-symbol mode) and one pooled fit."""
    symbols = list(symbols) if symbols else read_instruments(provider, "vn30")["symbol"].tolist()
    entries = []
    for workflow in workflows:
        workflow = str(Path(workflow).resolve())
        if "per_symbol" in modes:
            entries += [LoopEntry(workflow, "per_symbol", symbol) for symbol in symbols]
        if "pooled" in modes:
            entries.append(LoopEntry(workflow, "pooled", None))
    return entries


def run_loop(workflows: Sequence[str | Path], provider: str | Path, store_root: str | Path = "models",
             symbols: Iterable[str] | None = None, modes: Sequence[str] = ("per_symbol", "pooled"),
             jobs: int = 1, force: bool = False, progress: bool = True) -> list[dict]:
    """Run (or resume) the loop in ``jobs`` worker processes; returns one result per entry."""
    from tqdm import tqdm

    provider = str(Path(provider).expanduser().resolve())
    entries = plan(workflows, provider, symbols, modes)
    Path(store_root).mkdir(parents=True, exist_ok=True)
    _create_tracking_store(Path(store_root))
    results = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(fit_entry, e, provider, str(store_root), force): e for e in entries}
        with tqdm(total=len(futures), desc="vn30 loop", unit="fit", disable=not progress) as bar:
            for future in as_completed(futures):
                result = future.result()
                results.append(result)
                bar.set_postfix_str(f"{futures[future].label()} {result['status']}")
                bar.update()
    order = {e: i for i, e in enumerate(entries)}
    return sorted(results, key=lambda r: order[LoopEntry(r["workflow"], r["mode"], r["symbol"])])
