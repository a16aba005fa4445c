"""DDG-DA on a VN30 workflow through Qlib's own `qlib.contrib.rolling.ddgda.DDGDA`.

Qlib's DDG-DA (a meta-model that reweights each rolling task's training days by how the data of each period
predicted the periods after it) runs on the rolling tasks of `VN30Rolling`. Qlib 0.9.7 does not run unchanged on
pandas 3, LightGBM 4 and 30 names a day; each trap has its adapter here:

- proxy model: ``linear`` (Qlib's ridge). Qlib's ``gbdt`` proxy passes ``early_stopping_rounds=None``, which
  LightGBM 4 refuses (``early_stopping_round should be an integer``);
- one handler: the feature importance and the proxy data read the workflow's own handler as the workflow
  processes it (built once, shared), and the linear proxy models train on the proxy data (the top features
  z-scored per day, the workflow's label), which the meta-model reads too. Qlib rebuilds the raw handler for
  each with its own processors (``PROC_ARGS``: a robust z-score, a rank label), which a model handed its
  dataset (`vn30_qlib.models.ddgda_retrain.DDGDARetrain`) cannot do;
- ``loss_skip_thresh``: Qlib skips the meta-model's IC loss on days with fewer than 50 names, i.e. every VN30
  day; here 10;
- ``InternalData._calc_perf`` slices with ``df.loc(axis=0)[:, "pred"]``, a TypeError under pandas 3, and runs
  in joblib processes: `VN30InternalData` computes the daily Rank IC with `vn30_qlib.metrics.daily_rank_ic`,
  under joblib threads;
- Qlib passes the proxy models' predictions and the meta-model between its steps as pickled mlflow artifacts,
  and writes its intermediate files (proxy data, internal data) to a working folder; its fixed experiment
  names ("DDG-DA", "data_sim_s20") make a second run reuse, or trip over, the first run's proxy models. Here
  those steps run against a private mlflow store in a temporary folder (`in_private_recorder`), with a
  temporary working folder, both removed after them: nothing DDG-DA pickles reaches the user's store or
  folders, and every run starts empty. The joined recorder logs what the meta-model trained on
  (``meta_train_*``);
- the proxy data z-scores each feature per day; a feature equal for every name on a day (IMIN5 on a
  market-wide fall) has a standard deviation of exactly 0 while its float32 mean rounds away from the common
  value: +-inf, then ``AssertionError: NaN loss!`` in the meta-model. Such a feature is 0 on that day here;
- ``MetaTaskDS`` asserts that each meta-task's test window holds at least 5 labelled days (a bare
  ``AssertionError``, not the ``ValueError`` `MetaDatasetDS` skips). The proxy tasks roll ``step`` days at a
  time from ``meta_1st_train_end`` to the test end, so the last window holds the remainder of that division:
  1 to 4 days fail (reproduced with step 60, meta_1st_train_end 2020-06-01 and test end 2024-09-26: 3 days).
  The proxy tasks' test end is moved back to the end of the last full window (those tasks only report the
  meta-model's test loss; they never train it), and a step under 5 days is refused;
- the meta-model trains on the meta-tasks whose test windows end (with the label's reach) before the
  workflow's test start (Qlib's default splits the meta-tasks 62/38, which on the VN30 split would train it on
  test days), and its first task ends ``hist_step_n * step`` days after the train start (the history each
  meta-task needs; Qlib's default date is 2010-12-31);
- ``MetaModelDS.run_epoch`` turns autograd off for the whole process and never back on: `VN30DDGDA.run`
  restores the caller's setting;
- the base model must take a ``reweighter`` in ``fit`` (Qlib's `LGBModel` does); otherwise DDG-DA's weights would
  be dropped without a word, so the run is refused.
"""
from __future__ import annotations

import inspect
import pickle
import tempfile
import threading
from copy import deepcopy
from pathlib import Path
from typing import Callable, TypeVar

import mlflow
import pandas as pd
import torch
from joblib import parallel_config
from qlib.contrib.meta.data_selection.dataset import InternalData, MetaDatasetDS
from qlib.contrib.meta.data_selection.model import MetaModelDS
from qlib.contrib.rolling.ddgda import DDGDA, LGBM_MODEL, LINEAR_MODEL
from qlib.data.dataset.handler import DataHandlerLP
from qlib.model.trainer import TrainerR
from qlib.utils import get_callable_kwargs, init_instance_by_config
from qlib.workflow import QlibRecorder, R

from vn30_qlib.metrics import NO_SPREAD, daily_rank_ic
from vn30_qlib.rolling.bridge import RollingError, VN30Rolling

Result = TypeVar("Result")

# fewest names a day for the meta-model's IC loss (Qlib: 50, more than VN30 has)
LOSS_SKIP_THRESH = 10
# MetaTaskDS refuses a meta-task whose test window holds fewer labelled days
META_TASK_MIN_DAYS = 5


