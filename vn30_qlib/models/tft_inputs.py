"""The TFT's inputs that are not Qlib expressions: known-future calendar facts and static instrument facts.

Known-future inputs must be knowable on day t for days t+1..t+H. Only facts of the trading calendar qualify
(HOSE publishes its holidays ahead), so the known-future slot accepts exactly the names of
`CALENDAR_FEATURES`; `validate_known_future` rejects anything else (a price or volume column there would be
look-ahead). Each feature is scaled to about [0, 1] by fixed constants; the model standardises it with
train-segment statistics.

Days beyond the provider's calendar (the last H days' future) come from the HOSE rule
(`vn30_qlib.data.holidays.hose_trading_days`); days inside it are the provider's own trading days.

Static inputs are the instrument's identity and its sector (the table in `vn30_qlib.data.sectors`),
both as embedding indices where 0 means "not in the table".

Market context (`day_means`) is a past input of the day, the same for every name: each feature's mean over
the day's names. Sector-relative inputs (`relative_to_sector`) are per name: each feature less its sector's
mean of the day.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from vn30_qlib.data.holidays import FIRST_YEAR, LAST_YEAR, hose_trading_days, tet_dates
from vn30_qlib.data.sectors import SECTOR, SECTORS, SYMBOLS

TET_CAP_DAYS = 60  # calendar days to/from Tet beyond which the season no longer matters
HOLIDAY_CAP_DAYS = 10  # trading days to/from a holiday gap, capped
GAP_CAP_DAYS = 10  # calendar days closed before a trading day, capped
PAD_DAYS = 120  # calendar days of HOSE-rule days added on each side of the provider calendar

CALENDAR_FEATURES: tuple[str, ...] = (
    "day_of_week",  # Monday 0 .. Friday 1
    "month",  # January 0 .. December 1
    "month_position",  # k / n for the k-th of the month's n trading days
    "days_to_tet",  # calendar days to the next Tet day, capped at 60, / 60
    "days_from_tet",  # calendar days since the last Tet day, capped at 60, / 60
    "days_to_holiday",  # trading days left before a weekday closure (0: the next session follows one), / 10
    "days_from_holiday",  # trading days since the first session after a weekday closure, / 10
    "closed_before",  # calendar days closed just before this session (2 on a Monday), / 10
)

STATIC_FEATURES: tuple[str, ...] = ("instrument", "sector")
INSTRUMENTS: tuple[str, ...] = ("<unknown>",) + SYMBOLS
SECTOR_NAMES: tuple[str, ...] = ("<unknown>",) + SECTORS
STATIC_CARDINALITIES: tuple[int, ...] = (len(INSTRUMENTS), len(SECTOR_NAMES))


def validate_known_future(names: Iterable[str]) -> list[str]:
    """``names`` as a list, if every one is a calendar fact; a ValueError naming the intruders otherwise. Empty is
    valid: a TFT without calendar inputs (its decoder then sees only its positions)."""
    names = list(names)
    unknown = [name for name in names if name not in CALENDAR_FEATURES]
    if unknown:
        raise ValueError(
            f"known-future inputs must be calendar facts, got {unknown}: a price/volume column is only known "
            f"up to day t and belongs to the past inputs. Valid names: {list(CALENDAR_FEATURES)}"
        )
    return names


def extended_calendar(calendar: Sequence) -> pd.DatetimeIndex:
    """The provider's trading days with `PAD_DAYS` of HOSE-rule days before and after (within the lunar tables)."""
    days = pd.DatetimeIndex(calendar)
    first = max(days[0] - pd.Timedelta(days=PAD_DAYS), pd.Timestamp(FIRST_YEAR, 1, 1))
    last = min(days[-1] + pd.Timedelta(days=PAD_DAYS), pd.Timestamp(LAST_YEAR, 12, 31))
    before = hose_trading_days(first, days[0] - pd.Timedelta(days=1)) if first < days[0] else days[:0]
    after = hose_trading_days(days[-1] + pd.Timedelta(days=1), last) if last > days[-1] else days[:0]
    return pd.DatetimeIndex(before.append(days).append(after), name="datetime")


