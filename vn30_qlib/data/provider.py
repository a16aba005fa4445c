"""The one writer of Qlib providers: ingest and simulate both go through `write_provider`.

Qlib's day-frequency file format:
- ``calendars/day.txt``: one trading day per line (YYYY-MM-DD);
- ``instruments/{market}.txt``: ``SYMBOL<TAB>first_day<TAB>last_day`` per line;
- ``features/{symbol lower-case}/{field}.day.bin``: little-endian float32, the first value is the calendar
  index of the instrument's first day, then one value per calendar day up to its last day (NaN where the
  instrument has no bar).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

BAR_FIELDS = ("open", "high", "low", "close", "volume")
DERIVED_FIELDS = ("vwap", "factor", "change")
FIELDS = BAR_FIELDS + DERIVED_FIELDS


def derive_fields(bars: pd.DataFrame) -> pd.DataFrame:
    """Add the fields Qlib's exchange and Alpha158 read but a daily OHLCV export lacks.

    - ``vwap``: typical price ``(high + low + close) / 3``; the exports carry no traded value, so the true
      volume-weighted price is unknown and the typical price is its usual proxy.
    - ``factor``: 1.0; the prices are already back-adjusted, so adjusted price == stored price.
    - ``change``: ``close / previous close - 1`` over the instrument's previous bar (NaN on its first bar);
      Qlib's exchange compares it with the price limit.
    """
    out = bars.loc[:, list(BAR_FIELDS)].astype("float64")
    out["vwap"] = (out["high"] + out["low"] + out["close"]) / 3.0
    out["factor"] = 1.0
    out["change"] = out["close"] / out["close"].shift(1) - 1.0
    return out


def read_calendar(provider_dir: str | Path) -> pd.DatetimeIndex:
    """The provider's trading calendar."""
    path = Path(provider_dir).expanduser() / "calendars" / "day.txt"
    return pd.DatetimeIndex(pd.to_datetime(path.read_text().split()), name="datetime")


def read_instruments(provider_dir: str | Path, market: str) -> pd.DataFrame:
    """The ``instruments/{market}.txt`` file as a frame with columns symbol, start, end."""
    path = Path(provider_dir).expanduser() / "instruments" / f"{market}.txt"
    return pd.read_csv(path, sep="\t", names=["symbol", "start", "end"], parse_dates=["start", "end"])


def write_provider(
    out_dir: str | Path,
    bars: Mapping[str, pd.DataFrame],
    calendar: Sequence[pd.Timestamp],
    markets: Mapping[str, Sequence[str]],
    extra_files: Mapping[str, object] | None = None,
) -> Path:
    """Write a complete provider to ``out_dir``, replacing any provider there only once all is written.

    ``bars`` maps a symbol to a frame indexed by date with the `BAR_FIELDS` columns; every date must be in
    ``calendar``. ``markets`` maps a market name to its symbols. ``extra_files`` maps a file name inside the
    provider to a JSON-serialisable object. The same input always gives byte-identical files.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    cal = pd.DatetimeIndex(sorted(pd.to_datetime(list(calendar)))).normalize()
    if cal.has_duplicates:
        raise ValueError("calendar has duplicate days")
    for market, symbols in markets.items():
        unknown = sorted(set(symbols) - set(bars))
        if unknown:
            raise ValueError(f"market {market!r} names symbols without bars: {unknown}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.writing-", dir=out_dir.parent))
    try:
        spans = _write_features(tmp, bars, cal)
        (tmp / "calendars").mkdir()
        (tmp / "calendars" / "day.txt").write_text("".join(f"{d:%Y-%m-%d}\n" for d in cal))
        (tmp / "instruments").mkdir()
        for market, symbols in markets.items():
            lines = [f"{s}\t{spans[s][0]:%Y-%m-%d}\t{spans[s][1]:%Y-%m-%d}\n" for s in sorted(symbols)]
            (tmp / "instruments" / f"{market}.txt").write_text("".join(lines))
        for name, payload in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_features(root: Path, bars: Mapping[str, pd.DataFrame], cal: pd.DatetimeIndex) -> dict:
    spans = {}
    for symbol in sorted(bars):
        frame = derive_fields(bars[symbol].sort_index())
        dates = pd.DatetimeIndex(frame.index).normalize()
        if len(dates) == 0:
            raise ValueError(f"{symbol}: no bars to write")
        outside = dates[~dates.isin(cal)]
        if len(outside):
            raise ValueError(f"{symbol}: {len(outside)} bar dates are not in the calendar, first {outside[0]:%Y-%m-%d}")
        first, last = cal.get_loc(dates[0]), cal.get_loc(dates[-1])
        frame.index = dates
        frame = frame.reindex(cal[first : last + 1])
        folder = root / "features" / symbol.lower()
        folder.mkdir(parents=True)
        for field in FIELDS:
            values = np.concatenate([[first], frame[field].to_numpy(dtype="float64")]).astype("<f4")
            values.tofile(folder / f"{field}.day.bin")
        spans[symbol] = (dates[0], dates[-1])
    return spans


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``tmp`` with two renames; the old provider is restored if the second fails."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(old)
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old)
