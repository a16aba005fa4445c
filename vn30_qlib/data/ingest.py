"""Turn one-CSV-per-symbol daily exports (vnstock layout) into a Qlib provider, reporting every defect.

Reading is strict: input the cleaner cannot interpret (missing column, text where a number belongs, an
unparsable date, an empty file, two files for one symbol) stops the ingest with an `IngestError` naming the
file and line, and the existing provider is left untouched. Defects a real download has are cleaned by the
rules in `vn30_qlib.data.cleaning`, each removed or repaired line reported with its reason.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vn30_qlib.data.cleaning import CleaningRules, clean_bars, drop_isolated_dates, flag_missing_days
from vn30_qlib.data.provider import BAR_FIELDS, write_provider

PRICE_FIELDS = ("open", "high", "low", "close")
PRICE_UNITS = {"thousand_vnd": 1.0, "vnd": 1e-3}
INDEX_SYMBOL = "VN30"


class IngestError(ValueError):
    """Input that cannot be ingested; the message names the file and, where there is one, the line."""


@dataclass(frozen=True)
class IngestOptions:
    """How to read the exports. Prices are stored in thousands of VND whatever the input unit."""

    date_column: str = "time"
    price_unit: str = "thousand_vnd"
    rules: CleaningRules = CleaningRules()


def read_export(path: Path, options: IngestOptions, price_scale: float) -> pd.DataFrame:
    """Read one export into columns line, date, open, high, low, close, volume (NaN where a cell is empty)."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or not any(cell.strip() for cell in header):
            raise IngestError(f"{path}: empty file (no header row)")
        header = [cell.strip().lower() for cell in header]
        wanted = (options.date_column.lower(),) + BAR_FIELDS
        missing = [name for name in wanted if name not in header]
        if missing:
            raise IngestError(f"{path}: missing column(s) {missing}; the header has {header}")
        positions = [header.index(name) for name in wanted]
        lines, cells = [], []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < len(header):
                raise IngestError(f"{path}, line {reader.line_num}: {len(row)} fields, the header has {len(header)}")
            lines.append(reader.line_num)
            cells.append([row[p].strip() for p in positions])
    if not cells:
        raise IngestError(f"{path}: empty file (a header and no data rows)")
    text = pd.DataFrame(cells, columns=["date", *BAR_FIELDS], dtype=object)
    frame = pd.DataFrame({"line": np.asarray(lines, dtype="int64")})
    frame["date"] = _parse_dates(text["date"], frame["line"], path, options.date_column)
    for name in BAR_FIELDS:
        values = pd.to_numeric(text[name].replace("", np.nan), errors="coerce")
        bad = values.isna() & text[name].ne("")
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise IngestError(
                f"{path}, line {frame['line'].iat[i]}: non-numeric value {text[name].iat[i]!r} in column {name!r}"
            )
        frame[name] = values.astype("float64") * (price_scale if name in PRICE_FIELDS else 1.0)
    return frame


def _parse_dates(text: pd.Series, lines: pd.Series, path: Path, column: str) -> pd.Series:
    dates = pd.to_datetime(text, errors="coerce", format="ISO8601")
    bad = dates.isna()
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise IngestError(f"{path}, line {lines.iat[i]}: unparsable date {text.iat[i]!r} in column {column!r}")
    return dates.dt.normalize()


def find_exports(source: Path) -> dict[str, Path]:
    """Map each symbol (the upper-cased file stem) to its CSV file; two files for one symbol is an error."""
    if not source.is_dir():
        raise IngestError(f"{source}: source directory does not exist")
    files: dict[str, Path] = {}
    for path in sorted(source.iterdir()):
        if path.suffix.lower() != ".csv" or not path.is_file():
            continue
        symbol = path.stem.strip().upper()
        if symbol in files:
            raise IngestError(f"{source}: two files for symbol {symbol}: {files[symbol].name} and {path.name}")
        files[symbol] = path
    if not files:
        raise IngestError(f"{source}: no .csv files found")
    return files


def ingest(
    source: str | Path,
    out: str | Path,
    index_file: str | Path | None = None,
    options: IngestOptions = IngestOptions(),
) -> dict:
    """Ingest every CSV in ``source`` (and the optional index file) into the provider at ``out``.

    Returns the report also written to ``out/ingest_report.json``.
    """
    if options.price_unit not in PRICE_UNITS:
        raise IngestError(f"unknown price unit {options.price_unit!r}; choose one of {sorted(PRICE_UNITS)}")
    exports = find_exports(Path(source).expanduser())
    if index_file is not None:
        index_path = Path(index_file).expanduser()
        if not index_path.is_file():
            raise IngestError(f"{index_path}: index file does not exist")
        if INDEX_SYMBOL in exports:
            raise IngestError(f"{exports[INDEX_SYMBOL]}: a stock file is named like the index {INDEX_SYMBOL}")
    raw = {
        symbol: read_export(path, options, PRICE_UNITS[options.price_unit]) for symbol, path in exports.items()
    }
    if index_file is not None:
        # The index is quoted in points: the price unit option is for stock prices only.
        raw[INDEX_SYMBOL] = read_export(index_path, options, 1.0)
        exports = {**exports, INDEX_SYMBOL: index_path}

    cleaned, reports = {}, {}
    for symbol in sorted(raw):
        cleaned[symbol], reports[symbol] = clean_bars(raw[symbol], options.rules)
    cleaned = drop_isolated_dates(cleaned, reports, options.rules)
    calendar = pd.DatetimeIndex(sorted(set().union(*(frame.index for frame in cleaned.values()))))
    flag_missing_days(cleaned, reports, calendar)

    empty = [symbol for symbol, frame in cleaned.items() if frame.empty]
    if empty:
        raise IngestError(f"no rows survive cleaning for {empty}; see their defects: {[reports[s] for s in empty]}")
    stocks = sorted(set(cleaned) - {INDEX_SYMBOL})
    markets = {"vn30": stocks, "all": stocks}
    if INDEX_SYMBOL in cleaned:
        markets["index"] = [INDEX_SYMBOL]
    report = {
        "options": {"date_column": options.date_column, "price_unit": options.price_unit,
                    "stored_price_unit": "thousand_vnd", "rules": asdict(options.rules)},
        "calendar": {"days": len(calendar), "first": f"{calendar[0]:%Y-%m-%d}", "last": f"{calendar[-1]:%Y-%m-%d}"},
        "symbols": {
            symbol: {"file": str(exports[symbol]), "sha256": _sha256(exports[symbol]), **reports[symbol]}
            for symbol in sorted(reports)
        },
    }
    bars = {symbol: frame.loc[:, list(BAR_FIELDS)] for symbol, frame in cleaned.items()}
    write_provider(out, bars, calendar, markets, extra_files={"ingest_report.json": report})
    return report


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def format_report(report: dict) -> str:
    """A readable per-symbol table of rows read/written and the count of each removal, repair and flag."""
    header = f"{'symbol':<7}{'read':>6}{'kept':>6}  removed / repaired / flagged"
    lines = [header, "-" * len(header)]
    for symbol, entry in report["symbols"].items():
        parts = []
        for kind in ("removed", "repaired", "flagged"):
            counts = ", ".join(f"{reason} {len(rows)}" for reason, rows in entry[kind].items() if rows)
            parts.append(counts or "-")
        lines.append(f"{symbol:<7}{entry['rows_read']:>6}{entry['rows_kept']:>6}  " + " / ".join(parts))
    cal = report["calendar"]
    lines.append(f"calendar: {cal['days']} trading days, {cal['first']} .. {cal['last']}")
    return "\n".join(lines)
