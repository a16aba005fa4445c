"""Defect rules for daily bars. Every row removed or repaired is reported by its CSV line and a reason.

The defects below were all found in real vnstock/TCBS exports of the VN30 stocks:

removed
  nonfinite_value        inf, -inf, or a number beyond float32's range (e.g. a volume of 1e50): the provider
                         stores float32, where it would become inf
  missing_value          an empty open/high/low/close/volume cell
  weekend_date           a bar dated Saturday or Sunday (HOSE never trades then)
  duplicate_row          a second copy of a bar already read (same date, same values): paginated downloads
                         repeat whole blocks, e.g. every file repeats 2018-09-28
  conflicting_duplicate  two bars for one date with different values: neither can be trusted, both go
  nonpositive_price      a price <= 0 (e.g. a close of 0.00)
  negative_volume        a volume < 0
  corrupt_bar            open/close outside [low, high] by more than ``envelope_tolerance`` (e.g. an open,
                         high and low three times the close): the bar itself is wrong
  price_spike            a close that jumps by more than ``spike_threshold`` and comes back the next day
  zero_volume            no shares traded: the prices are a placeholder (19 files carry flat zero-volume
                         bars on 2018-01-23/24); without the bar Qlib's exchange sees the day as suspended
  isolated_date          a date only one file has while at least ``isolated_min_active`` files cover it:
                         a stray bar on a market holiday
  not_a_stock_day        an index bar on a day no stock traded (e.g. an index export that runs past the
                         stock exports' last day): the calendar is the stocks' trading days
repaired
  reordered              a bar that appears after later dates (downloads re-append blocks): rows are sorted
  ohlc_envelope          open or close a little outside [low, high] (rounding of the back-adjustment):
                         high := max(open, high, low, close), low := min(open, high, low, close)
flagged (kept as they are, reported)
  beyond_price_limit     |close / previous close - 1| above the HOSE ±7 % limit (+ ``limit_tolerance``):
                         history from before a listing moved to HOSE (UPCoM ±15 %, HNX ±10 %) or a
                         first trading day
and per symbol ``missing_days``: trading days of the calendar inside its span for which it has no bar.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from vn30_qlib.data.provider import BAR_FIELDS, FLOAT32_MAX

PRICES = ["open", "high", "low", "close"]
REMOVED = ("nonfinite_value", "missing_value", "weekend_date", "duplicate_row", "conflicting_duplicate",
           "nonpositive_price", "negative_volume", "zero_volume", "corrupt_bar", "price_spike", "isolated_date",
           "not_a_stock_day")
REPAIRED = ("reordered", "ohlc_envelope")
FLAGGED = ("beyond_price_limit",)


@dataclass(frozen=True)
class CleaningRules:
    """Thresholds of the defect rules (fractions, not percent)."""

    price_limit: float = 0.07
    limit_tolerance: float = 0.005
    envelope_tolerance: float = 0.15
    spike_threshold: float = 0.25
    isolated_min_active: int = 5


def clean_bars(raw: pd.DataFrame, rules: CleaningRules) -> tuple[pd.DataFrame, dict]:
    """Apply the per-file rules to ``raw`` (columns line, date and the bar fields, in file order).

    Returns the cleaned bars indexed by date (the ``line`` column kept) and the symbol's report.
    """
    report = {"rows_read": len(raw), "removed": {r: [] for r in REMOVED},
              "repaired": {r: [] for r in REPAIRED}, "flagged": {r: [] for r in FLAGGED}}
    frame = raw  # no step below changes a frame in place: ``raw`` stays as it was

    def remove(mask: pd.Series, reason: str) -> None:
        nonlocal frame
        if mask.any():  # a copy only where rows go: memory stays near one frame on clean input
            report["removed"][reason].extend(frame.loc[mask, "line"].tolist())
            frame = frame.loc[~mask]

    remove(_any_column(frame, BAR_FIELDS, lambda v: np.abs(v) > FLOAT32_MAX), "nonfinite_value")
    remove(_any_column(frame, BAR_FIELDS, np.isnan), "missing_value")
    remove(frame["date"].dt.day_of_week >= 5, "weekend_date")
    remove(_conflicting_dates(frame), "conflicting_duplicate")
    remove(frame["date"].duplicated(keep="first"), "duplicate_row")

    earlier_max = frame["date"].cummax().shift(1)
    report["repaired"]["reordered"].extend(frame.loc[frame["date"] < earlier_max, "line"].tolist())
    frame = frame.sort_values("date", kind="stable")

    remove((frame[PRICES] <= 0).any(axis=1), "nonpositive_price")
    remove(frame["volume"] < 0, "negative_volume")
    remove(frame["volume"] == 0, "zero_volume")
    violation = _envelope_violation(frame)
    remove(violation > rules.envelope_tolerance, "corrupt_bar")
    violation = violation.loc[frame.index]
    envelope = violation > 0
    if envelope.any():
        report["repaired"]["ohlc_envelope"].extend(frame.loc[envelope, "line"].tolist())
        frame = frame.copy()
        frame.loc[envelope, "high"] = frame.loc[envelope, PRICES].max(axis=1)
        frame.loc[envelope, "low"] = frame.loc[envelope, PRICES].min(axis=1)
    remove(_reverting_spikes(frame["close"], rules.spike_threshold), "price_spike")

    frame = frame.set_index("date")
    frame.index.name = "datetime"
    change = frame["close"] / frame["close"].shift(1) - 1.0
    beyond = change.abs() > rules.price_limit + rules.limit_tolerance
    report["flagged"]["beyond_price_limit"].extend(frame.loc[beyond, "line"].tolist())
    for kind in ("removed", "repaired", "flagged"):
        for reason in report[kind]:
            report[kind][reason] = sorted(int(line) for line in report[kind][reason])
    return frame, report


def _conflicting_dates(frame: pd.DataFrame) -> pd.Series:
    """Rows whose date has another row with different values (NaN-free bars): each row is compared with the
    first row of its date, one column at a time, so memory stays a few arrays whatever the duplication."""
    codes, _ = pd.factorize(frame["date"])
    _, first_row = np.unique(codes, return_index=True)
    reference = first_row[codes]
    differs = np.zeros(len(frame), dtype=bool)
    for column in BAR_FIELDS:
        values = frame[column].to_numpy()
        differs |= values != values[reference]
    conflicted = np.zeros(len(first_row), dtype=bool)
    conflicted[codes[differs]] = True
    return pd.Series(conflicted[codes], index=frame.index)


def _any_column(frame: pd.DataFrame, columns, test) -> pd.Series:
    """Rows where ``test`` holds in any of ``columns``, one column at a time (no copy of the frame)."""
    hit = np.zeros(len(frame), dtype=bool)
    for column in columns:
        hit |= test(frame[column].to_numpy())
    return pd.Series(hit, index=frame.index)


def _envelope_violation(frame: pd.DataFrame) -> pd.Series:
    """How far (as a fraction) open/close/low stick out of the bar's [low, high] range; 0 when consistent."""
    o, h, l, c = (frame[k] for k in PRICES)
    above = np.maximum(o, c) / h - 1.0
    below = l / np.minimum(o, c) - 1.0
    inverted = l / h - 1.0
    return pd.concat([above, below, inverted], axis=1).max(axis=1).clip(lower=0.0)


