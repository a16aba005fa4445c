"""Rolling retraining (RR) of a VN30 workflow through Qlib's own `qlib.contrib.rolling.base.Rolling`.

Qlib's `Rolling` reads its YAML with a plain safe loader (no ``BASE_CONFIG_PATH``, no Jinja) and bends the task
to its CSI300 examples. `VN30Rolling` keeps Qlib's machinery (`RollingGen` splits the test into ``step``-day
windows, `TrainerR` fits one recorder per window, `RollingEnsemble` joins their predictions, the workflow's
records evaluate the joined predictions) and changes only what does not fit the VN30 workflows:

- the workflow is read as ``qrun`` reads it (`vn30_qlib.workflow_config.load_workflow`);
- the label is the handler's own (Qlib would overwrite it with ``Ref($close, -h-1) / Ref($close, -1) - 1``), and
  every segment before a task's test window is cut ``reach + 1`` trading days before it, ``reach`` being the
  days the label reads ahead (2): the last train/valid label reads closes before the test window opens. Qlib
  cuts ``horizon + 1`` days, which lets the last label read the close of the test's first day;
- the handler is built once and shared by the tasks in memory (Qlib pickles it next to the YAML); its
  processors stay fitted on the workflow's train segment, which ends before every task's test window;
- a train segment starting on the provider's first day moves to its second (`RollingGen` asserts that no
  segment starts on calendar index 0);
- the last task's test window ends on the workflow's test end (Qlib lets it run a step past it);
- the joined predictions get the workflow's records, with ``<DATASET>`` the workflow's test segment; records
  that need one ``<MODEL>`` (feature importance, diagnostics) are left to the per-task recorders.
"""
from __future__ import annotations

import uuid
from copy import deepcopy
from functools import cached_property
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
from qlib.contrib.rolling.base import Rolling
from qlib.data import D
from qlib.data.dataset.handler import DataHandlerLP
from qlib.log import get_module_logger
from qlib.utils import fill_placeholder, get_cls_kwargs, init_instance_by_config
from qlib.utils.data import deepcopy_basic_type
from qlib.workflow import R
from qlib.workflow.record_temp import SignalRecord
from qlib.workflow.task.gen import RollingGen, task_generator

from vn30_qlib.dataset import label_reach
from vn30_qlib.workflow_config import load_workflow


class RollingError(ValueError):
    """A rolling run asked for something the workflow or the provider cannot give (the CLI exits 2)."""


Segments = dict[str, tuple[pd.Timestamp, pd.Timestamp]]


def first_segments(segments: Mapping[str, Sequence], train_window: int | None, calendar: pd.DatetimeIndex) -> Segments:
    """The workflow's segments as the first rolling task starts from: train from the provider's second day at the
    earliest (`RollingGen` asserts that no segment starts on calendar index 0), or its last ``train_window``
    trading days."""
    segments = {name: (pd.Timestamp(start), pd.Timestamp(end)) for name, (start, end) in segments.items()}
    train_start, train_end = segments["train"]
    first = max(int(calendar.searchsorted(train_start)), 1)
    if train_window is not None:
        last = int(calendar.searchsorted(train_end, side="right")) - 1
        if last - train_window + 1 < 1:
            raise RollingError(f"train window of {train_window} trading days is longer than the {last} days from "
                               f"the provider's second day to the train end {train_end:%Y-%m-%d}")
        first = last - train_window + 1
    segments["train"] = (calendar[first], train_end)
    return segments


def rolled_segments(segments: Mapping[str, Sequence], step: int, train_window: int | None, reach: int,
                    calendar: pd.DatetimeIndex) -> list[Segments]:
    """Each rolling task's segments, as Qlib's `RollingGen` rolls them (Qlib initialised on the provider): test
    windows of ``step`` trading days, the last ending on the workflow's test end; train expanding (``train_window``
    None) or sliding; every segment before a window cut ``reach + 1`` trading days before it."""
    first = first_segments(segments, train_window, calendar)
    rtype = RollingGen.ROLL_EX if train_window is None else RollingGen.ROLL_SD
    generator = RollingGen(step=step, rtype=rtype, trunc_days=reach + 1)
    test_end = calendar[calendar.searchsorted(first["test"][1], side="right") - 1]
    rolled = []
    for task in task_generator({"dataset": {"kwargs": {"segments": first}}}, generator):
        window = task["dataset"]["kwargs"]["segments"]
        start, end = window["test"]
        rolled.append({**window, "test": (start, test_end if end is None or end > test_end else end)})
    return rolled


