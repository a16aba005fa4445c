"""Different models' forecasts averaged as per-day z-scores (``vn30_qlib.models.model_ensemble``).

LightGBM, the LSTM and the TFT learn on different inputs and predict in different units; what they share is a
ranking of the day's names. `ModelEnsemble` fits each member on its own handler, z-scores each member's scores
across the day's names and averages them with fixed weights, optionally keeping only the members that rank the
valid segment's returns better than chance (``select_on_valid``).

Qlib's ``qlib.model.ens.ensemble.AverageEnsemble`` z-scores and averages too, but on pandas 3 it turns a day with
one name into NaN and drops a member that has no spread on a day from that day's mean (the other members then
weigh more), both silently, and it takes no weights; `daily_zscores` states what such a day gives instead.
"""
from __future__ import annotations

import copy
import json
import math
import re
import weakref
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
from qlib.data.dataset import DatasetH
from qlib.data.dataset.handler import DataHandler, DataHandlerLP
from qlib.log import get_module_logger
from qlib.model.base import Model
from qlib.utils import init_instance_by_config
from qlib.workflow import R

from vn30_qlib.metrics import NO_SPREAD, cross_sectional_metrics
from vn30_qlib.models.kwargs_check import checked_kwargs
from vn30_qlib.models.training import _recording, metric_prefix

MEMBER_KEYS = ("class", "module_path", "kwargs", "handler")
# what a member's handler takes from the workflow dataset's handler, so that every member scores the same rows
SHARED_HANDLER_KWARGS = ("instruments", "start_time", "end_time")
MEMBER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")  # a member's name is its folder in the model store

logger = get_module_logger("ModelEnsemble")
# The members' own handlers, loaded once per workflow handler (the key) and member handler config: qrun's fit and
# its records' predict share them, and so do the ensembles of rolling retraining, whose tasks share one workflow
# handler (`vn30_qlib.rolling`); they go when the workflow handler does.
_member_handlers: weakref.WeakKeyDictionary[DataHandler, dict[str, DataHandler]] = weakref.WeakKeyDictionary()


def daily_zscores(scores: pd.DataFrame) -> pd.DataFrame:
    """Each column z-scored across the names of each day (index level ``datetime``; population sd).

    A day on which a column has no spread (one name, or equal scores: a sum of squared deviations at most
    `vn30_qlib.metrics.NO_SPREAD`, the metrics' definition) gives 0 for all its names: that member ranks no name
    above another that day, so it moves no name in the average either way.
    """
    centred = scores - scores.groupby(level="datetime").transform("mean")
    squares = (centred ** 2).groupby(level="datetime").transform("sum")
    names = scores.groupby(level="datetime").transform("count")
    has_spread = squares > NO_SPREAD
    return (centred / np.sqrt(squares.where(has_spread) / names)).where(has_spread, 0.0)


