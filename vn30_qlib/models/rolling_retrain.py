"""Rolling retraining as one Qlib model, so that the loop, the model store and the report take a rolled workflow
like any other (``workflows/lgb_rolling_vn30.yaml``: store entry ``lgb_rolling`` beside ``lgb``).

`vn30-qlib rolling` runs Qlib's own `Rolling` and leaves its results in the recorder; `RollingRetrain` fits the
same tasks: the test segment cut into windows of ``step`` trading days, one model per window trained on the data
before it, each earlier segment cut ``reach + 1`` trading days before the window (`rolled_segments`, Qlib's
`RollingGen`), the handler shared and its processors fitted on the workflow's train segment as there.
"""
from __future__ import annotations

import copy

import pandas as pd
from qlib.data import D
from qlib.data.dataset import DatasetH
from qlib.log import get_module_logger
from qlib.model.base import Model
from qlib.utils import init_instance_by_config

from vn30_qlib.dataset import label_reach
from vn30_qlib.models.kwargs_check import checked_kwargs
from vn30_qlib.rolling.bridge import rolled_segments

logger = get_module_logger("RollingRetrain")


@checked_kwargs
class RollingRetrain(Model):
    """``model`` (a Qlib model config) refitted every ``step`` trading days of the test segment, on an expanding
    train segment (``train_window`` None) or its last ``train_window`` trading days.

    ``predict`` on the test segment gives each day the prediction of the member whose window holds it; a day after
    the last window (a later signal day) gets the last member's, the model trained on the newest data.
    """

    def __init__(self, model: dict, step: int = 20, train_window: int | None = None):
        if not isinstance(model, dict) or "class" not in model:
            raise ValueError(f"RollingRetrain: model must be a Qlib model config with a 'class', got {model!r}")
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"RollingRetrain: step must be 1 or more trading days, got {step!r}")
        if train_window is not None and (not isinstance(train_window, int) or train_window < 1):
            raise ValueError(f"RollingRetrain: train_window must be None or 1 or more trading days, got {train_window!r}")
        self.model, self.step, self.train_window = model, step, train_window
        self.windows: list[tuple[pd.Timestamp, pd.Timestamp]] = []
        self.members: list[Model] = []

    def fit(self, dataset: DatasetH, **kwargs) -> None:
        reach = label_reach(dataset.handler.data_loader.fields["label"][0])
        calendar = pd.DatetimeIndex(D.calendar(freq="day"))
        tasks = rolled_segments(dataset.segments, self.step, self.train_window, reach, calendar)
        fit_kwargs = self.window_fit_kwargs(dataset, tasks)
        self.windows, self.members = [], []
        for number, (segments, extra) in enumerate(zip(tasks, fit_kwargs), start=1):
            member = init_instance_by_config(copy.deepcopy(self.model))
            logger.info(f"window {number}/{len(tasks)}: test {segments['test'][0]:%Y-%m-%d} .. "
                        f"{segments['test'][1]:%Y-%m-%d}, train {segments['train'][0]:%Y-%m-%d} .. "
                        f"{segments['train'][1]:%Y-%m-%d}")
            member.fit(type(dataset)(handler=dataset.handler, segments=segments), **extra)
            self.windows.append(segments["test"])
            self.members.append(member)

    def window_fit_kwargs(self, dataset: DatasetH, tasks: list[dict]) -> list[dict]:
        """Extra keyword arguments of each window's ``fit``: none here; DDG-DA's reweighter in `DDGDARetrain`."""
        return [{} for _ in tasks]

    def predict(self, dataset: DatasetH, segment: str = "test") -> pd.Series:
        if not self.members:
            raise ValueError("RollingRetrain: fit the model before predict")
        if segment != "test":
            raise ValueError(f"RollingRetrain predicts the test segment only (each member its window), not {segment!r}")
        start, end = (pd.Timestamp(day) for day in dataset.segments["test"])
        days = D.calendar(start_time=start, end_time=end, freq="day")
        if len(days) and pd.Timestamp(days[0]) < self.windows[0][0]:
            raise ValueError(f"RollingRetrain: the test segment's first day {pd.Timestamp(days[0]):%Y-%m-%d} comes "
                             f"before the first window {self.windows[0][0]:%Y-%m-%d}: no member was trained for it "
                             "out of sample")
        parts = []
        for number, member in enumerate(self.members):
            first = max(self.windows[number][0], start)
            last = end if number == len(self.members) - 1 else \
                min(end, self.windows[number + 1][0] - pd.Timedelta(days=1))
            if first <= last:
                part = type(dataset)(handler=dataset.handler, segments={"test": (first, last)})
                parts.append(member.predict(part, segment="test"))
        return pd.concat(parts).sort_index()