class VN30Rolling(Rolling):
    """Qlib's `Rolling` on a VN30 workflow YAML: ``step`` trading days per task, the train segment expanding
    (``train_window`` None) or sliding with ``train_window`` trading days; results in experiment ``exp_name``."""

    method = "rr"  # the name in the default experiment name and the recorder's params

    def __init__(self, workflow: str | Path | dict, provider: str | Path | None, step: int,
                 train_window: int | None = None, exp_name: str | None = None,
                 handler: DataHandlerLP | None = None, **kwargs):
        """``workflow``: a YAML path (rendered on ``provider``), or a rendered workflow config; ``handler``: the
        workflow's handler already built (a model fitting itself on its dataset: `DDGDARetrain`), else built
        from the config."""
        if step < 1:
            raise RollingError(f"step must be 1 or more trading days, got {step}")
        if train_window is not None and train_window < 1:
            raise RollingError(f"train window must be 1 or more trading days, got {train_window}")
        in_memory = isinstance(workflow, dict)
        self.workflow_config = (deepcopy(workflow) if in_memory
                                else load_workflow(workflow, {"VN30_PROVIDER": str(provider)}))
        self.check_workflow(step)
        if handler is not None:
            self.shared_handler = handler
        self.train_window = train_window
        self.calendar = pd.DatetimeIndex(D.calendar(freq="day"))
        # Qlib cuts `horizon + 1` days before each test window: with horizon = reach, the last label before it
        # reads closes before its first day
        reach = label_reach(self.shared_handler.data_loader.fields["label"][0])
        name = self.workflow_config.get("experiment_name") or ("workflow" if in_memory else Path(workflow).stem)
        super().__init__(conf_path="(in memory)" if in_memory else workflow,
                         exp_name=exp_name or f"{name}_{self.method}", horizon=reach, step=step, **kwargs)
        self.rolling_exp = f"{self.exp_name}_tasks_{pd.Timestamp.now():%Y%m%d%H%M%S}_{uuid.uuid4().hex[:6]}"
        self.logger = get_module_logger("VN30Rolling")

    def check_workflow(self, step: int) -> None:
        """Refuse a workflow this method cannot roll, before its handler is built: any model rolls here."""

    def _raw_conf(self) -> dict:
        return deepcopy(self.workflow_config)

    @cached_property
    def shared_handler(self):
        """The workflow's handler, loaded once for every task (Qlib's Rolling pickles it to a file instead)."""
        return init_instance_by_config(self.workflow_config["task"]["dataset"]["kwargs"]["handler"])

    def basic_task(self, enable_handler_cache: bool | None = True) -> dict:
        """The workflow's task with Qlib-aligned segments; with ``enable_handler_cache`` the shared handler."""
        task = deepcopy(self.workflow_config["task"])
        task["dataset"]["kwargs"]["segments"] = first_segments(task["dataset"]["kwargs"]["segments"],
                                                               self.train_window, self.calendar)
        if enable_handler_cache:
            task["dataset"]["kwargs"]["handler"] = self.shared_handler
        return task

    @property
    def test_segment(self) -> tuple[pd.Timestamp, pd.Timestamp]:
        return first_segments(self.workflow_config["task"]["dataset"]["kwargs"]["segments"], self.train_window,
                              self.calendar)["test"]

    def get_task_list(self) -> list[dict]:
        """One task per ``step`` test days, each cut ``reach + 1`` days before its test window."""
        base = self.basic_task()
        tasks = []
        for segments in rolled_segments(self.workflow_config["task"]["dataset"]["kwargs"]["segments"], self.step,
                                        self.train_window, self.horizon, self.calendar):
            task = deepcopy_basic_type(base)  # a deepcopy would drop the handler's data
            task["dataset"]["kwargs"]["segments"] = segments
            task["record"] = ["qlib.workflow.record_temp.SignalRecord"]
            tasks.append(task)
        test_windows = [task["dataset"]["kwargs"]["segments"]["test"] for task in tasks]
        self.logger.info(f"{len(tasks)} rolling tasks of {self.step} days, test windows "
                         f"{test_windows[0][0]:%Y-%m-%d} .. {test_windows[-1][1]:%Y-%m-%d}")
        self.task_count = len(tasks)
        return tasks

    def _update_rolling_rec(self) -> None:
        """The workflow's records on the joined predictions (see the module docstring)."""
        recorder = R.get_recorder(experiment_name=self.exp_name, recorder_id=self._rid)
        recorder.log_params(workflow=str(Path(self.conf_path).resolve()), method=self.method, step=self.step,
                            train_window="expanding" if self.train_window is None else f"{self.train_window}d",
                            tasks=self.task_count, rolling_exp=self.rolling_exp)
        recorder.save_objects(config=self.workflow_config)
        task = self.basic_task()
        dataset_config = {**task["dataset"], "kwargs": {**task["dataset"]["kwargs"],
                                                       "segments": {"test": self.test_segment}}}
        dataset = init_instance_by_config(dataset_config)
        records = self.workflow_config["task"].get("record", [])
        for record in records if isinstance(records, list) else [records]:
            if issubclass(get_cls_kwargs(record, default_module="qlib.workflow.record_temp")[0], SignalRecord):
                continue  # the joined pred.pkl and label.pkl are already there
            if "<MODEL>" in str(record.get("kwargs", {})):
                self.logger.info(f"{record.get('class')} needs one model: see the task recorders in experiment "
                                 f"{self.rolling_exp}")
                continue
            filled = fill_placeholder(deepcopy_basic_type(record), {"<DATASET>": dataset})
            init_instance_by_config(filled, recorder=recorder, default_module="qlib.workflow.record_temp").generate()
        self.logger.info(f"results in experiment {self.exp_name}, recorder {self._rid}")

    def run(self):
        """Fit every task, join the predictions, evaluate them; returns the recorder of the joined results."""
        super().run()
        return R.get_recorder(experiment_name=self.exp_name, recorder_id=self._rid)
