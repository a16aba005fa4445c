"""The symbol loop: every (symbol, model) trained per symbol, plus one pooled model per workflow, resumably.

It reads the same ``qrun`` workflow YAMLs (no second configuration system). Per-symbol mode restricts the
handler to one instrument and replaces what is cross-sectional, meaningless on one instrument: the per-day
label z-score by Qlib's time-series ``ZScoreNorm`` fitted on the train segment, and a model's daily-IC early
stopping (``metric: ic``) or loss (``loss: ic``) by the valid loss and MSE, in the model's kwargs and in any
model config nested in them (a `SeedEnsemble`'s members), and merges the model's ``per_symbol_kwargs`` (the
parameters suited to one symbol's ~1.5k rows) into its kwargs. Pooled mode fits the workflow as is (without
``per_symbol_kwargs``) and evaluates it per symbol. With seeds, each (model, mode, symbol) is fitted once per
seed: the model's ``seed`` kwarg (an ensemble's ``seeds``: the seed-th block of as many members) and its own
store entry ``{model}.seed{seed}``; a `RollingRetrain`'s seed and per-symbol kwargs go to the model it refits. A
`SeedEnsemble` whose members are all stored already as fits of their own (`stored_member_fits`) is composed from
them (without ``force``), its metadata's ``members_from`` naming them. A `ModelEnsemble` (z-scores across the
day's names) is pooled only. Each fit is one Qlib recorder run (experiment ``vn30_loop``) tagged with symbol,
model, mode and config hash, and one version in the model store (`vn30_qlib.store`). With ``backtest``, a pooled
fit also runs its workflow's own portfolio analysis (the ``PortAnaRecord`` of its ``record`` list: top-k strategy,
VN costs, lots and limits) on its test predictions, and stores the excess returns with the other metrics.
"""
from __future__ import annotations

import copy
import ctypes
import ctypes.util
import gc
import hashlib
import json
import os
import platform
import tempfile
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Iterable, Sequence

import filelock
import pandas as pd

from vn30_qlib import store
from vn30_qlib.data.provider import read_instruments
from vn30_qlib.metrics import cross_sectional_metrics, time_series_metrics

EXPERIMENT = "vn30_loop"
CROSS_SECTIONAL_LABEL_PROCESSORS = {"CSZScoreNorm", "CSRankNorm", "CrossSectionalZScore"}
# models that combine scores across the day's names, which one name a day cannot give: no per-symbol mode
CROSS_SECTIONAL_MODELS = {"ModelEnsemble": "z-scores its members' scores across each day's names",
                          "DDGDARetrain": "weighs training days by its proxy models' daily Rank IC across the names"}
# models that refit another model config (their kwarg ``model``): seeds and per-symbol kwargs go to that one
WRAPPER_MODELS = {"RollingRetrain", "DDGDARetrain"}
# model kwarg: (whether a value of it needs a day's names, its per-symbol replacement)
CROSS_SECTIONAL_MODEL_KWARGS = {"metric": (lambda value: value == "ic", "loss"),
                                "loss": (lambda value: value == "ic", "mse"),
                                "ic_loss_weight": (lambda value: value > 0, 0.0),
                                "market_context": (bool, False),
                                "sector_relative": (bool, False)}
# model kwargs that say where and on how many threads a fit ran, not what it fitted: a stored fit that differs from
# a seed ensemble's member only in these is that member (`stored_member_fits`)
RUNTIME_KWARGS = ("n_threads", "device", "checkpoint_dir")
PACKAGES = ("pyqlib", "torch", "lightgbm", "pandas", "numpy", "mlflow", "vn30-qlib")


@dataclass(frozen=True)
class LoopEntry:
    """One fit: a workflow in a mode; ``symbol`` is None for the pooled fit."""

    workflow: str
    mode: str
    symbol: str | None
    seed: int | None = None     # None: the workflow's own seed

    @property
    def model(self) -> str:
        return Path(self.workflow).stem.removesuffix("_vn30")

    @property
    def stored_as(self) -> str:
        """The model's name in the store: one entry per seed."""
        return self.model if self.seed is None else f"{self.model}.seed{self.seed}"

    def label(self) -> str:
        return f"{self.stored_as}/{self.mode}/{self.symbol or 'all'}"


