"""Optuna search over a workflow's model kwargs, scored by the harness (`vn30_qlib.harness`): the mean of the
seed-averaged daily Rank IC over walk-forward folds of train + valid (`vn30_qlib.cv`), the one judge of every
modelling choice.

The search space lives next to the workflow, ``workflows/{name}.search.yaml``::

    n_trials: 20
    seeds: [0, 1, 2]            # each trial is fitted once per seed on every fold (default 0, 1, 2)
    folds: {n_folds: 3, valid_days: 120, scheme: expanding}     # train_days for rolling, gap_days optional
    params:                     # keys of task.model.kwargs
      learning_rate: {type: float, low: 0.01, high: 0.2, log: true}
      num_leaves: {type: int, low: 16, high: 256, log: true}
      loss: {type: categorical, choices: [mse]}

The study is stored in sqlite (``{out_dir}/optuna.db``) under the workflow's name, so a stopped search
resumes with its finished trials (``n_trials`` counts finished trials; the one a killed search was running is
marked failed by Optuna's heartbeat). Every trial is an mlflow run per seed (its folds nested under it). A trial
is pruned after any fold, and the neural models (their ``epoch_callback`` is passed to the shared epoch loop,
`vn30_qlib.models.training`) are pruned by epoch on the first fold. The best parameters are written as a
ready-to-run workflow ``{model}_tuned_vn30.yaml`` next to the original (same base config and Jinja switches).

The best of many trials is chosen for its score, so that score is biased upwards (the search fits the validation
period's noise: a tuned LSTM whose best validation Rank IC was 0.082 scored 0.031 on a later period). After the
search, `selection_bias` re-scores the best trial on fresh seeds (the same folds) and on the folds just before
the searched ones (the same seeds), which the search never saw; ``{out_dir}/selection_bias.json`` keeps them.
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jinja2
import optuna
import yaml

from vn30_qlib.cv import CV_EXPERIMENT, Fold, folds_for
from vn30_qlib.harness import seed_averaged, seeded_folds, write_json
from vn30_qlib.loop import create_tracking_store, init_qlib_for, require_inputs, sqlite_tracking_uri

DEFAULT_SEEDS = (0, 1, 2)
FRESH_SEED_OFFSET = 1000  # selection_bias re-scores with seeds s + 1000: none a search space would use


def search_space_path(workflow: Path) -> Path:
    return workflow.with_name(workflow.stem + ".search.yaml")


class SearchSpaceError(ValueError):
    """A search space file that cannot be read as one: its path and the key at fault (the CLI exits 2)."""


def read_search_space(workflow: Path) -> dict:
    path = search_space_path(workflow)
    if not path.is_file():
        raise FileNotFoundError(f"{workflow}: no search space; write {path.name} next to it (see vn30_qlib.tune)")
    try:
        space = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SearchSpaceError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(space, dict):
        raise SearchSpaceError(f"{path}: must be a mapping with keys params and folds, got {type(space).__name__}")
    for key in ("params", "folds"):
        if not isinstance(space.get(key), dict):
            raise SearchSpaceError(f"{path}: key {key!r} must be a mapping, got {space.get(key)!r}")
    if space.get("objective", "rank_ic") != "rank_ic":
        raise SearchSpaceError(f"{path}: objective must be rank_ic (the harness score: the seed-averaged daily Rank "
                               f"IC over the folds), got {space['objective']!r}")
    seeds = space.get("seeds", list(DEFAULT_SEEDS))
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise SearchSpaceError(f"{path}: seeds must be a list of distinct integers, got {seeds!r}")
    space["seeds"] = seeds
    for name, spec in space["params"].items():
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in ("float", "int", "categorical"):
            raise SearchSpaceError(f"{path}: params.{name}.type must be float, int or categorical, got {kind!r}")
        needed = ("choices",) if kind == "categorical" else ("low", "high")
        missing = [key for key in needed if key not in spec]
        if missing:
            raise SearchSpaceError(f"{path}: params.{name} ({kind}) lacks {', '.join(missing)}")
    return space


def suggest(trial: optuna.Trial, params: dict) -> dict:
    """Optuna suggestions for the declared parameters."""
    values = {}
    for name, spec in params.items():
        if spec["type"] == "float":
            values[name] = trial.suggest_float(name, spec["low"], spec["high"], log=spec.get("log", False))
        elif spec["type"] == "int":
            values[name] = trial.suggest_int(name, spec["low"], spec["high"], log=spec.get("log", False))
        else:
            values[name] = trial.suggest_categorical(name, spec["choices"])
    return values


def tune(workflow: str | Path, provider: str | Path, out_dir: str | Path = "tuning", n_trials: int | None = None,
         start: dict | None = None, executor: str = "local", jobs: int = 1, ray_address: str | None = None) -> dict:
    """Run (or resume) the search; returns the best value, parameters and the path of the tuned workflow.

    ``start``: parameters (inside the search space) evaluated as the first trial of a new study.
    ``executor``/``jobs``/``ray_address``: with ``local`` and one job the trials run here one after another
    (sharing the fold datasets); otherwise each trial is one task of `vn30_qlib.executors.run_calls`, run
    against the same study storage (Optuna samples each new trial from the trials finished so far, each call
    with its own sampler seed; trials then finish in a machine-dependent order, so a parallel search is not
    repeatable run to run, a sequential one is).
    """
    require_inputs([workflow], provider)
    workflow, out_dir = Path(workflow).resolve(), Path(out_dir).resolve()
    provider = str(Path(provider).expanduser().resolve())
    space = read_search_space(workflow)
    out_dir.mkdir(parents=True, exist_ok=True)
    study = _open_study(workflow, out_dir, space)
    if start and not study.trials:
        study.enqueue_trial(start)
    finished = sum(t.state.is_finished() for t in study.trials)
    remaining = max(0, (n_trials or space.get("n_trials", 20)) - finished)
    create_tracking_store(sqlite_tracking_uri(out_dir), CV_EXPERIMENT)
    if executor == "local" and jobs == 1:
        run_trials(workflow, provider, out_dir, remaining)
    else:
        from qlib.log import get_module_logger

        from vn30_qlib.executors import WorkerDied, run_calls

        # each call samples with its own seed: one seed in every worker would draw the same parameters
        calls = [(workflow, provider, out_dir, 1, space.get("seed", 0) + finished + i) for i in range(remaining)]
        for _, outcome in run_calls(run_trials, calls, executor, jobs, ray_address,
                                    readable=[provider, str(workflow)], writable=[str(out_dir)]):
            if isinstance(outcome, WorkerDied):  # Optuna's heartbeat marks that trial failed; the search goes on
                get_module_logger("vn30_qlib.tune").warning(f"a trial's worker died: {outcome}")
    study = _open_study(workflow, out_dir, space)
    tuned = write_tuned_workflow(workflow, study.best_params)
    bias = selection_bias(workflow, provider, out_dir, study.best_params, study.best_value)
    return {"best_value": study.best_value, "best_params": study.best_params, "tuned_workflow": tuned,
            "trials": len(study.trials), "selection_bias": bias}


def selection_bias(workflow: Path, provider: str, out_dir: Path, best_params: dict, best_value: float) -> dict:
    """The best trial's harness score as the search saw it, on fresh seeds (same folds) and on the ``n_folds``
    folds just before the searched ones (same seeds: folds the search never saw; None when train + valid is too
    short for them); written to ``{out_dir}/selection_bias.json``."""
    space = read_search_space(workflow)
    seeds = space["seeds"]
    tracking_uri = sqlite_tracking_uri(out_dir)
    init_qlib_for(provider, tracking_uri)
    folds_options = dict(space["folds"])
    task, folds = folds_for(workflow, provider, **folds_options)
    datasets = _fold_datasets(task)  # the searched folds' data, when this process ran the trials
    task["model"].setdefault("kwargs", {}).update(best_params)
    fresh = [seed + FRESH_SEED_OFFSET for seed in seeds]
    result = {"search": {"seeds": seeds, "folds": len(folds), "rank_ic": best_value},
              "fresh_seeds": {"seeds": fresh, "folds": len(folds), "rank_ic": _harness_mean(
                  task, folds, fresh, tracking_uri, f"{workflow.stem}/best_fresh_seeds", datasets)}}
    try:
        earlier = folds_for(workflow, provider, **{**folds_options, "n_folds": 2 * len(folds)})[1][:len(folds)]
    except ValueError as error:  # too little training data before the searched folds
        result["unseen_folds"] = {"skipped": str(error)}
    else:
        result["unseen_folds"] = {"seeds": seeds, "folds": [f"{f.valid[0]:%Y-%m-%d}..{f.valid[1]:%Y-%m-%d}"
                                                            for f in earlier],
                                  "rank_ic": _harness_mean(task, earlier, seeds, tracking_uri,
                                                           f"{workflow.stem}/best_unseen_folds", datasets)}
    write_json(out_dir / "selection_bias.json", result)
    return result


def _harness_mean(task: dict, folds: list[Fold], seeds: list[int], tracking_uri: str, run_name: str,
                  datasets: dict) -> float:
    return float(seed_averaged(seeded_folds(task, folds, seeds, tracking_uri, run_name,
                                            dataset_cache=datasets)).mean())


def _open_study(workflow: Path, out_dir: Path, space: dict, seed: int | None = None) -> optuna.Study:
    # A heartbeat marks the trial of a killed search as failed once it has been silent for 10 s.
    storage = optuna.storages.RDBStorage(f"sqlite:///{out_dir / 'optuna.db'}", heartbeat_interval=5, grace_period=10)
    return optuna.create_study(
        study_name=workflow.stem, storage=storage, load_if_exists=True, direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=space.get("seed", 0) if seed is None else seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=space.get("pruner_startup_trials", 3)),
    )


def run_trials(workflow: Path, provider: str, out_dir: Path, n_trials: int, seed: int | None = None) -> int:
    """Run ``n_trials`` trials of the stored study in this process (a worker's task); returns how many ran.
    ``seed``: the sampler's (default: the search space's)."""
    space = read_search_space(workflow)
    tracking_uri = sqlite_tracking_uri(out_dir)
    init_qlib_for(provider, tracking_uri)
    task, folds = folds_for(workflow, provider, **space["folds"])
    task["model"].setdefault("kwargs", {})
    study = _open_study(workflow, out_dir, space, seed)
    datasets = _fold_datasets(task)
    study.optimize(lambda trial: _objective(trial, task, folds, space, tracking_uri, workflow, datasets),
                   n_trials=n_trials)
    return n_trials


# Fold datasets built in this process, reused by its later trials (a worker process runs many).
_FOLD_DATASETS: dict[str, dict] = {}


def _fold_datasets(task: dict) -> dict:
    """The fold datasets of ``task``'s dataset built in this process so far (filled as folds are fitted)."""
    return _FOLD_DATASETS.setdefault(json.dumps(task["dataset"], sort_keys=True, default=str), {})