def calendar_features(days: pd.DatetimeIndex, names: Sequence[str] = CALENDAR_FEATURES) -> pd.DataFrame:
    """`CALENDAR_FEATURES` (selected by ``names``) of each of the consecutive trading days ``days``."""
    names = validate_known_future(names)
    days = pd.DatetimeIndex(days)
    frame = pd.DataFrame(index=days)
    frame["day_of_week"] = days.dayofweek / 4.0
    frame["month"] = (days.month - 1) / 11.0
    month = pd.Series(days.year * 12 + days.month, index=days)
    frame["month_position"] = (month.groupby(month).cumcount() + 1) / month.groupby(month).transform("size")

    tet = tet_dates().sort_values().to_numpy()
    values = days.to_numpy()
    next_tet = tet[np.minimum(np.searchsorted(tet, values, side="left"), len(tet) - 1)]
    prev_tet = tet[np.maximum(np.searchsorted(tet, values, side="right") - 1, 0)]
    to_tet = (next_tet - values) / np.timedelta64(1, "D")
    from_tet = (values - prev_tet) / np.timedelta64(1, "D")
    frame["days_to_tet"] = np.clip(np.where(to_tet >= 0, to_tet, TET_CAP_DAYS), 0, TET_CAP_DAYS) / TET_CAP_DAYS
    frame["days_from_tet"] = np.clip(np.where(from_tet >= 0, from_tet, TET_CAP_DAYS), 0, TET_CAP_DAYS) / TET_CAP_DAYS

    # a weekday closure lies between two consecutive sessions when a weekday separates them
    day_numbers = values.astype("datetime64[D]")
    closed_weekdays = np.busday_count(day_numbers[:-1] + 1, day_numbers[1:])
    gap_after = np.r_[closed_weekdays > 0, False]  # the next session follows a weekday closure
    gap_before = np.r_[False, closed_weekdays > 0]
    frame["days_to_holiday"] = _steps_to_next(gap_after, HOLIDAY_CAP_DAYS) / HOLIDAY_CAP_DAYS
    frame["days_from_holiday"] = _steps_to_next(gap_before[::-1], HOLIDAY_CAP_DAYS)[::-1] / HOLIDAY_CAP_DAYS
    closed = np.r_[1, np.diff(day_numbers).astype("int64")] - 1
    frame["closed_before"] = np.minimum(closed, GAP_CAP_DAYS) / GAP_CAP_DAYS
    return frame[names].astype("float32")


def _steps_to_next(flag: np.ndarray, cap: int) -> np.ndarray:
    """For each position, how many steps ahead the next True of ``flag`` is (0 at a True), capped at ``cap``."""
    index = np.arange(len(flag))
    true_at = np.where(flag, index, len(flag) + cap)
    next_true = np.minimum.accumulate(true_at[::-1])[::-1]
    return np.minimum(next_true - index, cap).astype("float64")


def static_codes(instruments: Iterable[str]) -> np.ndarray:
    """int64 (n, 2) embedding indices (instrument, sector) for each instrument; 0 = not in the VN30 table."""
    instrument_index = {name: i for i, name in enumerate(INSTRUMENTS)}
    sector_index = {name: i for i, name in enumerate(SECTOR_NAMES)}
    rows = [
        (instrument_index.get(name, 0), sector_index[SECTOR[name]] if name in SECTOR else 0)
        for name in instruments
    ]
    return np.asarray(rows, dtype="int64").reshape(-1, 2)


DAY_MEAN_SUFFIX = "_day_mean"


def day_means(features: pd.DataFrame) -> pd.DataFrame:
    """Each column of ``features`` (indexed by datetime and instrument) averaged over the day's names, on every
    row of the day, as ``{name}_day_mean``: the market's state on day t (its return, volatility, volume: an
    equal-weight view of the index) from the day's own features, which a name's features alone do not show."""
    means = features.groupby(level="datetime").transform("mean")
    means.columns = [f"{name}{DAY_MEAN_SUFFIX}" for name in features.columns]
    return means


def is_day_mean(name: str) -> bool:
    """Is ``name`` a past input of `day_means` (a fact of the day, not of a name)?"""
    return name.endswith(DAY_MEAN_SUFFIX)


SECTOR_RELATIVE_SUFFIX = "_vs_sector"


def relative_to_sector(features: pd.DataFrame) -> pd.DataFrame:
    """Each column of ``features`` (indexed by datetime and instrument) less its mean over the day's names of the
    same sector (the table in `vn30_qlib.data.sectors`), as ``{name}_vs_sector``: a bank's move
    against the other banks. A name alone in its sector that day, or outside the table, gets 0."""
    instruments = features.index.get_level_values("instrument")
    sector = pd.Index([SECTOR.get(name, f"?{name}") for name in instruments], name="sector")
    means = features.groupby([features.index.get_level_values("datetime"), sector]).transform("mean")
    relative = features - means.to_numpy()
    relative.columns = [f"{name}{SECTOR_RELATIVE_SUFFIX}" for name in features.columns]
    return relative
