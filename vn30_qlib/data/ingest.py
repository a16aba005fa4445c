"""Turn one-CSV-per-symbol daily exports (vnstock layout) into a Qlib provider, reporting every defect.

Reading is strict: input the cleaner cannot interpret (missing or doubled column, a row with too few or too
many fields, text where a number belongs, an unparsable date, text that is not UTF-8, an empty file, two files
for one symbol, a file name that is not a symbol) stops the ingest with an `IngestError` naming the file and
line, and the existing provider is left untouched. Defects a real download has are cleaned by the rules in
`vn30_qlib.data.cleaning`, each removed or repaired line reported with its reason.

- Symbols are file stems matching `SYMBOL_PATTERN` (letters, digits, ``.``, ``_``, ``-``, not starting with
  ``.``), upper-cased; a link to a file outside the source folder is refused.
- The date column is ``time`` or ``date`` (whichever the header has) unless named; a date with a time zone
  (``2024-01-02T00:00:00+00:00``) is converted to its local date on the exchange (`EXCHANGE_TZ`).
- The calendar is the days the stocks traded: index bars outside them are dropped (``not_a_stock_day``).
- ``--universe`` lists the ``vn30`` market; every file goes to ``all``.
"""
from __future__ import annotations

import csv
import hashlib
import operator
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from vn30_qlib.data.cleaning import CleaningRules, clean_bars, drop_days_outside, drop_isolated_dates, flag_missing_days
from vn30_qlib.data.provider import BAR_FIELDS, IngestError, check_out_dir, write_provider

PRICE_FIELDS = ("open", "high", "low", "close")
PRICE_UNITS = {"thousand_vnd": 1.0, "vnd": 1e-3}
INDEX_SYMBOL = "VN30"
DATE_COLUMNS = ("time", "date")
EXCHANGE_TZ = "Asia/Ho_Chi_Minh"
SYMBOL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SYMBOL_RULE = "letters, digits, '.', '_' and '-', not starting with '.'"
MAX_THOUSAND_VND_MEDIAN_CLOSE = 1000.0  # no VN30 stock has traded near 1,000,000 VND
CHUNK_ROWS = 16384  # rows parsed at a time: the memory of a read stays near that of the parsed numbers
TIME_ZONE_SUFFIX = r"\d:\d{2}(?::\d{2}(?:\.\d+)?)?\s*(?:Z|[+-]\d{2}(?::?\d{2})?)$"


@dataclass(frozen=True)
class IngestOptions:
    """How to read the exports. Prices are stored in thousands of VND whatever the input unit.

    A date column of None means: the header's ``time`` or ``date`` column, for the stock files and the index
    file separately.
    """

    date_column: str | None = None
    index_date_column: str | None = None
    price_unit: str = "thousand_vnd"
    rules: CleaningRules = CleaningRules()


def read_export(path: Path, date_column: str | None, price_scale: float) -> pd.DataFrame:
    """Read one export into columns line, date, open, high, low, close, volume (NaN where a cell is empty).

    Rows are parsed in chunks of `CHUNK_ROWS` straight into numbers, so memory follows the parsed size.
    """
    try:
        return _read_export(path, date_column, price_scale)
    except UnicodeDecodeError:
        raise IngestError(f"{path}, line {_first_undecodable_line(path)}: not UTF-8 text; save the file as UTF-8") from None


def _read_export(path: Path, date_column: str | None, price_scale: float) -> pd.DataFrame:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or not any(cell.strip() for cell in header):
            raise IngestError(f"{path}: empty file (no header row)")
        header = [cell.strip().lower() for cell in header]
        doubled = sorted({name for name in header if name and header.count(name) > 1})
        if doubled:
            raise IngestError(f"{path}, line 1: the header names column(s) {doubled} more than once")
        date_name = _date_column(path, header, date_column)
        wanted = (date_name,) + BAR_FIELDS
        missing = [name for name in wanted if name not in header]
        if missing:
            raise IngestError(f"{path}: missing column(s) {missing}; the header has {header}")
        pick = operator.itemgetter(*(header.index(name) for name in wanted))
        capacity = _count_lines(path)  # at least the data rows: one allocation per column, no growth
        columns = {"line": np.empty(capacity, dtype="int64"), "date": np.empty(capacity, dtype="datetime64[ns]"),
                   **{name: np.empty(capacity, dtype="float64") for name in BAR_FIELDS}}
        rows = 0
        lines, cells = [], []
        for row in reader:
            if len(row) != len(header):
                if not "".join(row).strip():
                    continue
                raise IngestError(f"{path}, line {reader.line_num}: {len(row)} fields, the header has {len(header)}")
            lines.append(reader.line_num)
            cells.append(pick(row))
            if len(lines) == CHUNK_ROWS:
                rows = _parse_chunk(path, lines, cells, date_name, price_scale, columns, rows)
                lines, cells = [], []
        if lines:
            rows = _parse_chunk(path, lines, cells, date_name, price_scale, columns, rows)
    if not rows:
        raise IngestError(f"{path}: empty file (a header and no data rows)")
    return pd.DataFrame({name: values[:rows] for name, values in columns.items()}, copy=False)


