"""Walk-forward cross-validation of a workflow over its train + valid span; the test segment is never read.

Folds are cut from the trading calendar. Each fold's validation block is ``valid_days`` trading days; the last
fold ends where the workflow's valid segment ends (which must itself be purged from the test segment), earlier
folds step back one block each. Training ends ``gap_days`` trading days before its validation block starts (at
least the label's reach, 2 days for ``Ref($close, -2) / Ref($close, -1) - 1``, so no training label reads a
close of the validation block; `vn30_qlib.dataset.VN30DatasetH` checks it again when a fold's data is built).
``expanding`` training starts at the workflow's train start; ``rolling`` keeps ``train_days`` days.
Within a fold the validation block serves both the model's early stopping and the score.
Every fold is a Qlib recorder run (experiment ``vn30_cv``) nested under one parent mlflow run, with the IC,
Rank IC and MSE (``mse_learnt``, in the units of the label the model learnt) of its validation block; Qlib must be initialised with that tracking store
(`vn30_qlib.loop.init_qlib_for(provider, tracking_uri)`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from vn30_qlib.dataset import check_purged, label_reach
from vn30_qlib.loop import create_tracking_store
from vn30_qlib.metrics import cross_sectional_metrics, daily_rank_ic, mse
from vn30_qlib.workflow_config import load_workflow

CV_EXPERIMENT = "vn30_cv"


@dataclass(frozen=True)
class Fold:
    train: tuple[pd.Timestamp, pd.Timestamp]
    valid: tuple[pd.Timestamp, pd.Timestamp]


def label_horizon(task: dict) -> int:
    """Trading days of future data the label reads (2 for the VN30 label; a multi-horizon TFT's more), parsed
    from the label expressions of the task's handler, built without loading data."""
    from qlib.utils import init_instance_by_config

    handler = init_instance_by_config(task["dataset"]["kwargs"]["handler"], init_data=False)
    return label_reach(handler.data_loader.fields["label"][0])


def walk_forward_folds(calendar: pd.DatetimeIndex, start: str, end: str, n_folds: int, valid_days: int,
                       gap_days: int, scheme: str = "expanding", train_days: int | None = None) -> list[Fold]:
    """Folds over ``calendar`` between ``start`` and ``end`` (inclusive), oldest first."""
    if scheme not in ("expanding", "rolling"):
        raise ValueError(f"scheme must be 'expanding' or 'rolling', got {scheme!r}")
    if scheme == "rolling" and not train_days:
        raise ValueError("a rolling scheme needs train_days")
    days = calendar[(calendar >= pd.Timestamp(start)) & (calendar <= pd.Timestamp(end))]
    folds = []
    for k in range(n_folds):
        valid_end = len(days) - 1 - k * valid_days
        valid_start = valid_end - valid_days + 1
        train_end = valid_start - gap_days - 1
        train_start = 0 if scheme == "expanding" else train_end - train_days + 1
        if train_start < 0 or train_end - train_start < valid_days:
            raise ValueError(f"fold {n_folds - k} of {n_folds} has too little training data in {start}..{end}")
        folds.append(Fold((days[train_start], days[train_end]), (days[valid_start], days[valid_end])))
    return folds[::-1]


def fold_task(task: dict, fold: Fold) -> dict:
    """The workflow task restricted to one fold: data ends with the fold, processors fit on its train part."""
    task = copy.deepcopy(task)
    handler = task["dataset"]["kwargs"]["handler"]["kwargs"]
    handler.update(end_time=fold.valid[1], fit_start_time=fold.train[0], fit_end_time=fold.train[1])
    task["dataset"]["kwargs"]["segments"] = {"train": list(fold.train), "valid": list(fold.valid)}
    return task


def folds_for(workflow: str | Path, provider: str | Path, n_folds: int, valid_days: int, scheme: str = "expanding",
              train_days: int | None = None, gap_days: int | None = None) -> tuple[dict, list[Fold]]:
    """(the workflow's task, its folds) — the folds span the workflow's train start .. valid end only."""
    from qlib.data import D

    task = load_workflow(workflow, {"VN30_PROVIDER": str(provider)})["task"]
    segments = task["dataset"]["kwargs"]["segments"]
    reach = label_horizon(task)
    gap = reach if gap_days is None else gap_days
    if gap < reach:
        raise ValueError(f"gap_days={gap} is shorter than the label horizon {reach}")
    calendar = pd.DatetimeIndex(D.calendar())
    folds = walk_forward_folds(calendar, segments["train"][0], segments["valid"][1], n_folds, valid_days, gap,
                               scheme, train_days)
    if "test" in segments:  # the last fold scores (and early-stops on) the valid end: no label may read test
        check_purged({"valid": folds[-1].valid, "test": segments["test"]}, calendar, reach)
    return task, folds


def cross_validate(task: dict, folds: list[Fold], tracking_uri: str, run_name: str,
                   on_fold: Callable[[int, dict], None] | None = None, model_hook: Callable | None = None,
                   dataset_cache: dict | None = None) -> dict:
    """Fit and score ``task`` on every fold; returns per-fold and mean metrics (parent run id included).

    ``tracking_uri`` must be the store Qlib was initialised with (the fold runs go through `qlib.workflow.R`).

    ``on_fold(i, metrics)`` is called after each fold (the tuner reports to Optuna there, and may raise to
    prune); ``model_hook(model)`` may adjust the model before fitting (e.g. attach an epoch callback);
    ``dataset_cache`` keeps each fold's dataset between calls that differ only in the model (a search).
    ``daily_rank_ic``: each fold's validation days' Rank IC (`vn30_qlib.harness` pools them over folds and seeds);
    ``predictions``: each fold's validation scores beside the raw label (columns ``score``, ``label``).
    A fold whose predictions are constant scores IC and Rank IC 0 (no skill), not NaN. IC and Rank IC are
    against the raw return, ``mse_learnt`` against the label after the learn processors (what the model predicts);
    all from `vn30_qlib.metrics`.
    """
    from mlflow.tracking import MlflowClient
    from qlib.data.dataset.handler import DataHandlerLP
    from qlib.utils import init_instance_by_config
    from qlib.workflow import R

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = create_tracking_store(tracking_uri, CV_EXPERIMENT)
    parent = client.create_run(experiment_id, run_name=run_name)
    per_fold, daily_by_fold, predictions = [], [], []
    status = "FAILED"
    try:
        for i, fold in enumerate(folds):
            with R.start(experiment_name=CV_EXPERIMENT, recorder_name=f"{run_name}/fold{i}"):
                R.set_tags(**{"mlflow.parentRunId": parent.info.run_id, "fold": str(i)})
                R.log_params(train=f"{fold.train[0]:%Y-%m-%d}..{fold.train[1]:%Y-%m-%d}",
                             valid=f"{fold.valid[0]:%Y-%m-%d}..{fold.valid[1]:%Y-%m-%d}")
                cache = dataset_cache if dataset_cache is not None else {}
                if fold not in cache:
                    cache[fold] = init_instance_by_config(fold_task(task, fold)["dataset"])
                dataset = cache[fold]
                model = init_instance_by_config(task["model"])
                if model_hook:
                    model_hook(model)
                model.fit(dataset)
                pred = model.predict(dataset, segment="valid")
                label = dataset.prepare("valid", col_set="label", data_key=DataHandlerLP.DK_R).iloc[:, 0]
                learnt = dataset.prepare("valid", col_set="label", data_key=DataHandlerLP.DK_L).iloc[:, 0]
                cs = cross_sectional_metrics(pred, label)
                metrics = {"ic": 0.0, "rank_ic": 0.0} if cs["degenerate"] else {"ic": cs["cs_ic"],
                                                                                 "rank_ic": cs["cs_rank_ic"]}
                days = label.dropna().index.get_level_values("datetime").unique().sort_values()
                daily_by_fold.append(pd.Series(0.0, index=days, name="rank_ic") if cs["degenerate"]
                                     else daily_rank_ic(pred, label))
                metrics["mse_learnt"] = mse(pred, learnt)
                predictions.append(pd.DataFrame({"score": pred, "label": label.reindex(pred.index)}))
                R.log_metrics(**metrics)
            per_fold.append(metrics)
            if on_fold:
                on_fold(i, metrics)
        mean = {f"mean_{k}": float(np.mean([m[k] for m in per_fold])) for k in per_fold[0]}
        for key, value in mean.items():
            client.log_metric(parent.info.run_id, key, value)
        status = "FINISHED"
        return {"folds": per_fold, **mean, "daily_rank_ic": daily_by_fold, "predictions": predictions,
                "parent_run_id": parent.info.run_id}
    finally:
        client.set_terminated(parent.info.run_id, status=status)