@checked_kwargs
class ModelEnsemble(Model):
    """The weighted mean of the per-day z-scores (`daily_zscores`) of ``members``' predictions.

    ``members``: name -> a Qlib model config (``class``, ``module_path``, ``kwargs``) with, optionally, a
    ``handler`` (a Qlib handler config): the member then fits and predicts on a dataset of that handler, built by
    the ensemble as the workflow dataset's class with the workflow dataset's segments, and with the workflow
    handler's instruments, start and end time (`SHARED_HANDLER_KWARGS`, which the member's handler must not set),
    so every member scores the same (datetime, instrument) rows. The workflow's own dataset is thus the days and
    names to fit and predict, the dataset of the members without a handler, and the source of the valid segment's
    raw label for ``select_on_valid``; the records read their labels from it as for any model.

    ``weights``: name -> a weight >= 0 (default: equal); the weights of the members used are rescaled to sum to 1.
    ``select_on_valid``: after fitting, keep only the members whose mean daily Rank IC on the valid segment
    (`vn30_qlib.metrics.cross_sectional_metrics`) is above 0; each member's is logged and kept in
    ``valid_rank_ic`` either way. ``seed``: when set, every member's seed (``vn30-qlib loop --seeds``).
    Each member's epoch metrics go to the recorder as ``{name}/valid_ic`` etc., and a member's ``checkpoint_dir``
    becomes ``checkpoint_dir/{name}``, so members neither overwrite nor resume each other.
    """

    def __init__(self, members: Mapping[str, dict], weights: Mapping[str, float] | None = None,
                 select_on_valid: bool = False, seed: int | None = None):
        if not isinstance(members, Mapping) or not members:
            raise ValueError(f"ModelEnsemble: members must map names to Qlib model configs, at least one, got "
                             f"{members!r}")
        for name, config in members.items():
            _check_member(name, config)
        if not isinstance(select_on_valid, bool):
            raise ValueError(f"ModelEnsemble: select_on_valid must be true or false, got {select_on_valid!r}")
        if seed is not None and not isinstance(seed, int):
            raise ValueError(f"ModelEnsemble: seed must be an integer, got {seed!r}")
        self.members, self.select_on_valid, self.seed = dict(members), select_on_valid, seed
        self.weights = _checked_weights(weights, list(self.members))
        for name in self.members:  # a bad member config (e.g. a misspelt kwarg) fails now, before any data is read
            self._member(name)
        self.fitted_members: dict[str, Model] = {}
        self.valid_rank_ic: dict[str, float | None] = {}

    def fit(self, dataset: DatasetH, **kwargs) -> None:
        datasets = self._datasets(dataset, list(self.members))
        fitted = {}
        for name in self.members:
            member = self._member(name)
            with metric_prefix(f"{name}/"):
                member.fit(datasets[name], **kwargs)
            fitted[name] = member
        label = dataset.prepare("valid", col_set="label", data_key=DataHandlerLP.DK_R).iloc[:, 0]
        self.valid_rank_ic = {name: cross_sectional_metrics(member.predict(datasets[name], "valid"), label)[
            "cs_rank_ic"] for name, member in fitted.items()}
        kept = [name for name, ic in self.valid_rank_ic.items() if not self.select_on_valid or (ic or 0.0) > 0]
        self._log_selection(kept)
        if not kept:
            raise ValueError(f"ModelEnsemble: no member has a valid Rank IC above 0 ({self.valid_rank_ic}); "
                             "nothing to average (select_on_valid: false keeps every member)")
        if not sum(self.weights[name] for name in kept) > 0:
            raise ValueError(f"ModelEnsemble: the members kept ({kept}) all have weight 0; nothing to average")
        self.fitted_members = {name: fitted[name] for name in kept}

    def predict(self, dataset: DatasetH, segment: str | slice = "test") -> pd.Series:
        """The ensemble's score for the rows of ``segment`` the members predict (the first member's order)."""
        if not self.fitted_members:
            raise ValueError("ModelEnsemble: fit the ensemble before predict")
        datasets = self._datasets(dataset, list(self.fitted_members))
        scores = {name: member.predict(datasets[name], segment) for name, member in self.fitted_members.items()}
        first_name, first = next(iter(scores.items()))
        for name, score in scores.items():
            if len(score) != len(first) or not score.index.sort_values().equals(first.index.sort_values()):
                missing, extra = first.index.difference(score.index), score.index.difference(first.index)
                example = (missing if len(missing) else extra)[:1].tolist()
                raise ValueError(f"ModelEnsemble: member {name!r} predicted other rows than {first_name!r} "
                                 f"({len(score)} vs {len(first)}: {len(missing)} missing, {len(extra)} extra, e.g. "
                                 f"{example}); their handlers must give the same (datetime, instrument) rows")
            values = score.to_numpy(dtype="float64")
            if not np.isfinite(values).all():
                row = score.index[~np.isfinite(values)][0]
                raise ValueError(f"ModelEnsemble: member {name!r} predicted {int((~np.isfinite(values)).sum())} "
                                 f"non-finite scores in segment {segment!r}, e.g. at {row}")
        frame = pd.DataFrame({name: score.reindex(first.index) for name, score in scores.items()})
        zscores = daily_zscores(frame)
        flat_days = (zscores == 0).groupby(level="datetime").all()  # a day with spread has a nonzero z-score
        for name, days in flat_days.sum().items():
            if days:
                logger.warning(f"member {name}: no spread across the names on {days} of {len(flat_days)} days of "
                               f"segment {segment!r}; its z-score is 0 there (it moves no name)")
        weights = pd.Series({name: self.weights[name] for name in frame.columns})
        return (zscores @ (weights / weights.sum())).rename("score")

    def _member(self, name: str) -> Model:
        """The member ``name`` as its config builds it, unfitted (with the ensemble's seed and checkpoint folder)."""
        config = self.members[name]
        kwargs = dict(config.get("kwargs") or {})
        if self.seed is not None:
            kwargs["seed"] = self.seed
        if kwargs.get("checkpoint_dir") is not None:
            kwargs["checkpoint_dir"] = str(Path(kwargs["checkpoint_dir"]).expanduser() / name)
        model_config = {key: value for key, value in config.items() if key != "handler"} | {"kwargs": kwargs}
        try:
            return init_instance_by_config(model_config)
        except TypeError as error:
            raise TypeError(f"ModelEnsemble: member {name!r}: {error}") from error

    def _datasets(self, dataset: DatasetH, names: list[str]) -> dict[str, DatasetH]:
        """The dataset of each member of ``names``: ``dataset`` itself, or the workflow dataset's class with its
        segments on the member's handler (loaded once per workflow handler, `_member_handlers`)."""
        datasets = {}
        for name in names:
            if "handler" not in self.members[name]:
                datasets[name] = dataset
                continue
            config = copy.deepcopy(self.members[name]["handler"])
            config["kwargs"] = {**(config.get("kwargs") or {}),
                                **{key: getattr(dataset.handler, key) for key in SHARED_HANDLER_KWARGS}}
            loaded = _member_handlers.setdefault(dataset.handler, {})
            key = json.dumps(config, sort_keys=True, default=str)
            if key not in loaded:
                loaded[key] = init_instance_by_config(config, accept_types=DataHandler)
            datasets[name] = type(dataset)(handler=loaded[key], segments=dict(dataset.segments),
                                           fetch_kwargs=dataset.fetch_kwargs)
        return datasets

    def _log_selection(self, kept: list[str]) -> None:
        for name, ic in self.valid_rank_ic.items():
            logger.info(f"member {name}: valid Rank IC {ic if ic is None else round(ic, 4)}, "
                        f"{'kept' if name in kept else 'dropped'}")
        if _recording():  # metrics, not params: a run may fit more than one ensemble
            R.log_metrics(**{f"{name}/valid_rank_ic": ic for name, ic in self.valid_rank_ic.items() if ic is not None},
                          **{f"{name}/kept": float(name in kept) for name in self.valid_rank_ic})