def _count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b"")) + 1


def _parse_chunk(path: Path, lines: list[int], cells: list[tuple[str, ...]], date_name: str, price_scale: float,
                 columns: dict[str, np.ndarray], start: int) -> int:
    """Parse one chunk of rows into ``columns`` from row ``start`` on; returns the rows filled so far.

    Rows whose cells are all blank are skipped. Numbers are read as Python's ``float`` reads them (surrounding
    blanks allowed); an empty cell is NaN.
    """
    blank = [i for i, row in enumerate(cells) if not row[0].strip() and not "".join(row).strip()]
    if blank:
        keep = np.ones(len(cells), dtype=bool)
        keep[blank] = False
        lines = [n for n, kept in zip(lines, keep) if kept]
        cells = [row for row, kept in zip(cells, keep) if kept]
        if not cells:
            return start
    end = start + len(cells)
    line = np.asarray(lines, dtype="int64")
    date_text, *field_texts = zip(*cells)
    columns["line"][start:end] = line
    columns["date"][start:end] = _parse_dates(pd.Series([d.strip() for d in date_text], dtype=object), line, path,
                                              date_name)
    for name, text in zip(BAR_FIELDS, field_texts):
        columns[name][start:end] = _parse_numbers(text, line, path, name) * (price_scale if name in PRICE_FIELDS else 1.0)
    return end


def _parse_numbers(text: tuple[str, ...], lines: np.ndarray, path: Path, column: str) -> np.ndarray:
    try:
        values = np.array(text, dtype="float64")
        if not np.isnan(values).any():
            return values
    except ValueError:
        pass
    values = np.empty(len(text))
    for i, cell in enumerate(text):  # the slow way, to find the bad cell: only where the fast one failed
        cell = cell.strip()
        try:
            values[i] = float(cell) if cell else np.nan
        except ValueError:
            values[i] = np.nan
        if cell and np.isnan(values[i]):
            raise IngestError(f"{path}, line {lines[i]}: non-numeric value {cell!r} in column {column!r}")
    return values


def _parse_dates(text: pd.Series, lines: np.ndarray, path: Path, column: str) -> np.ndarray:
    """Calendar days of ISO dates; one with a time zone becomes its local date on the exchange."""
    zoned = text.str.len().gt(16)
    if zoned.any():
        zoned &= text.str.contains(TIME_ZONE_SUFFIX, regex=True)
    try:
        if not zoned.any():
            dates = _local(pd.to_datetime(text, errors="coerce", format="ISO8601"))
        else:
            dates = pd.Series(pd.NaT, index=text.index, dtype="datetime64[ns]")
            dates[~zoned] = pd.to_datetime(text[~zoned], errors="coerce", format="ISO8601")
            dates[zoned] = _local(pd.to_datetime(text[zoned], errors="coerce", format="ISO8601", utc=True))
    except ValueError as error:  # e.g. zones in a form the suffix pattern does not know, mixed with others
        raise IngestError(f"{path}, lines {lines[0]}..{lines[-1]}: dates in column {column!r} mix time zones "
                          f"in a way that cannot be read ({error})") from None
    bad = dates.isna()
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise IngestError(f"{path}, line {lines[i]}: unparsable date {text.iat[i]!r} in column {column!r}")
    return dates.dt.normalize().to_numpy()


def _local(dates: pd.Series) -> pd.Series:
    """Zoned instants as wall-clock times on the exchange; naive ones as they are."""
    return dates if dates.dt.tz is None else dates.dt.tz_convert(EXCHANGE_TZ).dt.tz_localize(None)


def _date_column(path: Path, header: list[str], given: str | None) -> str:
    if given is not None:
        return given.strip().lower()
    found = [name for name in DATE_COLUMNS if name in header]
    if len(found) == 1:
        return found[0]
    problem = "both a 'time' and a 'date' column" if found else f"no 'time' or 'date' column (the header has {header})"
    raise IngestError(f"{path}, line 1: {problem}; name the date column with --date-column "
                      "(--index-date-column for the index file)")


def _first_undecodable_line(path: Path) -> int:
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return number
    return 1