def check_ddgda_input(model_config: dict, step: int, alternative: str = "--method rr") -> None:
    """Refuse a model whose ``fit`` takes no ``reweighter`` (Qlib would drop DDG-DA's weights without a word) and
    a step under `META_TASK_MIN_DAYS` (every meta-task would fail Qlib's assertion)."""
    model_class, _ = get_callable_kwargs(model_config)
    if "reweighter" not in inspect.signature(model_class.fit).parameters:
        raise RollingError(f"DDG-DA reweights the training days, and {model_class.__name__}.fit takes no "
                           f"reweighter: use {alternative} for this workflow")
    if step < META_TASK_MIN_DAYS:
        raise RollingError(f"DDG-DA needs a step of {META_TASK_MIN_DAYS} trading days or more (Qlib's meta-tasks "
                           f"test on one step each and refuse fewer days), got {step}")


def in_private_recorder(function: Callable[[], Result]) -> Result:
    """``function()`` run in a thread of its own while Qlib's recorder writes to a new mlflow store in a temporary
    folder, removed after it; the caller's recorder, its active run, Qlib's default URI and mlflow's tracking URI
    are as before when it returns or raises."""
    from vn30_qlib.exp_manager import FolderExpManager
    from vn30_qlib.loop import sqlite_tracking_uri

    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed to the caller's thread below
            outcome["error"] = error

    # set on Qlib's wrapper directly: its `register` refuses while the caller's run is active, since that run
    # would then write elsewhere; the caller's thread waits here, and its recorder is back before it goes on. A
    # new experiment manager also writes its URI into Qlib's global config: that is put back too
    callers_recorder, callers_uri = R._provider, mlflow.get_tracking_uri()
    callers_default_uri = callers_recorder.exp_manager.default_uri
    with tempfile.TemporaryDirectory(prefix="vn30_ddgda_recorder_") as folder:
        R._provider = QlibRecorder(FolderExpManager(uri=sqlite_tracking_uri(Path(folder)), default_exp_name="ddgda"))
        try:
            thread = threading.Thread(target=target, name="ddgda")
            thread.start()
            thread.join()
        finally:
            R._provider = callers_recorder
            callers_recorder.exp_manager.default_uri = callers_default_uri
            mlflow.set_tracking_uri(callers_uri)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class VN30InternalData(InternalData):
    """Qlib's `InternalData` whose daily Rank IC of each proxy model runs under pandas 3."""

    @staticmethod
    def _calc_perf(pred: pd.Series, label: pd.Series) -> pd.Series:
        return daily_rank_ic(pred, label)


