"""Trading days of Vietnam's HOSE exchange: weekdays less the Vietnamese public holidays.

The exchange closes on the public holidays of the Labour Code:

- New Year: 1 January;
- Tet (Lunar New Year): a break of five weekdays, see `tet_break`;
- Hung Kings' commemoration: the 10th day of the 3rd lunar month;
- Reunification day and Labour day: 30 April and 1 May;
- National day: 2 September, plus one adjacent day from 2021 on (Labour Code 2019), see `_national_day`.

A fixed holiday that falls on a Saturday or Sunday gives the next weekday that is not already a holiday off
(the compensatory day), holidays taken in date order; so 2023's Hung Kings day (Sat 29 April) and
Reunification day (Sun 30 April) close 2 and 3 May after Labour day on Mon 1 May, as HOSE did.

The lunar dates come from hard-coded tables (`TET`, `HUNG_KINGS`) for 2010-2035, computed for Vietnam's
time zone (UTC+7), which is why Tet 2030 is 2 February here and 3 February in China. Ad-hoc closures the
government announced for single years (day swaps, extra bridge days) are not modelled.
"""
from __future__ import annotations

import pandas as pd

# Tet (1st day of the 1st lunar month), Gregorian date, by Gregorian year.
TET: dict[int, str] = {
    2010: "2010-02-14", 2011: "2011-02-03", 2012: "2012-01-23", 2013: "2013-02-10", 2014: "2014-01-31",
    2015: "2015-02-19", 2016: "2016-02-08", 2017: "2017-01-28", 2018: "2018-02-16", 2019: "2019-02-05",
    2020: "2020-01-25", 2021: "2021-02-12", 2022: "2022-02-01", 2023: "2023-01-22", 2024: "2024-02-10",
    2025: "2025-01-29", 2026: "2026-02-17", 2027: "2027-02-06", 2028: "2028-01-26", 2029: "2029-02-13",
    2030: "2030-02-02", 2031: "2031-01-23", 2032: "2032-02-11", 2033: "2033-01-31", 2034: "2034-02-19",
    2035: "2035-02-08",
}

# Hung Kings' commemoration (10th day of the 3rd lunar month), Gregorian date, by Gregorian year.
HUNG_KINGS: dict[int, str] = {
    2010: "2010-04-23", 2011: "2011-04-12", 2012: "2012-03-31", 2013: "2013-04-19", 2014: "2014-04-09",
    2015: "2015-04-28", 2016: "2016-04-16", 2017: "2017-04-06", 2018: "2018-04-25", 2019: "2019-04-14",
    2020: "2020-04-02", 2021: "2021-04-21", 2022: "2022-04-10", 2023: "2023-04-29", 2024: "2024-04-18",
    2025: "2025-04-07", 2026: "2026-04-26", 2027: "2027-04-16", 2028: "2028-04-04", 2029: "2029-04-23",
    2030: "2030-04-12", 2031: "2031-04-01", 2032: "2032-04-19", 2033: "2033-04-09", 2034: "2034-04-28",
    2035: "2035-04-17",
}

FIRST_YEAR, LAST_YEAR = min(TET), max(TET)
TET_BREAK_WEEKDAYS = 5
NATIONAL_DAY_EXTRA_FROM = 2021


def tet_dates() -> pd.DatetimeIndex:
    """The Tet (lunar new year day) dates of `TET`, e.g. for calendar features such as days to the break."""
    return pd.DatetimeIndex(pd.to_datetime(list(TET.values())), name="tet")


def tet_break(year: int) -> pd.DatetimeIndex:
    """The weekdays HOSE is closed for Tet in ``year``.

    Rule: the 5 weekdays starting at the first weekday on or after Tet - 2 days (the day before Tet eve).
    That reproduces HOSE's closures, e.g. Tet on Sat 10 Feb 2024 -> Thu 8 .. Wed 14 Feb; Tet on Sun 22 Jan
    2023 -> Fri 20 .. Thu 26 Jan; Tet on Tue 1 Feb 2022 -> Mon 31 Jan .. Fri 4 Feb; Tet on Mon 8 Feb 2016
    -> Mon 8 .. Fri 12 Feb.
    """
    _check_year(year)
    first = pd.Timestamp(TET[year]) - pd.Timedelta(days=2)
    return pd.bdate_range(first, periods=TET_BREAK_WEEKDAYS)


def _national_day(year: int) -> list[pd.Timestamp]:
    """2 September and, from 2021 on, one adjacent day.

    Which adjacent day is set each year by the government; the rule here makes a long weekend where one is
    at hand and matches 2021-2025: 1 September when 2 September is a Tuesday, Friday, Saturday or Sunday,
    3 September when it is a Monday, Wednesday or Thursday.
    """
    day = pd.Timestamp(year, 9, 2)
    if year < NATIONAL_DAY_EXTRA_FROM:
        return [day]
    extra = day - pd.Timedelta(days=1) if day.dayofweek in (1, 4, 5, 6) else day + pd.Timedelta(days=1)
    return sorted([day, extra])


def holidays(year: int) -> pd.DatetimeIndex:
    """The weekdays of ``year`` on which HOSE is closed (Tet break and fixed holidays with compensation)."""
    _check_year(year)
    fixed = sorted(
        [pd.Timestamp(year, 1, 1), pd.Timestamp(HUNG_KINGS[year]), pd.Timestamp(year, 4, 30), pd.Timestamp(year, 5, 1)]
        + _national_day(year)
    )
    closed = set(tet_break(year)) | {d for d in fixed if d.dayofweek < 5}
    for day in fixed:
        if day.dayofweek >= 5:  # compensatory day: the next weekday not already closed
            comp = day + pd.offsets.BDay(1)
            while comp in closed:
                comp += pd.offsets.BDay(1)
            closed.add(comp)
    return pd.DatetimeIndex(sorted(closed))


def hose_trading_days(start: str, end: str) -> pd.DatetimeIndex:
    """HOSE trading days from ``start`` to ``end`` inclusive: weekdays that are not `holidays`.

    Raises ValueError outside the years of the lunar tables (2010-2035).
    """
    start_ts, end_ts = pd.Timestamp(start).normalize(), pd.Timestamp(end).normalize()
    days = pd.bdate_range(start_ts, end_ts)
    closed = pd.DatetimeIndex([]) if days.empty else pd.DatetimeIndex(
        [d for y in range(start_ts.year, end_ts.year + 1) for d in holidays(y)]
    )
    return pd.DatetimeIndex(days[~days.isin(closed)], name="datetime")


def _check_year(year: int) -> None:
    if not FIRST_YEAR <= year <= LAST_YEAR:
        raise ValueError(f"no lunar holiday table for {year}; the tables cover {FIRST_YEAR}-{LAST_YEAR}")