def _reverting_spikes(close: pd.Series, threshold: float) -> pd.Series:
    """A close that moves more than ``threshold`` from both neighbours in opposite directions."""
    before = close / close.shift(1) - 1.0
    after = close.shift(-1) / close - 1.0
    return (before.abs() > threshold) & (after.abs() > threshold) & (np.sign(before) != np.sign(after))


def drop_isolated_dates(cleaned: dict[str, pd.DataFrame], reports: dict[str, dict], rules: CleaningRules) -> dict:
    """Remove bars on dates that only one file has while many files cover that date (a stray holiday bar)."""
    spans = {s: (f.index.min(), f.index.max()) for s, f in cleaned.items() if not f.empty}
    counts = pd.Series(np.concatenate([f.index.to_numpy() for f in cleaned.values()])).value_counts()
    lonely = counts.index[counts == 1]
    out = dict(cleaned)
    for symbol, frame in cleaned.items():
        for date in frame.index.intersection(lonely):
            active = sum(first <= date <= last for first, last in spans.values())
            if active >= rules.isolated_min_active:
                reports[symbol]["removed"]["isolated_date"].append(int(frame.at[date, "line"]))
                out[symbol] = out[symbol].drop(index=date)
    return out


def drop_days_outside(frame: pd.DataFrame, report: dict, calendar: pd.DatetimeIndex) -> tuple[pd.DataFrame, pd.DatetimeIndex]:
    """Remove the bars of ``frame`` (an index) dated outside ``calendar`` (the stocks' trading days) as
    ``not_a_stock_day``; returns the kept bars and the dropped days."""
    outside = ~frame.index.isin(calendar)
    report["removed"]["not_a_stock_day"] = sorted(int(line) for line in frame.loc[outside, "line"])
    return frame.loc[~outside], frame.index[outside]


def flag_missing_days(cleaned: dict[str, pd.DataFrame], reports: dict[str, dict], calendar: pd.DatetimeIndex) -> None:
    """Finish each report: rows kept, first and last day, and the calendar days inside its span it lacks."""
    for symbol, frame in cleaned.items():
        report = reports[symbol]
        removed = sum(len(lines) for lines in report["removed"].values())
        assert removed + len(frame) == report["rows_read"], f"{symbol}: rows lost without a reason"
        report["rows_kept"] = len(frame)
        if frame.empty:
            report.update(first_day=None, last_day=None, missing_days=[])
            continue
        span = calendar[(calendar >= frame.index[0]) & (calendar <= frame.index[-1])]
        report.update(
            first_day=f"{frame.index[0]:%Y-%m-%d}",
            last_day=f"{frame.index[-1]:%Y-%m-%d}",
            missing_days=[f"{d:%Y-%m-%d}" for d in span.difference(frame.index)],
        )
