"""DDG-DA as one Qlib model, so that the loop, the model store and the report take it like any other
(``workflows/lgb_ddgda_vn30.yaml``: store entry ``lgb_ddgda`` beside ``lgb`` and ``lgb_rolling``).

`vn30-qlib rolling --method ddgda` runs Qlib's DDG-DA (`vn30_qlib.rolling.ddgda.VN30DDGDA`) and leaves its results
in the recorder. `DDGDARetrain` fits the same: `RollingRetrain`'s windows, each window's model fitted with the
reweighter `VN30DDGDA`'s meta-model gives its training days. What is kept is what predicts: one model per
window, stored as `RollingRetrain`'s are. Qlib's DDG-DA passes its proxy data, proxy models and meta-model between
its steps as pickles and mlflow runs: here they live in temporary folders of the fit (a private mlflow store, in a
thread of its own: mlflow keeps one active run per thread, and the loop's run is open), removed after it.
"""
from __future__ import annotations

import copy

import pandas as pd
from qlib.data.dataset import DatasetH

from vn30_qlib.models.kwargs_check import checked_kwargs
from vn30_qlib.models.rolling_retrain import RollingRetrain

QLIB_META_SEED = 43  # Qlib's seed of the meta-model, for a member without a seed


@checked_kwargs
class DDGDARetrain(RollingRetrain):
    """``model`` (a Qlib model config whose ``fit`` takes a ``reweighter``: LightGBM) refitted every ``step``
    trading days of the test segment as in `RollingRetrain`, each fit's training days reweighted by DDG-DA.

    ``hist_step_n``, ``alpha``, ``max_epoch``, ``fea_imp_n``: `VN30DDGDA`'s. The meta-model's seed is the
    member's ``seed`` (the loop's ``--seeds`` reach both), Qlib's 43 when it has none. ``time_weights`` after
    ``fit`` (and read back from the store): each window's weight per training period, indexed by its (start, end).
    """

    def __init__(self, model: dict, step: int = 20, train_window: int | None = None, hist_step_n: int = 30,
                 alpha: float = 0.01, max_epoch: int = 30, fea_imp_n: int | None = 30):
        from vn30_qlib.rolling.ddgda import check_ddgda_input

        super().__init__(model, step, train_window)
        check_ddgda_input(model, step, alternative="RollingRetrain")
        self.hist_step_n, self.alpha, self.max_epoch, self.fea_imp_n = hist_step_n, alpha, max_epoch, fea_imp_n
        self.time_weights: list[pd.Series] = []

    def window_fit_kwargs(self, dataset: DatasetH, tasks: list[dict]) -> list[dict]:
        """Each window's ``reweighter`` from `VN30DDGDA` on this dataset's handler and segments."""
        from vn30_qlib.rolling.ddgda import VN30DDGDA

        workflow = {"experiment_name": "ddgda", "task": {
            "model": copy.deepcopy(self.model),
            "dataset": {"class": type(dataset).__name__, "module_path": type(dataset).__module__,
                        "kwargs": {"handler": None, "segments": copy.deepcopy(dataset.segments)}}}}
        seed = self.model.get("kwargs", {}).get("seed", QLIB_META_SEED)
        weighted = VN30DDGDA(workflow, None, self.step, train_window=self.train_window, hist_step_n=self.hist_step_n,
                             alpha=self.alpha, max_epoch=self.max_epoch, fea_imp_n=self.fea_imp_n, seed=seed,
                             handler=dataset.handler).weighted_tasks()
        reweighters = {pd.Timestamp(task["dataset"]["kwargs"]["segments"]["test"][0]): task["reweighter"]
                       for task in weighted}
        missing = [f"{segments['test'][0]:%Y-%m-%d}" for segments in tasks
                   if pd.Timestamp(segments["test"][0]) not in reweighters]
        if missing:
            raise ValueError(f"DDGDARetrain: DDG-DA gave no weights for the windows starting {', '.join(missing)}")
        fit_kwargs = [{"reweighter": reweighters[pd.Timestamp(segments["test"][0])]} for segments in tasks]
        self.time_weights = [kwargs["reweighter"].time_weight for kwargs in fit_kwargs]
        return fit_kwargs