def _objective(trial: optuna.Trial, task: dict, folds: list[Fold], space: dict, tracking_uri: str, workflow: Path,
               datasets: dict) -> float:
    """The trial's harness score: its seed-averaged daily Rank IC over every fold's validation days."""
    trial_task = copy.deepcopy(task)
    trial_task["model"]["kwargs"].update(suggest(trial, space["params"]))
    seen = []

    def on_fold(i: int, metrics: dict) -> None:
        seen.append(metrics["rank_ic"])
        trial.report(sum(seen) / len(seen), step=1000 + len(seen) - 1)  # fold steps after any epoch steps
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after {len(seen)} fold fits")

    def epoch_callback(epoch: int, row: dict) -> None:
        if not seen:  # prune by epoch on the first fold only, on the loop's valid IC
            trial.report(row["valid_ic"], step=epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

    def attach(model) -> None:
        if hasattr(model, "epoch_callback"):
            model.epoch_callback = epoch_callback

    by_seed = seeded_folds(trial_task, folds, space["seeds"], tracking_uri,
                           f"{workflow.stem}/trial{trial.number}", on_fold=on_fold, model_hook=attach,
                           dataset_cache=datasets)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for result in by_seed.values():
        for name, value in trial.params.items():
            client.log_param(result["parent_run_id"], name, value)
    return float(seed_averaged(by_seed).mean())


def write_tuned_workflow(workflow: Path, best_params: dict) -> Path:
    """``{model}_tuned_vn30.yaml``: the original workflow's own keys, Jinja switches kept, best model kwargs."""
    model = workflow.stem.removesuffix("_vn30")
    text = workflow.read_text()
    expressions = {m.group(1): m.group(0) for m in re.finditer(r"\{\{\s*(\w+)[^}]*\}\}", text)}
    own = yaml.safe_load(jinja2.Template(text).render(**{name: f"JINJA_{name}" for name in expressions}))
    own["task"]["model"].setdefault("kwargs", {}).update(best_params)
    body = yaml.safe_dump(own, sort_keys=False)
    for name, expression in expressions.items():
        body = body.replace(f"JINJA_{name}", expression.replace(f'"{model}_vn30"', f'"{model}_tuned_vn30"'))
    target = workflow.with_name(f"{model}_tuned_vn30.yaml")
    target.write_text(f"# Written by `vn30-qlib tune {workflow.name}`: the best trial of Optuna study {workflow.stem}.\n"
                      + body)
    return target
