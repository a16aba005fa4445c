"""Read a provider back through `qlib.init` + `D.features` and prove every field round-trips.

Before Qlib reads anything, every ``.bin`` of every listed instrument is checked on disk: it must exist, fit
the calendar and hold no inf (NaN marks a day without a bar).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import qlib
from qlib.data import D

from vn30_qlib.data.provider import FIELDS, read_calendar, read_instruments, recover_interrupted_swap


def init_qlib(provider_dir: str | Path) -> None:
    """Point Qlib at a provider, with no caches and one worker (small data, reproducible reads)."""
    qlib.init(provider_uri=str(Path(provider_dir).expanduser()), region="cn", kernels=1,
              expression_cache=None, dataset_cache=None)


def check_provider(provider_dir: str | Path) -> dict:
    """Load every instrument of every market through Qlib and compare each field with its ``.bin`` file.

    Returns a summary: per market the symbols and span, per symbol the bars and missing values of each field,
    and ``problems``: a list of human-readable failures (empty when the provider is sound).
    """
    root = Path(provider_dir).expanduser()
    recover_interrupted_swap(root)
    if not (root / "calendars" / "day.txt").is_file():
        raise FileNotFoundError(f"{root}: not a Qlib provider (calendars/day.txt missing)")
    init_qlib(root)
    calendar = read_calendar(root)
    markets = sorted(p.stem for p in (root / "instruments").glob("*.txt"))
    symbols = sorted(set().union(*(read_instruments(root, m)["symbol"] for m in markets)))
    bin_problems = {symbol: _check_bins(root, symbol, calendar) for symbol in symbols}
    problems = [problem for symbol in symbols for problem in bin_problems[symbol]]
    readable = [symbol for symbol in symbols if not bin_problems[symbol]]
    if readable:
        data = D.features(readable, [f"${f}" for f in FIELDS], start_time=calendar[0], end_time=calendar[-1])
        data.columns = list(FIELDS)
    report_path = root / "ingest_report.json"
    ingest_report = json.loads(report_path.read_text())["symbols"] if report_path.exists() else {}
    per_symbol = {}
    for symbol in readable:
        loaded = data.xs(symbol, level="instrument") if symbol in data.index.get_level_values(0) else data.iloc[:0]
        per_symbol[symbol] = {
            "bars": int(loaded["close"].notna().sum()),
            "first": f"{loaded.index.min():%Y-%m-%d}" if len(loaded) else None,
            "last": f"{loaded.index.max():%Y-%m-%d}" if len(loaded) else None,
            "missing": {f: int(loaded[f].isna().sum()) for f in FIELDS},
        }
        for field in FIELDS:
            problem = _compare_with_bin(root, symbol, field, loaded[field], calendar)
            if problem:
                problems.append(problem)
        expected = ingest_report.get(symbol, {}).get("rows_kept")
        if expected is not None and expected != per_symbol[symbol]["bars"]:
            problems.append(f"{symbol}: ingest kept {expected} bars but Qlib returns {per_symbol[symbol]['bars']}")
    market_spans = {}
    for market in markets:
        table = read_instruments(root, market)
        market_spans[market] = {"symbols": len(table), "first": f"{table['start'].min():%Y-%m-%d}",
                                "last": f"{table['end'].max():%Y-%m-%d}"}
    return {"provider": str(root), "calendar_days": len(calendar), "markets": market_spans,
            "symbols": per_symbol, "problems": problems}


def _check_bins(root: Path, symbol: str, calendar: pd.DatetimeIndex) -> list[str]:
    """Problems of the instrument's ``.bin`` files on disk, each starting with the symbol: missing, not
    fitting the calendar, or holding an infinite value (named by field and day)."""
    folder = root / "features" / symbol.lower()
    if not folder.is_dir():
        return [f"{symbol}: listed in instruments/ but {folder} is missing"]
    problems = []
    for field in FIELDS:
        path = folder / f"{field}.day.bin"
        if not path.is_file():
            problems.append(f"{symbol}.{field}: {path} missing")
            continue
        stored = np.fromfile(path, dtype="<f4")
        start = float(stored[0]) if len(stored) else float("nan")
        if len(stored) < 2 or not start.is_integer() or not 0 <= start <= len(calendar) - (len(stored) - 1):
            problems.append(f"{symbol}.{field}: {path} does not fit the {len(calendar)}-day calendar")
            continue
        infinite = np.flatnonzero(np.isinf(stored[1:]))
        if len(infinite):
            day = calendar[int(start) + int(infinite[0])]
            problems.append(f"{symbol}.{field}: non-finite value {stored[1 + infinite[0]]} on {day:%Y-%m-%d} "
                            f"({len(infinite)} in all) in {path}")
    return problems


def _compare_with_bin(root: Path, symbol: str, field: str, loaded: pd.Series, calendar: pd.DatetimeIndex) -> str | None:
    path = root / "features" / symbol.lower() / f"{field}.day.bin"
    stored = np.fromfile(path, dtype="<f4")
    start = int(stored[0])
    expected = pd.Series(stored[1:], index=calendar[start : start + len(stored) - 1])
    got = loaded.reindex(expected.index).to_numpy(dtype="float32")
    same = np.array_equal(np.isnan(got), np.isnan(expected.to_numpy())) and np.allclose(
        got[~np.isnan(got)], expected.to_numpy()[~np.isnan(got)], rtol=1e-6, atol=0)
    return None if same else f"{symbol}.{field}: values read through Qlib differ from {path}"


def format_check(summary: dict) -> str:
    """A readable summary of `check_provider`'s result."""
    lines = [f"provider {summary['provider']}: {summary['calendar_days']} trading days"]
    for market, span in summary["markets"].items():
        lines.append(f"  market {market}: {span['symbols']} symbols, {span['first']} .. {span['last']}")
    lines.append(f"{'symbol':<7}{'bars':>6}  {'first':<11}{'last':<11} missing values per field")
    for symbol, entry in summary["symbols"].items():
        missing = ", ".join(f"{f} {n}" for f, n in entry["missing"].items() if n) or "-"
        lines.append(f"{symbol:<7}{entry['bars']:>6}  {entry['first'] or '-':<11}{entry['last'] or '-':<11} {missing}")
    lines.append("round-trip: OK" if not summary["problems"] else "PROBLEMS:\n  " + "\n  ".join(summary["problems"]))
    return "\n".join(lines)
