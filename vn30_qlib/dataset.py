"""The workflows' dataset (``module_path: vn30_qlib.dataset``): Qlib's `DatasetH` that checks its segments.

Qlib slices a segment that lies past the provider's data into an empty frame, and the run then fails far from the
cause (LightGBM: "Empty data from dataset"; a record: "Empty label.") or, for a test segment, ends with
``IC: nan`` and an empty backtest. Here each segment must hold a day with a label when the data is loaded,
before any model is fitted.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
from qlib.data import D
from qlib.data.dataset import DatasetH
from qlib.data.dataset.handler import DataHandlerLP


class SegmentError(ValueError):
    """A segment of the dataset holds no day with a label."""


def _day(value) -> str:
    return "open" if value is None else f"{pd.Timestamp(value):%Y-%m-%d}"


def check_segments(segments: Mapping[str, object], label: pd.DataFrame, calendar: pd.DatetimeIndex) -> None:
    """Raise `SegmentError` for the first segment of ``segments`` (name -> (start, end) or slice) without a day
    on which ``label`` (the handler's raw labels) has a value; the message gives the segment's dates, the
    provider's last day (``calendar``) and the labelled days."""
    labelled = label.index.get_level_values("datetime")[label.notna().any(axis=1).to_numpy()]
    for name, segment in segments.items():
        start, end = (segment.start, segment.stop) if isinstance(segment, slice) else segment
        start = None if start is None else pd.Timestamp(start)
        end = None if end is None else pd.Timestamp(end)
        in_segment = np.ones(len(labelled), dtype=bool)
        if start is not None:
            in_segment &= labelled >= start
        if end is not None:
            in_segment &= labelled <= end
        if in_segment.any():
            continue
        where = f"segment {name!r} [{_day(start)}, {_day(end)}]"
        days = (f"labelled days run {labelled.min():%Y-%m-%d} .. {labelled.max():%Y-%m-%d}" if len(labelled)
                else "no day has a label")
        last = f"the provider's last day is {calendar[-1]:%Y-%m-%d}" if len(calendar) else "the provider has no days"
        if len(calendar) and start is not None and start > calendar[-1]:
            raise SegmentError(f"{where} starts after the provider's last day {calendar[-1]:%Y-%m-%d}: nothing to "
                               f"fit or predict there ({days}); move the segment or ingest newer data")
        if len(calendar) and end is not None and end < calendar[0]:
            raise SegmentError(f"{where} ends before the provider's first day {calendar[0]:%Y-%m-%d}: nothing to "
                               f"fit or predict there ({days}); move the segment")
        raise SegmentError(f"{where} has no day with a label ({days}; {last}; the label needs the closes of the "
                           "days after it): move the segment inside the labelled days")


class VN30DatasetH(DatasetH):
    """`DatasetH` whose every segment (train, valid, test alike) must hold a day with a label: otherwise a
    `SegmentError` saying which segment, its dates and the provider's last (labelled) day, raised when the
    dataset is built, i.e. before ``qrun`` fits the model."""

    def __init__(self, handler, segments: dict, fetch_kwargs: dict | None = None, **kwargs):
        super().__init__(handler, segments, fetch_kwargs=fetch_kwargs or {}, **kwargs)
        self._check_segments()

    def config(self, handler_kwargs: dict | None = None, **kwargs) -> None:
        super().config(handler_kwargs=handler_kwargs, **kwargs)
        if "segments" in kwargs:
            self._check_segments()

    def _check_segments(self) -> None:
        label = self.handler.fetch(col_set="label", data_key=DataHandlerLP.DK_R)
        check_segments(self.segments, label, pd.DatetimeIndex(D.calendar(freq="day")))
