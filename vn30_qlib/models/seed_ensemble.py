"""One model config fitted under several seeds, its predictions averaged (``vn30_qlib.models.seed_ensemble``).

A neural baseline's test Rank IC moves with its seed about as much as it differs from LightGBM's (the TFT on the
real split, seeds 0-4: 0.029-0.049, BENCHMARKS.md). Averaging a few seeds' forecasts removes part of that noise
(one real-split run of three TFTs: 0.0448, against 0.0464, 0.0342 and 0.0318 for the members alone), which a later
study that compares against the baseline needs. The members are ordinary Qlib models: each is built from ``model``
by Qlib's ``init_instance_by_config`` with ``seed`` set, fitted in turn, and pickled with the ensemble.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd
from qlib.data.dataset import DatasetH
from qlib.model.base import Model
from qlib.utils import init_instance_by_config

from vn30_qlib.models.kwargs_check import checked_kwargs
from vn30_qlib.models.training import metric_prefix


def member_config(model: dict, seed: int) -> dict:
    """The config of a seed ensemble's member of seed ``seed``: ``model`` with that seed, its checkpoints (if it
    keeps any) in ``seed{seed}/`` of its ``checkpoint_dir``."""
    kwargs = {**model.get("kwargs", {}), "seed": seed}
    if kwargs.get("checkpoint_dir") is not None:
        kwargs["checkpoint_dir"] = str(Path(kwargs["checkpoint_dir"]).expanduser() / f"seed{seed}")
    return {**model, "kwargs": kwargs}


@checked_kwargs
class SeedEnsemble(Model):
    """The mean prediction of ``model`` (a Qlib model config: ``class``, ``module_path``, ``kwargs``) fitted once
    per seed in ``seeds``.

    Each member's per-epoch metrics go to the recorder as ``seed{s}/valid_ic`` etc.; a member's
    ``checkpoint_dir`` becomes ``checkpoint_dir/seed{s}``, so members neither overwrite nor resume each other.
    """

    def __init__(self, model: dict, seeds: Sequence[int] = (0, 1, 2)):
        if not isinstance(model, dict) or "class" not in model:
            raise ValueError(f"SeedEnsemble: model must be a Qlib model config with a 'class' (and 'module_path', "
                             f"'kwargs'), got {model!r}")
        seeds = list(seeds)
        if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(seed, int) for seed in seeds):
            raise ValueError(f"SeedEnsemble: seeds must be distinct integers, at least one, got {seeds!r}")
        self.model, self.seeds = model, seeds
        self._member(seeds[0])  # a bad member config (e.g. a misspelt kwarg) fails now, before any data is read
        self.members: list[Model] = []

    def fit(self, dataset: DatasetH, **kwargs) -> None:
        members = []
        for seed in self.seeds:
            member = self._member(seed)
            with metric_prefix(f"seed{seed}/"):
                member.fit(dataset, **kwargs)
            members.append(member)
        self.members = members

    def predict(self, dataset: DatasetH, segment: str | slice = "test") -> pd.Series:
        """The members' mean score for every row of ``segment`` (the rows and order of the first member's)."""
        if not self.members:
            raise ValueError("SeedEnsemble: fit the ensemble before predict")
        predictions = [member.predict(dataset, segment) for member in self.members]
        first = predictions[0]
        for seed, prediction in zip(self.seeds[1:], predictions[1:]):
            if not prediction.index.equals(first.index):
                raise ValueError(f"SeedEnsemble: the seed-{seed} member predicted other rows than the seed-"
                                 f"{self.seeds[0]} member ({len(prediction)} vs {len(first)})")
        return pd.concat(predictions, axis=1).mean(axis=1).rename(first.name)

    def _member(self, seed: int) -> Model:
        try:
            return init_instance_by_config(member_config(self.model, seed))
        except TypeError as error:
            if "'seed'" not in str(error):
                raise
            raise TypeError(f"SeedEnsemble: {self.model['class']} must take a 'seed' argument: {error}") from error