def _check_member(name, config) -> None:
    """A member's name (a store folder) and config: a Qlib model config, with an optional handler config that
    leaves the rows to the workflow's handler."""
    if not isinstance(name, str) or not MEMBER_NAME.fullmatch(name):
        raise ValueError(f"ModelEnsemble: member name {name!r} must start with a letter and hold only letters, "
                         "digits, '_' and '-' (it names the member's folder in the model store)")
    if not isinstance(config, dict) or "class" not in config:
        raise ValueError(f"ModelEnsemble: member {name!r} must be a Qlib model config with a 'class' (and "
                         f"'module_path', 'kwargs', optionally 'handler'), got {config!r}")
    unknown = [key for key in config if key not in MEMBER_KEYS]
    if unknown:
        raise ValueError(f"ModelEnsemble: member {name!r} has unknown key(s) {unknown}; a member takes "
                         f"{', '.join(MEMBER_KEYS)} (a member's own data is a 'handler' config, not a dataset)")
    if "handler" not in config:
        return
    handler = config["handler"]
    if not isinstance(handler, dict) or "class" not in handler:
        raise ValueError(f"ModelEnsemble: member {name!r}: handler must be a Qlib handler config with a 'class', "
                         f"got {handler!r}")
    shared = [key for key in SHARED_HANDLER_KWARGS if key in (handler.get("kwargs") or {})]
    if shared:
        raise ValueError(f"ModelEnsemble: member {name!r}: its handler sets {shared}, which every member takes "
                         "from the workflow dataset's handler (so that all score the same rows); remove them")


def _checked_weights(weights: Mapping[str, float] | None, names: list[str]) -> dict[str, float]:
    """``weights`` as floats, one per member (equal when None); a clear error for missing, extra or bad ones."""
    if weights is None:
        return {name: 1.0 for name in names}
    if not isinstance(weights, Mapping) or set(weights) != set(names):
        given = list(weights) if isinstance(weights, Mapping) else weights
        raise ValueError(f"ModelEnsemble: weights must give one weight per member {names}, got {given!r}")
    bad = {name: value for name, value in weights.items()
           if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0}
    if bad:
        raise ValueError(f"ModelEnsemble: weights must be finite numbers >= 0, got {bad}")
    if not sum(weights.values()) > 0:
        raise ValueError(f"ModelEnsemble: at least one weight must be above 0, got {dict(weights)}")
    return {name: float(weights[name]) for name in names}