def find_exports(source: Path) -> dict[str, Path]:
    """Map each symbol (the upper-cased file stem) to its CSV file.

    Two files for one symbol, a stem that does not match `SYMBOL_PATTERN`, a link to a file outside
    ``source`` and a ``.csv`` entry that is not a file are errors.
    """
    if not source.is_dir():
        raise IngestError(f"{source}: source directory does not exist")
    root = source.resolve()
    files: dict[str, Path] = {}
    for path in sorted(source.iterdir()):
        if path.suffix.lower() != ".csv":
            continue
        if not SYMBOL_PATTERN.fullmatch(path.stem):
            raise IngestError(f"{source}: file name {path.name!r} is not SYMBOL.csv with a symbol of {SYMBOL_RULE}")
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise IngestError(f"{path}: a link to a file outside the source folder; copy the file in instead")
        if not path.is_file():
            raise IngestError(f"{path}: not a regular file")
        symbol = path.stem.upper()
        if symbol in files:
            raise IngestError(f"{source}: two files for symbol {symbol}: {files[symbol].name} and {path.name}")
        files[symbol] = path
    if not files:
        raise IngestError(f"{source}: no .csv files found")
    return files


def read_universe(path: Path) -> dict[str, int]:
    """The symbols of a universe file, each with its line: a CSV with a ``symbol`` column (other columns
    ignored), or one symbol per line without a header. Blank lines and ``#`` comments are skipped."""
    if not path.is_file():
        raise IngestError(f"{path}: universe file does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise IngestError(f"{path}, line {_first_undecodable_line(path)}: not UTF-8 text; save the file as UTF-8") from None
    rows = [(number, row) for number, row in enumerate(csv.reader(text.splitlines()), start=1)
            if any(cell.strip() for cell in row) and not row[0].lstrip().startswith("#")]
    if not rows:
        raise IngestError(f"{path}: empty universe file")
    header = [cell.strip().lower() for cell in rows[0][1]]
    if "symbol" in header:
        position, rows = header.index("symbol"), rows[1:]
    elif len(header) == 1:
        position = 0
    else:
        raise IngestError(f"{path}, line {rows[0][0]}: a universe CSV needs a 'symbol' column; the header has {header}")
    symbols: dict[str, int] = {}
    for number, row in rows:
        symbol = row[position].strip().upper() if position < len(row) else ""
        if not SYMBOL_PATTERN.fullmatch(symbol):
            raise IngestError(f"{path}, line {number}: {symbol!r} is not a symbol ({SYMBOL_RULE})")
        symbols.setdefault(symbol, number)
    return symbols


@dataclass(frozen=True)
class ExportInputs:
    """The files of one export, checked but not yet read: ``files`` maps each symbol (the index as
    `INDEX_SYMBOL`) to its CSV; ``inputs`` are the source folder, index and universe files (a provider may not
    be written inside them); ``universe`` the universe file's symbols with their lines, or None."""

    files: dict[str, Path]
    inputs: list[Path]
    universe: dict[str, int] | None
    universe_path: Path | None


def locate_exports(source: str | Path, index_file: str | Path | None, options: IngestOptions,
                   universe_file: str | Path | None) -> ExportInputs:
    """Find the export's files (`find_exports`), the index and the universe file, raising `IngestError` for a
    missing one, an unknown price unit or a stock file named like the index."""
    if options.price_unit not in PRICE_UNITS:
        raise IngestError(f"unknown price unit {options.price_unit!r}; choose one of {sorted(PRICE_UNITS)}")
    source = Path(source).expanduser()
    files = find_exports(source)
    inputs = [source]
    if index_file is not None:
        index_path = Path(index_file).expanduser()
        if not index_path.is_file():
            raise IngestError(f"{index_path}: index file does not exist")
        if INDEX_SYMBOL in files:
            raise IngestError(f"{files[INDEX_SYMBOL]}: a stock file is named like the index {INDEX_SYMBOL}")
        inputs.append(index_path)
        files = {**files, INDEX_SYMBOL: index_path}
    universe, universe_path = None, None
    if universe_file is not None:
        universe_path = Path(universe_file).expanduser()
        universe = read_universe(universe_path)
        inputs.append(universe_path)
    return ExportInputs(files, inputs, universe, universe_path)


def read_and_clean(files: dict[str, Path], options: IngestOptions) -> tuple[dict[str, pd.DataFrame], dict[str, dict]]:
    """Read every file and apply the per-file rules and the isolated-date rule: the cleaned bars (``line``
    column kept) and the reports by symbol. The calendar-wide steps are `finish_cleaning`'s."""
    raw = {}
    for symbol, path in files.items():
        if symbol == INDEX_SYMBOL:  # the index is quoted in points: the price unit option is for stock prices only
            raw[symbol] = read_export(path, options.index_date_column, 1.0)
            continue
        raw[symbol] = read_export(path, options.date_column, PRICE_UNITS[options.price_unit])
        median_close = raw[symbol]["close"].median()
        if options.price_unit == "thousand_vnd" and median_close > MAX_THOUSAND_VND_MEDIAN_CLOSE:
            raise IngestError(f"{path}: median close {median_close:,.0f} looks like VND, not thousands of VND; "
                              "pass --price-unit vnd")
    cleaned, reports = {}, {}
    for symbol in sorted(raw):
        cleaned[symbol], reports[symbol] = clean_bars(raw.pop(symbol), options.rules)
    return drop_isolated_dates(cleaned, reports, options.rules), reports


def stock_calendar(bars: Iterable[pd.DataFrame]) -> pd.DatetimeIndex:
    """The calendar: every day on which one of the stocks' ``bars`` traded."""
    return pd.DatetimeIndex(np.unique(np.concatenate([frame.index.to_numpy() for frame in bars])))


def finish_cleaning(cleaned: dict[str, pd.DataFrame], reports: dict[str, dict], calendar: pd.DatetimeIndex) -> dict:
    """The calendar-wide steps: drop the index bars on days no stock traded and finish each report
    (`flag_missing_days`); returns the calendar's part of the report. A file of which no bar is left is an
    `IngestError`."""
    calendar_report = {"days": len(calendar), "first": f"{calendar[0]:%Y-%m-%d}", "last": f"{calendar[-1]:%Y-%m-%d}"}
    if INDEX_SYMBOL in cleaned:
        cleaned[INDEX_SYMBOL], dropped = drop_days_outside(cleaned[INDEX_SYMBOL], reports[INDEX_SYMBOL], calendar)
        calendar_report["index_days_not_traded_by_stocks"] = [f"{d:%Y-%m-%d}" for d in dropped]
    flag_missing_days(cleaned, reports, calendar)
    empty = [symbol for symbol, frame in cleaned.items() if frame.empty]
    if empty:
        raise IngestError(f"no rows survive cleaning for {empty}; see their defects: {[reports[s] for s in empty]}")
    return calendar_report


def options_report(options: IngestOptions) -> dict:
    """How the export was read, for the report."""
    return {"date_column": options.date_column or "time or date", "index_date_column":
            options.index_date_column or "time or date", "price_unit": options.price_unit,
            "stored_price_unit": "thousand_vnd", "rules": asdict(options.rules)}


def symbol_report(path: Path, report: dict) -> dict:
    """A symbol's report entry: its file, the file's sha256 and its cleaning report."""
    return {"file": str(path), "sha256": _sha256(path), **report}


def ingest(
    source: str | Path,
    out: str | Path,
    index_file: str | Path | None = None,
    options: IngestOptions = IngestOptions(),
    universe_file: str | Path | None = None,
    force: bool = False,
) -> dict:
    """Ingest every CSV in ``source`` (and the optional index file) into the provider at ``out``.

    ``universe_file`` lists the symbols of market ``vn30`` (default: every file). ``out`` must pass
    `check_out_dir`; ``force`` lets it replace a Qlib provider another tool wrote. Returns the report also
    written to ``out/ingest_report.json``.
    """
    located = locate_exports(source, index_file, options, universe_file)
    for symbol, number in (located.universe or {}).items():
        if symbol not in located.files or symbol == INDEX_SYMBOL:
            raise IngestError(f"{located.universe_path}, line {number}: universe symbol {symbol} has no file in "
                              f"{located.inputs[0]}")
    check_out_dir(out, located.inputs, force)

    cleaned, reports = read_and_clean(located.files, options)
    stocks = sorted(set(cleaned) - {INDEX_SYMBOL})
    calendar = stock_calendar(cleaned[symbol] for symbol in stocks)
    calendar_report = finish_cleaning(cleaned, reports, calendar)
    universe = located.universe
    members = sorted(universe) if universe is not None else stocks
    markets = {"vn30": members, "all": stocks}
    if INDEX_SYMBOL in cleaned:
        markets["index"] = [INDEX_SYMBOL]
    report = {
        "options": options_report(options),
        "calendar": calendar_report,
        "universe": {"file": str(located.universe_path) if universe is not None else None,
                     "vn30": len(members), "all": len(stocks),
                     "note": "market vn30 is the universe file" if universe is not None else
                     "no --universe given: every file in --source is in market vn30"},
        "symbols": {symbol: symbol_report(located.files[symbol], reports[symbol]) for symbol in sorted(reports)},
    }
    bars = {symbol: frame.loc[:, list(BAR_FIELDS)] for symbol, frame in cleaned.items()}
    del cleaned
    write_provider(out, bars, calendar, markets, extra_files={"ingest_report.json": report}, inputs=located.inputs,
                   force=force)
    return report


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


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
    clipped = cal.get("index_days_not_traded_by_stocks")
    if clipped:
        lines.append(f"index: {len(clipped)} days on which no stock traded were dropped ({clipped[0]} .. {clipped[-1]})")
    universe = report["universe"]
    lines.append(f"markets: vn30 {universe['vn30']} symbols, all {universe['all']} ({universe['note']})")
    return "\n".join(lines)
