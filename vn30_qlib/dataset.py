"""The workflows' dataset (``module_path: vn30_qlib.dataset``): Qlib's `DatasetH` that checks its segments.

Qlib slices a segment that lies past the provider's data into an empty frame, and the run then fails far from the
cause (LightGBM: "Empty data from dataset"; a record: "Empty label.") or, for a test segment, ends with
``IC: nan`` and an empty backtest. Here each segment must hold a day with a label when the data is loaded,
before any model is fitted.

Segments must also be purged: the label of day t reads the closes of later days (t+1 and t+2 for
``Ref($close, -2) / Ref($close, -1) - 1``), so the last labels of train must not read a close of valid (fit would
learn from it) and the last labels of valid must not read a close of test (early stopping would see it). The
reach is parsed from the handler's label expressions and the days counted on the provider's calendar.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd
from qlib.data import D
from qlib.data.dataset import DatasetH
from qlib.data.dataset.handler import DataHandlerLP


class SegmentError(ValueError):
    """A segment of the dataset holds no day with a label, or its labels read prices of the next segment."""


# The segments in time order whose neighbours must be purged: (earlier, later).
PURGED_PAIRS = (("train", "valid"), ("valid", "test"))


def _day(value) -> str:
    return "open" if value is None else f"{pd.Timestamp(value):%Y-%m-%d}"


def _bounds(segment) -> tuple[pd.Timestamp | None, pd.Timestamp | None]:
    start, end = (segment.start, segment.stop) if isinstance(segment, slice) else segment
    return (None if start is None else pd.Timestamp(start)), (None if end is None else pd.Timestamp(end))


def check_segments(segments: Mapping[str, object], label: pd.DataFrame, calendar: pd.DatetimeIndex) -> None:
    """Raise `SegmentError` for the first segment of ``segments`` (name -> (start, end) or slice) without a day
    on which ``label`` (the handler's raw labels) has a value; the message gives the segment's dates, the
    provider's last day (``calendar``) and the labelled days."""
    labelled = label.index.get_level_values("datetime")[label.notna().any(axis=1).to_numpy()]
    for name, segment in segments.items():
        start, end = _bounds(segment)
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


def label_reach(label_expressions: list[str]) -> int:
    """Trading days after day t whose prices the label of day t reads (2 for the VN30 label), parsed by Qlib."""
    from qlib.utils.data import guess_horizon

    return max(guess_horizon([expression]) for expression in label_expressions)


def check_purged(segments: Mapping[str, object], calendar: pd.DatetimeIndex, reach: int) -> None:
    """Raise `SegmentError` when the label of the last day of train (valid) reads a price of a day of valid
    (test), for labels that read ``reach`` trading days ahead on ``calendar``; the message gives the latest end
    that is purged. Pairs of which a segment is missing are not checked."""
    for earlier, later in PURGED_PAIRS:
        if earlier not in segments or later not in segments:
            continue
        _, end = _bounds(segments[earlier])
        start, _ = _bounds(segments[later])
        last = calendar.searchsorted(calendar[-1] if end is None else end, side="right") - 1
        first = 0 if start is None else calendar.searchsorted(start, side="left")
        if last < 0 or first >= len(calendar) or last + reach < first:
            continue
        read = calendar[min(last + reach, len(calendar) - 1)]
        latest = f"{calendar[first - reach - 1]:%Y-%m-%d}" if first - reach - 1 >= 0 else "before the calendar"
        raise SegmentError(
            f"segment {earlier!r} is not purged from {later!r}: the label of its last day {calendar[last]:%Y-%m-%d} "
            f"reads the close of {read:%Y-%m-%d}, and {later!r} starts {calendar[first]:%Y-%m-%d} (the label reads "
            f"{reach} trading days ahead); end {earlier!r} on or before {latest}")


class VN30DatasetH(DatasetH):
    """`DatasetH` whose every segment (train, valid, test alike) must hold a day with a label, and whose train,
    valid and test are purged by the label's reach: otherwise a `SegmentError` saying which segment, its dates
    and the provider's last (labelled) day, or the latest purged end, raised when the dataset is built, i.e.
    before ``qrun`` fits the model."""

    def __init__(self, handler, segments: dict, fetch_kwargs: dict | None = None, **kwargs):
        super().__init__(handler, segments, fetch_kwargs=fetch_kwargs or {}, **kwargs)
        self._check_segments()

    def config(self, handler_kwargs: dict | None = None, **kwargs) -> None:
        super().config(handler_kwargs=handler_kwargs, **kwargs)
        if "segments" in kwargs:
            self._check_segments()

    def _check_segments(self) -> None:
        label = self.handler.fetch(col_set="label", data_key=DataHandlerLP.DK_R)
        calendar = pd.DatetimeIndex(D.calendar(freq="day"))
        check_segments(self.segments, label, calendar)
        check_purged(self.segments, calendar, label_reach(self.handler.data_loader.fields["label"][0]))