class VN30DDGDA(DDGDA, VN30Rolling):
    """Qlib's `DDGDA` on the rolling tasks of `VN30Rolling` (see the module docstring for what differs).

    ``hist_step_n``: the steps of proxy-model history the meta-model reads for each task (Qlib: 30);
    ``fea_imp_n``: the proxy model reads the workflow's features LightGBM ranks first (None: all of them);
    ``max_epoch``: the meta-model's training epochs (Qlib: 30);
    ``meta_1st_train_end``: the train end of the first meta-task (default: the first day with ``hist_step_n``
    steps of history after the cut before its test window);
    ``seed``: the meta-model's (Qlib: 43).
    """

    method = "ddgda"

    def __init__(self, workflow: str | Path | dict, provider: str | Path | None, step: int,
                 train_window: int | None = None, exp_name: str | None = None, hist_step_n: int = 30,
                 meta_1st_train_end: str | None = None, alpha: float = 0.01, max_epoch: int = 30,
                 fea_imp_n: int | None = 30, seed: int = 43, handler: DataHandlerLP | None = None):
        self.working_folder = tempfile.TemporaryDirectory(prefix="vn30_ddgda_")
        super().__init__(workflow=workflow, provider=provider, step=step, train_window=train_window,
                         exp_name=exp_name, sim_task_model="linear", alpha=alpha, loss_skip_thresh=LOSS_SKIP_THRESH,
                         hist_step_n=hist_step_n, meta_1st_train_end=meta_1st_train_end, fea_imp_n=fea_imp_n,
                         working_dir=self.working_folder.name, handler=handler)
        self.max_epoch = max_epoch
        self.seed = seed
        self.meta_exp_name = f"{self.rolling_exp}_meta"
        self.train_start = self.basic_task()["dataset"]["kwargs"]["segments"]["train"][0]
        if self.meta_1st_train_end is None:
            # the first meta-task's train (cut horizon + 1 days before its test) holds hist_step_n steps
            first = int(self.calendar.searchsorted(self.train_start)) + hist_step_n * step + self.horizon + 1
            if first >= len(self.calendar):
                raise RollingError(f"{hist_step_n} steps of {step} days of history exceed the provider's calendar")
            self.meta_1st_train_end = f"{self.calendar[first]:%Y-%m-%d}"

    def check_workflow(self, step: int) -> None:
        """`check_ddgda_input` on the rendered workflow's model."""
        check_ddgda_input(self.workflow_config["task"]["model"], step)

    def basic_task(self, enable_handler_cache: bool | None = True) -> dict:
        """The workflow's task on the shared handler, with or without Qlib's handler cache (see the module
        docstring: one handler)."""
        return super().basic_task(enable_handler_cache=True)

    def _adjust_task(self, task: dict, astype: str) -> dict:
        """Qlib's model for ``astype`` (its handler is left as the workflow processes it), the feature-importance
        LightGBM on the workflow's threads (Qlib: 20)."""
        if astype not in ("gbdt", "linear"):
            raise ValueError(f"unknown proxy model type {astype!r}")
        task["model"] = deepcopy(LGBM_MODEL if astype == "gbdt" else LINEAR_MODEL)
        if astype == "gbdt":
            task["model"]["kwargs"]["num_threads"] = self.workflow_config["task"]["model"].get("kwargs", {}).get(
                "num_threads", 0)
        return task

    def _get_feature_importance(self) -> pd.Series:
        """Qlib's: each feature's LightGBM importance, fitted on the workflow's train and valid segments; on the
        shared handler itself (Qlib deep-copies the task, and a deep copy of a handler drops its data)."""
        task = self._adjust_task(self.basic_task(), astype="gbdt")
        with R.start(experiment_name=f"{self.rolling_exp}_feature_importance"):
            model = init_instance_by_config(task["model"])
            dataset = init_instance_by_config(task["dataset"])
            model.fit(dataset)
        columns = dataset.prepare(segments=slice(None), col_set="feature", data_key=DataHandlerLP.DK_R).columns
        # LightGBM names the columns of the NumPy array it was given: Column_0, Column_1, ...
        return pd.Series({columns[int(name.split("_")[1])]: value
                          for name, value in model.get_feature_importance().items()})

    def _dump_data_for_proxy_model(self) -> None:
        """Qlib's proxy data (the ``fea_imp_n`` features LightGBM ranks first, z-scored per day, and the label),
        with a feature that is constant across a day's names set to 0 on that day.

        Qlib divides by the day's standard deviation. A feature equal for every name on a day (IMIN5, the day of
        the 5-day low, on a market-wide fall: 459 values on the real data, e.g. 2020-04-08) has a standard
        deviation of exactly 0 while its float32 mean rounds away from the common value: +-inf, then a NaN loss
        in the meta-model. The data goes into the proxy handler itself (Qlib: a second pickle).
        """
        dataset = init_instance_by_config(self.basic_task()["dataset"])
        prepared = dataset.prepare(slice(None), col_set=["feature", "label"], data_key=DataHandlerLP.DK_L)
        features = prepared["feature"]
        if self.fea_imp_n is not None:
            features = features.loc[:, self._get_feature_importance().nlargest(self.fea_imp_n).index]
        by_day = features.groupby(level="datetime")
        spread = by_day.transform("std")
        features = ((features - by_day.transform("mean")) / spread.where(spread > NO_SPREAD)).fillna(0.0)
        proxy_data = pd.concat({"label": prepared["label"].reindex(features.index), "feature": features}, axis=1)
        handler = DataHandlerLP(data_loader={"class": "qlib.data.dataset.loader.StaticDataLoader",
                                             "kwargs": {"config": proxy_data}})
        handler.to_pickle(self.working_dir / self.proxy_hd, dump_all=True)

    def _dump_meta_ipt(self) -> None:
        """Qlib's, with the proxy models on the proxy data, `VN30InternalData` under joblib threads and an
        experiment of this run."""
        sim_task = self._adjust_task(self.basic_task(), astype=self.sim_task_model)
        sim_task["dataset"] = {"class": "DatasetH", "module_path": "qlib.data.dataset", "kwargs": {
            "handler": f"file://{(self.working_dir / self.proxy_hd).absolute()}",
            "segments": sim_task["dataset"]["kwargs"]["segments"]}}
        internal_data = VN30InternalData(sim_task, self.step, exp_name=f"{self.rolling_exp}_proxy")
        with parallel_config(backend="threading"):
            internal_data.setup(trainer=TrainerR)
        self.internal_data = internal_data
        with self._internal_data_path.open("wb") as file:  # Qlib's get_task_list reads it back
            pickle.dump(internal_data, file)

    def _train_meta_model(self, fill_method: str = "max") -> None:
        """Qlib's, with the proxy tasks' test end on a full step and the meta-train tasks before the test."""
        test_start, test_end = self.test_segment
        first_test = int(self.calendar.searchsorted(pd.Timestamp(self.meta_1st_train_end), side="right"))
        last = int(self.calendar.searchsorted(test_end, side="right")) - 1
        full_steps = (last - first_test + 1) // self.step
        if full_steps < 2:
            raise RollingError(f"DDG-DA needs two steps of {self.step} days between meta_1st_train_end "
                               f"{self.meta_1st_train_end} and the test end {test_end:%Y-%m-%d}")
        proxy_test_end = self.calendar[first_test + full_steps * self.step - 1]
        # a meta-task trains the meta-model when its test labels read no close of the workflow's test
        meta_train_before = self.calendar[int(self.calendar.searchsorted(test_start)) - self.horizon]
        proxy_task = {
            "dataset": {
                "class": "qlib.data.dataset.DatasetH",
                "kwargs": {
                    "handler": f"file://{(self.working_dir / self.proxy_hd).absolute()}",
                    "segments": {"train": (self.train_start, pd.Timestamp(self.meta_1st_train_end)),
                                 "test": (self.calendar[first_test], proxy_test_end)},
                },
            },
        }
        kwargs = dict(task_tpl=proxy_task, step=self.step, segments=f"{meta_train_before:%Y-%m-%d}",
                      trunc_days=1 + self.horizon, hist_step_n=self.hist_step_n, fill_method=fill_method,
                      rolling_ext_days=0)
        meta_dataset = MetaDatasetDS(exp_name=self.internal_data, **kwargs)
        trained_on = meta_dataset.prepare_tasks(["train"])[0]
        if not trained_on:
            raise RollingError(f"DDG-DA has no meta-task to train on before {meta_train_before:%Y-%m-%d} (lower "
                               "hist_step_n, or start meta_1st_train_end earlier)")
        last_test_end = max(pd.Timestamp(meta_task.task["dataset"]["kwargs"]["segments"]["test"][1])
                            for meta_task in trained_on)
        self.meta_train = {"split": f"{meta_train_before:%Y-%m-%d}", "tasks": len(trained_on),
                           "last_test_end": f"{last_test_end:%Y-%m-%d}"}
        with R.start(experiment_name=self.meta_exp_name):
            R.log_params(**kwargs)
            meta_model = MetaModelDS(step=self.step, hist_step_n=self.hist_step_n, lr=0.001, max_epoch=self.max_epoch,
                                     seed=self.seed, alpha=self.alpha, loss_skip_thresh=self.loss_skip_thresh)
            meta_model.fit(meta_dataset)
            R.save_objects(model=meta_model)

    def weighted_tasks(self) -> list[dict]:
        """The rolling tasks, each with the meta-model's ``reweighter`` of its training days (`_weigh_tasks`), in
        a private mlflow store (`in_private_recorder`): Qlib passes the proxy models' predictions and the
        meta-model between its steps as pickled artifacts, and none of them reaches the caller's store."""
        return in_private_recorder(self._weigh_tasks)

    def _weigh_tasks(self) -> list[dict]:
        """Proxy data, proxy models, meta-model, then Qlib's inference; every task must come back with its weights.

        Qlib's meta-model turns autograd off when it validates (``MetaModelDS.run_epoch`` calls
        ``torch.set_grad_enabled(False)`` and never turns it back on): every torch fit after it (a notebook, a test
        session) would fail, so the caller's setting is restored here."""
        grad_enabled = torch.is_grad_enabled()
        try:
            self._dump_data_for_proxy_model()
            self._dump_meta_ipt()
            self._train_meta_model()
            tasks = DDGDA.get_task_list(self)
        finally:
            torch.set_grad_enabled(grad_enabled)
            self.working_folder.cleanup()
        if len(tasks) != self.task_count:
            raise RollingError(f"DDG-DA weighted {len(tasks)} of {self.task_count} rolling tasks: the others lack "
                               f"{self.hist_step_n} steps of proxy history (lower hist_step_n)")
        return tasks

    def get_task_list(self) -> list[dict]:
        """The weighted rolling tasks `run` fits."""
        return self.weighted

    def _update_rolling_rec(self) -> None:
        """`VN30Rolling`'s, plus what the meta-model trained on: the split date, the meta-tasks and the last test
        day of theirs (its label reads ``reach`` days further, before the workflow's test)."""
        super()._update_rolling_rec()
        R.get_recorder(experiment_name=self.exp_name, recorder_id=self._rid).log_params(
            **{f"meta_train_{key}": value for key, value in self.meta_train.items()})

    def run(self):
        """Qlib's DDG-DA run: the weighted tasks (`weighted_tasks`), then `VN30Rolling`'s fits and records;
        returns the recorder of the joined results."""
        self.weighted = self.weighted_tasks()
        return super(DDGDA, self).run()