def init_qlib_for(provider: str | Path, mlflow_uri: str | None = None) -> None:
    """Qlib on ``provider``; with ``mlflow_uri`` the recorder writes there (an sqlite store)."""
    import qlib

    kwargs = {}
    if mlflow_uri:
        kwargs["exp_manager"] = folder_exp_manager(mlflow_uri, EXPERIMENT)
    qlib.init(provider_uri=str(Path(provider).expanduser()), region="cn", kernels=1, **kwargs)


def provider_fingerprint(provider: str | Path) -> dict:
    """sha256 over the provider's calendar, instrument lists and feature files, plus its span and, for a
    simulated market, its parameters (the report states what market the models were fitted on)."""
    root = Path(provider).expanduser().resolve()
    digest = hashlib.sha256()
    for path in sorted(p for sub in ("calendars", "instruments", "features") for p in (root / sub).rglob("*")
                       if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    days = (root / "calendars" / "day.txt").read_text().split()
    return {"path": str(root), "sha256": digest.hexdigest(), "first_day": days[0], "last_day": days[-1],
            "simulated": simulation_summary(root)}


def simulation_summary(provider: str | Path) -> dict | None:
    """Seed, planted signal, span and symbol count of a provider `vn30-qlib data simulate` wrote (read from its
    ``simulate_params.json``); None for any other provider."""
    path = Path(provider).expanduser() / "simulate_params.json"
    if not path.is_file():
        return None
    params = json.loads(path.read_text())
    return {"seed": params["seed"], "signal": params["signal"], "start": params["start"], "end": params["end"],
            "symbols": len(params["symbols"])}


def require_inputs(workflows: Sequence[str | Path], provider: str | Path) -> None:
    """Stop a loop or a search before it starts (and before any failure record) when a workflow file or the
    provider is missing; the message names the path."""
    for workflow in workflows:
        if not Path(workflow).expanduser().is_file():
            raise FileNotFoundError(f"{workflow}: workflow file not found")
    if not (Path(provider).expanduser() / "calendars" / "day.txt").is_file():
        raise FileNotFoundError(f"{provider}: not a Qlib provider (calendars/day.txt missing); write one with "
                                "vn30-qlib data simulate or data ingest, or pass --provider")


def adapt_task(task: dict, mode: str, symbol: str | None, seed: int | None = None) -> dict:
    """The workflow's task for one loop entry (see the module docstring for what per-symbol mode and a seed
    change)."""
    task = copy.deepcopy(task)
    per_symbol_kwargs = task["model"].pop("per_symbol_kwargs", None) or {}
    fitted = _fitted_model(task["model"])
    if seed is not None:
        _set_seed(fitted.setdefault("kwargs", {}), seed)
    if mode == "pooled":
        return task
    if mode != "per_symbol":
        raise ValueError(f"unknown mode {mode!r}: use 'per_symbol' or 'pooled'")
    if task["model"].get("class") in CROSS_SECTIONAL_MODELS:
        model_class = task["model"]["class"]
        raise ValueError(f"{model_class} {CROSS_SECTIONAL_MODELS[model_class]}, and one name a day has no spread: "
                         "it has no per-symbol mode; fit it pooled (--modes pooled)")
    handler = task["dataset"]["kwargs"]["handler"]["kwargs"]
    handler["instruments"] = [symbol]
    learn = handler.get("learn_processors") or _default_learn_processors(task)
    handler["learn_processors"] = [
        {"class": "ZScoreNorm", "kwargs": {"fields_group": "label"}}
        if p.get("class") in CROSS_SECTIONAL_LABEL_PROCESSORS else p for p in learn
    ]
    fitted.setdefault("kwargs", {}).update(per_symbol_kwargs)
    _replace_cross_sectional(task["model"])
    return task


def _fitted_model(model: dict) -> dict:
    """The config whose fits the seed and the per-symbol kwargs reach: the model, or the one a `RollingRetrain`
    refits (its ``model``)."""
    while model.get("class") in WRAPPER_MODELS:
        model = model["kwargs"]["model"]
    return model


def _set_seed(kwargs: dict, seed: int) -> None:
    """``seed`` for a model; for an ensemble of n seeds, seeds n*seed .. n*seed+n-1 (seed 0: 0 .. n-1)."""
    if isinstance(kwargs.get("seeds"), list):
        n = len(kwargs["seeds"])
        kwargs["seeds"] = list(range(n * seed, n * seed + n))
    else:
        kwargs["seed"] = seed


def _replace_cross_sectional(model: dict) -> None:
    """Replace the cross-sectional kwargs of ``model`` and of every model config nested in its kwargs."""
    kwargs = model.setdefault("kwargs", {})
    for key, (cross_sectional, replacement) in CROSS_SECTIONAL_MODEL_KWARGS.items():
        if key in kwargs and cross_sectional(kwargs[key]):
            kwargs[key] = replacement
    for value in kwargs.values():
        if isinstance(value, dict) and "class" in value:
            _replace_cross_sectional(value)


def _default_learn_processors(task: dict) -> list[dict]:
    from qlib.utils import get_callable_kwargs
    import inspect

    handler_class, _ = get_callable_kwargs(task["dataset"]["kwargs"]["handler"])
    for cls in handler_class.__mro__:  # a subclass may pass learn_processors through **kwargs to its parent
        parameter = inspect.signature(cls.__init__).parameters.get("learn_processors")
        if parameter is not None:
            return copy.deepcopy(list(parameter.default))
    raise ValueError(f"{handler_class.__name__} takes no learn_processors")


def config_hash(task: dict) -> str:
    return hashlib.sha256(json.dumps(task, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _failure_path(store_root: Path, entry: LoopEntry) -> Path:
    return store_root / "failures" / f"{entry.stored_as}__{entry.mode}__{entry.symbol or 'all'}.json"


def fit_entry(entry: LoopEntry, provider: str, store_root: str, force: bool = False,
              tracking_uri: str | None = None, backtest: bool = False) -> dict:
    """Fit, evaluate and store one entry; never raises: a failure comes back with its error and traceback."""
    from vn30_qlib.workflow_config import load_workflow  # imports qlib: only workers need it, not the driver

    store_root = Path(store_root)
    started = time.perf_counter()
    try:
        config = load_workflow(entry.workflow, {"VN30_PROVIDER": provider})
        task = adapt_task(config["task"], entry.mode, entry.symbol, entry.seed)
        task_hash = config_hash(task)
        fingerprint = provider_fingerprint(provider)
        target = store.entry_dir(store_root, entry.stored_as, entry.symbol)
        current = None if force else store.latest(target)
        if current and _same_fit(current, task_hash, fingerprint):
            return {**asdict(entry), "status": "skipped", "version": str(current)}
        version, stored = _fit_and_store(entry, task, task_hash, fingerprint, provider, target,
                                         tracking_uri or sqlite_tracking_uri(store_root), force, backtest)
        return {**asdict(entry), "status": "done" if stored else "skipped", "version": str(version),
                "seconds": time.perf_counter() - started}
    except Exception as error:  # one failing entry must not stop the loop
        return {**asdict(entry), "status": "failed", "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(), "seconds": time.perf_counter() - started}
    finally:
        _release_freed_memory()


def _release_freed_memory() -> None:
    """Hand the memory a finished fit freed back to the system (glibc keeps freed heap pages otherwise: a
    worker that has run a TFT fit holds ~1.1 GB between fits, ~0.8 GB after this). No-op without glibc."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def stored_member_fits(task: dict, entries: Path, fingerprint: dict) -> list[Path] | None:
    """For a `SeedEnsemble` task: the stored fits of its members, or None unless every member has one.

    The member of seed s is a fit of the ensemble's task with the ensemble's ``model`` config and seed s; a fit
    of that task (e.g. ``tft.seed{s}`` of ``tft_vn30.yaml`` under ``--seeds``; `RUNTIME_KWARGS` may differ) on
    the same data (provider checksum), stored in ``entries`` (the ensemble's own mode and symbol folder), is that
    member: the ensemble is composed from the latest such versions instead of fitting them again.
    """
    if task["model"].get("class") != "SeedEnsemble":
        return None
    from vn30_qlib.models.seed_ensemble import member_config

    kwargs = task["model"]["kwargs"]
    member_identities = {_fit_identity({**task, "model": member_config(kwargs["model"], seed)}): seed
                         for seed in kwargs["seeds"]}
    found: dict[int, Path] = {}
    for entry in sorted(p for p in entries.glob("*") if p.is_dir()) if entries.is_dir() else []:
        try:
            version = store.latest(entry)
            if version is None or store.read_metadata(version)["provider"]["sha256"] != fingerprint["sha256"]:
                continue
            seed = member_identities.get(_fit_identity(store.read_task(version)))
        except store.StoreError:  # a damaged entry is no member (and must not stop the ensemble's own fit)
            continue
        if seed is not None:
            found.setdefault(seed, version)
    return [found[seed] for seed in kwargs["seeds"]] if len(found) == len(member_identities) else None


def _fit_identity(task: dict) -> str:
    """The config hash of ``task`` without its model's `RUNTIME_KWARGS`."""
    kwargs = {k: v for k, v in task["model"].get("kwargs", {}).items() if k not in RUNTIME_KWARGS}
    return config_hash({**task, "model": {**task["model"], "kwargs": kwargs}})


def _same_fit(version: Path, task_hash: str, fingerprint: dict) -> bool:
    meta = store.read_metadata(version)
    return meta["config_hash"] == task_hash and meta["provider"]["sha256"] == fingerprint["sha256"]


def _record_outcome(store_root: Path, entry: LoopEntry, result: dict) -> None:
    """Written by the driver, which sees the store even when a worker died: failures/{entry}.json while an
    entry fails (replaced atomically), removed once it is done. A store that cannot be written stops the loop
    with a `StoreError`."""
    path = _failure_path(store_root, entry)
    try:
        if result["status"] == "failed":
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.partial")
            partial.write_text(json.dumps(result, indent=2))
            os.replace(partial, path)
        else:
            path.unlink(missing_ok=True)
    except OSError as error:
        raise _unwritable(store_root, error) from error


def _unwritable(store_root: Path, error: OSError) -> store.StoreError:
    return store.StoreError(f"cannot write the model store {store_root}: {error.strerror or error} "
                            f"({error.filename or store_root}); free space or choose a writable --store")


def _require_writable(store_root: Path) -> None:
    """Create the store folder and write and remove a probe file in it: a read-only or full store fails here,
    before any fit, with one message."""
    try:
        store_root.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=store_root)
        try:
            os.write(handle, b"probe")
            os.fsync(handle)
        finally:
            os.close(handle)
            os.unlink(probe)
    except OSError as error:
        raise _unwritable(store_root, error) from error


def _fit_and_store(entry: LoopEntry, task: dict, task_hash: str, fingerprint: dict, provider: str, target: Path,
                   tracking_uri: str, force: bool, backtest: bool = False) -> tuple[Path, bool]:
    """The new version, or the one another worker stored meanwhile (a retried or duplicated task), and
    whether this call stored it. The check and the write hold the entry's lock, so one fit lands once."""
    from qlib.data.dataset.handler import DataHandlerLP
    from qlib.utils import init_instance_by_config
    from qlib.workflow import R

    from vn30_qlib.processor_state import fitted_state

    init_qlib_for(provider, tracking_uri)
    timings = {}
    with R.start(experiment_name=EXPERIMENT, recorder_name=entry.label()):
        R.set_tags(symbol=entry.symbol or "all", model=entry.model, mode=entry.mode, config_hash=task_hash,
                   seed="workflow" if entry.seed is None else str(entry.seed))
        clock = time.perf_counter()
        dataset = init_instance_by_config(task["dataset"])
        model = init_instance_by_config(task["model"])
        timings["data_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        members = None if force else stored_member_fits(task, target.parent, fingerprint)
        members_from = None if members is None else [str(v.relative_to(target.parent.parent)) for v in members]
        if members is None:
            model.fit(dataset)
        else:  # a seed ensemble whose members are stored fits: composed from them, not fitted again
            model.members = [store.load(version)[0] for version in members]
            R.set_tags(members_from=", ".join(members_from))
        timings["fit_s"] = time.perf_counter() - clock
        clock = time.perf_counter()
        pred = model.predict(dataset, segment="test")
        timings["predict_s"] = time.perf_counter() - clock
        label = dataset.prepare("test", col_set="label", data_key=DataHandlerLP.DK_R).iloc[:, 0]
        learnt_label = dataset.prepare("test", col_set="label", data_key=DataHandlerLP.DK_L).iloc[:, 0]
        metrics = evaluate(pred, label, learnt_label, entry.mode)
        R.save_objects(**{"pred.pkl": pred, "label.pkl": label})  # the recorder's own copies (Qlib's convention)
        R.log_metrics(**_flat_numbers(metrics))
        if backtest and entry.mode == "pooled":
            clock = time.perf_counter()
            metrics["backtest"] = run_backtest(task, R.get_recorder())
            timings["backtest_s"] = time.perf_counter() - clock
        run_id = R.get_recorder().id
    segments = task["dataset"]["kwargs"]["segments"]
    metadata = {
        "entry": asdict(entry), "model": entry.model, "mode": entry.mode, "symbol": entry.symbol,
        "provider": fingerprint, "config_hash": task_hash,
        "data_span": {name: [str(d) for d in span] for name, span in segments.items()},
        "seed": entry.seed if entry.seed is not None else task["model"].get("kwargs", {}).get("seed"),
        "packages": {name: package_version(name) for name in PACKAGES} | {"python": platform.python_version()},
        "metrics": metrics, "timings": timings, "mlflow_run_id": run_id, "mlflow_tracking_uri": tracking_uri,
        "processors": fitted_state(dataset.handler),  # lets predict skip refitting them (vn30_qlib.processor_state)
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if members_from is not None:
        metadata["members_from"] = members_from
    predictions = pred.rename("score").to_frame().assign(label=label.reindex(pred.index))
    with store.entry_lock(target):
        current = None if force else store.latest(target)
        if current and _same_fit(current, task_hash, fingerprint):
            return current, False
        return store.save_version(target, model, task, predictions, metadata), True


BACKTEST_METRICS = {  # the loop's name: (the analysis, the measure) in Qlib's portfolio analysis of the day
    "excess_return_with_cost": ("excess_return_with_cost", "annualized_return"),
    "excess_ir_with_cost": ("excess_return_with_cost", "information_ratio"),
    "excess_max_drawdown_with_cost": ("excess_return_with_cost", "max_drawdown"),
    "excess_return_without_cost": ("excess_return_without_cost", "annualized_return"),
}


def run_backtest(task: dict, recorder) -> dict:
    """The workflow's own portfolio analysis on the test predictions in ``recorder`` (its ``pred.pkl``): the
    annualised excess returns against the benchmark, with and without cost, from the analysis it returns (what it
    logs reaches the recorder asynchronously)."""
    from qlib.utils import init_instance_by_config

    configs = [record for record in task.get("record", []) if record["class"].endswith("PortAnaRecord")]
    if not configs:
        raise ValueError("backtest: the workflow's task.record has no PortAnaRecord to run")
    analysis = init_instance_by_config(configs[0], recorder=recorder).generate()["port_analysis_1day.pkl"]["risk"]
    return {name: float(analysis[key]) for name, key in BACKTEST_METRICS.items()}


def evaluate(pred: pd.Series, label: pd.Series, learnt_label: pd.Series, mode: str) -> dict:
    """Per-symbol time-series metrics; a pooled model also gets the daily cross-sectional ones (a per-symbol
    model's are computed by the report, across the symbols' separate models). All from `vn30_qlib.metrics`.

    Correlations and hit rates are against the raw return ``label``; ``mse_learnt`` and ``mae_learnt`` against
    ``learnt_label``, the label after the workflow's learn processors, i.e. in the units the model predicts.
    """
    per_symbol = {
        symbol: time_series_metrics(pred.xs(symbol, level="instrument"), group.droplevel("instrument"),
                                    learnt_label.xs(symbol, level="instrument"))
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


def sqlite_tracking_uri(folder: Path) -> str:
    """The mlflow store ``{folder}/mlruns.db`` (the loop's store root, the search's output folder)."""
    return f"sqlite:///{folder.resolve() / 'mlruns.db'}"


def create_tracking_store(tracking_uri: str, experiment: str = EXPERIMENT) -> str:
    """Create the tracking store and the experiment if missing; returns the experiment id.

    An sqlite store is created under a file lock next to it (``mlruns.db.lock``): two processes setting up
    one fresh database race on its schema (``duplicate column name``). Its experiments keep their artifacts
    in ``mlruns/`` beside the database, not in the ``./mlruns`` of whatever folder the process started in.
    """
    from mlflow.tracking import MlflowClient

    database = _sqlite_path(tracking_uri)
    lock = filelock.FileLock(f"{database}.lock") if database else nullcontext()
    with lock:
        client = MlflowClient(tracking_uri=tracking_uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        artifacts = (database.parent / "mlruns").as_uri() if database else None
        return client.create_experiment(experiment, artifact_location=artifacts)


def folder_exp_manager(tracking_uri: str, default_experiment: str) -> dict:
    """The ``exp_manager`` of ``qlib.init`` for a `vn30_qlib.exp_manager.FolderExpManager` on ``tracking_uri``:
    new experiments keep their artifacts beside the database (`create_tracking_store`)."""
    return {"class": "FolderExpManager", "module_path": "vn30_qlib.exp_manager",
            "kwargs": {"uri": tracking_uri, "default_exp_name": default_experiment}}


def _sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of an ``sqlite:///`` tracking URI (None for a server or another store)."""
    prefix = "sqlite:///"
    return Path(tracking_uri[len(prefix):]).resolve() if tracking_uri.startswith(prefix) else None


def plan(workflows: Sequence[str | Path], provider: str | Path, symbols: Iterable[str] | None = None,
         modes: Sequence[str] = ("per_symbol", "pooled"), seeds: Sequence[int] | None = None) -> list[LoopEntry]:
    """Every entry of a loop: per workflow (and per seed of ``seeds``; None: the workflow's own seed), one
    pooled fit and one per symbol (per-symbol mode).

    Pooled fits come first, in the order of ``workflows``: they are the longest, and starting them first keeps
    the other workers busy with the short per-symbol fits instead of leaving one long fit to run alone at the end.
    `run_loop` runs them one at a time (each holds the whole panel: 1-1.5 GB for the neural models).
    """
    symbols = list(symbols) if symbols else read_instruments(provider, "vn30")["symbol"].tolist()
    workflows = [str(Path(workflow).resolve()) for workflow in workflows]
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise ValueError(f"seeds must be distinct integers, at least one, got {list(seeds)!r}")
    seeds = list(seeds) if seeds is not None else [None]
    entries = [LoopEntry(workflow, "pooled", None, seed) for seed in seeds for workflow in workflows
               if "pooled" in modes]
    if "per_symbol" in modes:
        entries += [LoopEntry(workflow, "per_symbol", symbol, seed) for seed in seeds for symbol in symbols
                    for workflow in workflows]
    return entries


def run_loop(workflows: Sequence[str | Path], provider: str | Path, store_root: str | Path = "models",
             symbols: Iterable[str] | None = None, modes: Sequence[str] = ("per_symbol", "pooled"),
             jobs: int = 1, force: bool = False, progress: bool = True, executor: str = "local",
             ray_address: str | None = None, tracking_uri: str | None = None,
             seeds: Sequence[int] | None = None, backtest: bool = False) -> list[dict]:
    """Run (or resume) the loop; returns one result per entry, in plan order.

    ``executor``: ``local`` (``jobs`` worker processes) or ``ray`` (one Ray task per entry; see
    `vn30_qlib.executors`). ``tracking_uri``: the mlflow store of the recorder runs, by default
    ``sqlite:///{store_root}/mlruns.db``. ``seeds``: every entry fitted once per seed, each stored apart
    (`LoopEntry.stored_as`), so the report gives the spread over seeds. ``backtest``: pooled fits also run their
    workflow's portfolio analysis (`run_backtest`); a fit already stored is not refitted for it (``force`` does).
    """
    from tqdm import tqdm

    from vn30_qlib.executors import WorkerDied, run_calls

    require_inputs(workflows, provider)
    provider = str(Path(provider).expanduser().resolve())
    store_root = Path(store_root).resolve()
    entries = plan(workflows, provider, symbols, modes, seeds)
    _require_writable(store_root)
    tracking_uri = tracking_uri or sqlite_tracking_uri(store_root)
    create_tracking_store(tracking_uri)
    calls = [(entry, provider, str(store_root), force, tracking_uri, backtest) for entry in entries]
    results: list[dict | None] = [None] * len(entries)
    with tqdm(total=len(entries), desc="vn30 loop", unit="fit", disable=not progress) as bar:
        pooled = [index for index, entry in enumerate(entries) if entry.mode == "pooled"]
        for index, result in run_calls(fit_entry, calls, executor, jobs, ray_address,
                                       readable=[provider, *sorted({e.workflow for e in entries})],
                                       writable=[str(store_root)], exclusive=pooled):
            entry = entries[index]
            if isinstance(result, WorkerDied):
                result = {**asdict(entry), "status": "failed", "error": f"WorkerDied: {result}", "traceback": ""}
            _record_outcome(store_root, entry, result)
            results[index] = result
            bar.set_postfix_str(f"{entry.label()} {result['status']}")
            bar.update()
    return results
