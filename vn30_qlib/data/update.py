"""Append a fresh export to a provider: ``vn30-qlib data update --source DIR --out PROVIDER``.

The export is read and cleaned exactly as `vn30_qlib.data.ingest` does (same layouts, options and rules, whose
reasons go into ``ingest_report.json``), then compared, symbol by symbol, with the bars the provider holds:

- ``appended`` / ``unchanged``: the days the export shares with the provider are the same bars (equal once
  stored as float32); its later days are appended. The stored days keep their bytes.
- ``rebuilt``: the shared days differ (a vendor re-adjusted history after a dividend or split), or one side
  has a bar the other lacks inside the export's span. The symbol's history is rebuilt from the export, which
  must then start on or before the provider's first day of it; the report says by how much it changed.
- ``new``: a symbol the provider does not hold; it joins market ``all`` (market ``vn30`` stays as it was
  unless ``universe_file`` gives it).
- ``not_in_export``: a symbol the export lacks is kept as stored, with its real end date.

An export may hold the full history or only recent days; with the full history of a longer export the
provider is byte for byte the one `ingest` writes from it. The new provider replaces the old one atomically
(`write_provider`); an update that brings nothing new writes nothing, so no byte changes. Bad input raises
`IngestError` naming the file (and line) before anything is written.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from vn30_qlib.data.ingest import (INDEX_SYMBOL, IngestOptions, finish_cleaning, locate_exports, options_report,
                                   read_and_clean, stock_calendar, symbol_report)
from vn30_qlib.data.provider import (BAR_FIELDS, IngestError, check_out_dir, derive_fields, is_vn30_provider,
                                     read_calendar, read_features, read_instruments, recover_interrupted_swap,
                                     write_provider)

REPORT = "ingest_report.json"
STATUSES = ("appended", "unchanged", "rebuilt", "new", "not_in_export")
SHOWN_DAYS = 10  # days listed per kind of difference in a rebuilt symbol's report; the counts are complete


def update(
    source: str | Path,
    provider: str | Path,
    index_file: str | Path | None = None,
    options: IngestOptions = IngestOptions(),
    universe_file: str | Path | None = None,
) -> dict:
    """Update the vn30-qlib provider at ``provider`` with the export in ``source`` (and the optional index
    file); ``universe_file`` replaces the symbols of market ``vn30``. Returns the new ingest report, whose
    ``update`` entry says what happened to each symbol and whether the provider was written."""
    located = locate_exports(source, index_file, options, universe_file)
    root = Path(provider).expanduser().resolve()
    recover_interrupted_swap(root)
    if not (root / "calendars" / "day.txt").is_file() or not is_vn30_provider(root):
        raise IngestError(f"{root}: not a provider vn30-qlib wrote; write one with vn30-qlib data ingest first")
    check_out_dir(root, located.inputs)
    held_calendar = read_calendar(root)
    held_markets = {path.stem: read_instruments(root, path.stem)["symbol"].tolist()
                    for path in sorted((root / "instruments").glob("*.txt"))}
    held_stocks = sorted({s for market, symbols in held_markets.items() if market != "index" for s in symbols})
    held = {symbol: read_features(root, symbol, held_calendar)
            for symbol in held_stocks + held_markets.get("index", [])}

    cleaned, reports = read_and_clean(located.files, options)
    stocks = sorted(set(held_stocks) | (set(cleaned) - {INDEX_SYMBOL}))
    merged = {symbol: _merge(symbol, held.get(symbol), cleaned.get(symbol), located.files.get(symbol))
              for symbol in stocks}
    calendar = stock_calendar(frame for frame, _ in merged.values())
    calendar_report = finish_cleaning(cleaned, reports, calendar)
    if INDEX_SYMBOL in held or INDEX_SYMBOL in cleaned:
        held_index = held.get(INDEX_SYMBOL)
        outside = pd.DatetimeIndex([]) if held_index is None else held_index.index.difference(calendar)
        if len(outside):  # days that only the rebuilt stocks had: the index follows the stocks' calendar
            held_index = held_index.drop(index=outside)
        merged[INDEX_SYMBOL] = _merge(INDEX_SYMBOL, held_index, cleaned.get(INDEX_SYMBOL),
                                      located.files.get(INDEX_SYMBOL))
        if len(outside):
            merged[INDEX_SYMBOL][1]["held_days_not_traded_by_stocks"] = [f"{d:%Y-%m-%d}" for d in outside]
    markets = _markets(held_markets, stocks, INDEX_SYMBOL in merged, located)
    changes = {symbol: change for symbol, (_, change) in merged.items()}
    written = (not calendar.equals(held_calendar) or markets != held_markets
               or any(change["status"] not in ("unchanged", "not_in_export") for change in changes.values()))

    old_report = _read_report(root)
    entries = {}
    for symbol, (frame, change) in merged.items():
        if symbol in cleaned:
            entries[symbol] = symbol_report(located.files[symbol], reports[symbol])
            if change.get("rows_from_provider"):
                _count_held_rows(entries[symbol], frame, change["rows_from_provider"], calendar)
        else:
            entries[symbol] = old_report.get("symbols", {}).get(symbol) or _held_entry(frame, calendar)
    report = {
        "options": options_report(options),
        "calendar": calendar_report,
        "universe": {"file": str(located.universe_path) if located.universe is not None else None,
                     "vn30": len(markets["vn30"]), "all": len(markets["all"]),
                     "note": "market vn30 is the universe file" if located.universe is not None else
                     "no --universe given: market vn30 kept from the provider"},
        "symbols": dict(sorted(entries.items())),
        "update": {"source": str(located.inputs[0]), "written": written,
                   "provider_before": {"days": len(held_calendar), "first": f"{held_calendar[0]:%Y-%m-%d}",
                                       "last": f"{held_calendar[-1]:%Y-%m-%d}"},
                   **{status: {s: c for s, c in changes.items() if c["status"] == status} for status in STATUSES}},
    }
    if written:
        bars = {symbol: frame for symbol, (frame, _) in merged.items()}
        write_provider(root, bars, calendar, markets, extra_files={REPORT: report}, inputs=located.inputs)
    return report


def _merge(symbol: str, held: pd.DataFrame | None, export: pd.DataFrame | None,
           path: Path | None) -> tuple[pd.DataFrame, dict]:
    """The symbol's bars after the update (the stored fields of the days kept as stored, `BAR_FIELDS` of
    the days taken from the export, derived fields where known) and what happened to it.

    Days are compared as sorted datetime64 arrays: pandas' label alignment costs more than the comparison.
    """
    if export is None:
        return held, {"status": "not_in_export", "last_day": f"{held.index[-1]:%Y-%m-%d}"}
    if held is None:
        return export, {"status": "new", "days": len(export), "first_day": f"{export.index[0]:%Y-%m-%d}"}
    export_days, held_days = export.index.to_numpy(), held.index.to_numpy()
    start = export.index[0]
    first_kept = int(np.searchsorted(held_days, export_days[0]))  # the held days from the export's first one
    window_days = held_days[first_kept:]
    overlap, in_export, in_window = np.intersect1d(export_days, window_days, assume_unique=True, return_indices=True)
    only_held = np.setdiff1d(window_days, export_days, assume_unique=True)
    first_new = int(np.searchsorted(export_days, held_days[-1], side="right"))
    only_export = np.setdiff1d(export_days[:first_new], window_days, assume_unique=True)
    differs = np.zeros(len(overlap), dtype=bool)
    for field in BAR_FIELDS:
        exported = export[field].to_numpy().astype("<f4")[in_export]
        stored = held[field].to_numpy()[first_kept:].astype("<f4")[in_window]
        differs |= exported != stored
    if differs.any() or len(only_held) or len(only_export):
        change = _rebuilt(export, held.iloc[first_kept:], pd.DatetimeIndex(overlap[differs]),
                          pd.DatetimeIndex(only_held), pd.DatetimeIndex(only_export))
        if start > held.index[0]:
            raise IngestError(
                f"{path}: the bars of {symbol} differ from the provider's ({_describe(change)}), but the file "
                f"starts {start:%Y-%m-%d}, after the provider's first day {held.index[0]:%Y-%m-%d}: export the "
                "symbol's full history so that it can be rebuilt")
        return export, change
    # the new days' derived fields, each change from the export's own previous close where it has one
    appended = derive_fields(export.iloc[max(first_new - 1, 0):]).iloc[min(first_new, 1):]
    change = {"status": "appended" if len(appended) else "unchanged", "days": len(appended)}
    if len(appended):
        change["last_day"] = f"{appended.index[-1]:%Y-%m-%d}"
    if first_kept:
        change["rows_from_provider"] = first_kept
    return pd.concat([held, appended]) if len(appended) else held, change


def _rebuilt(export: pd.DataFrame, window: pd.DataFrame, differing: pd.DatetimeIndex, only_held: pd.DatetimeIndex,
             only_export: pd.DatetimeIndex) -> dict:
    """How a rebuilt symbol's history changed: the days whose bar differs and the ratio new / stored of their
    closes; the days the provider held that the cleaned export lacks, and the other way round."""
    ratio = export.loc[differing, "close"] / window.loc[differing, "close"]
    change = {"status": "rebuilt", "days_differing": len(differing),
              "held_days_not_in_export": len(only_held), "export_days_not_held": len(only_export)}
    if len(differing):
        change.update(first_day_differing=f"{differing[0]:%Y-%m-%d}", last_day_differing=f"{differing[-1]:%Y-%m-%d}",
                      close_ratio={"min": float(ratio.min()), "median": float(ratio.median()),
                                   "max": float(ratio.max())})
    for key, days in (("held_days_not_in_export", only_held), ("export_days_not_held", only_export)):
        if len(days):
            change[f"{key}_first"] = [f"{d:%Y-%m-%d}" for d in days[:SHOWN_DAYS]]
    return change


def _describe(change: dict) -> str:
    parts = []
    if change["days_differing"]:
        ratio = change["close_ratio"]
        parts.append(f"{change['days_differing']} days differ, {change['first_day_differing']} .. "
                     f"{change['last_day_differing']}, close x{ratio['median']:.4f} (median; "
                     f"x{ratio['min']:.4f} .. x{ratio['max']:.4f})")
    if change["held_days_not_in_export"]:
        parts.append(f"{change['held_days_not_in_export']} stored days missing from the export, e.g. "
                     f"{change['held_days_not_in_export_first'][0]}")
    if change["export_days_not_held"]:
        parts.append(f"{change['export_days_not_held']} past days the provider lacks, e.g. "
                     f"{change['export_days_not_held_first'][0]}")
    return "; ".join(parts)


def _markets(held: dict[str, list[str]], stocks: list[str], has_index: bool, located) -> dict[str, list[str]]:
    """The markets after the update: the provider's, with every stock in ``all``, the index in ``index`` and
    ``vn30`` from the universe file when one is given."""
    markets = {**held, "all": stocks}
    if located.universe is not None:
        for symbol, number in located.universe.items():
            if symbol not in stocks:
                raise IngestError(f"{located.universe_path}, line {number}: universe symbol {symbol} is neither in "
                                  f"{located.inputs[0]} nor in the provider")
        markets["vn30"] = sorted(located.universe)
    markets.setdefault("vn30", stocks)
    if has_index:
        markets["index"] = [INDEX_SYMBOL]
    return dict(sorted(markets.items()))


def _read_report(root: Path) -> dict:
    path = root / REPORT
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as error:
        raise IngestError(f"{path}: not JSON ({error}); the provider is damaged, ingest the full export again") from None


def _count_held_rows(entry: dict, frame: pd.DataFrame, held_rows: int, calendar: pd.DatetimeIndex) -> None:
    """Extend the entry of a symbol whose export starts after the provider's first day of it by the rows kept
    from the provider: ``rows_kept`` counts every stored bar, the span and missing days cover them too."""
    entry["rows_from_provider"] = held_rows
    entry.update(_span(frame, calendar), rows_kept=entry["rows_kept"] + held_rows)


def _held_entry(frame: pd.DataFrame, calendar: pd.DatetimeIndex) -> dict:
    """The report entry of a symbol kept from a provider whose report has none (e.g. a simulated one)."""
    return {"file": None, "rows_read": 0, "rows_kept": len(frame), "rows_from_provider": len(frame),
            "removed": {}, "repaired": {}, "flagged": {}, **_span(frame, calendar)}


def _span(frame: pd.DataFrame, calendar: pd.DatetimeIndex) -> dict:
    days = calendar[(calendar >= frame.index[0]) & (calendar <= frame.index[-1])]
    return {"first_day": f"{frame.index[0]:%Y-%m-%d}", "last_day": f"{frame.index[-1]:%Y-%m-%d}",
            "missing_days": [f"{d:%Y-%m-%d}" for d in days.difference(frame.index)]}


def format_update(report: dict) -> str:
    """A readable account of an update: each symbol's fate, the rebuilt ones with how much they changed."""
    update = report["update"]
    before, after = update["provider_before"], report["calendar"]
    lines = [f"provider {before['first']} .. {before['last']} ({before['days']} days) -> {after['first']} .. "
             f"{after['last']} ({after['days']} days)"]
    for status in STATUSES:
        symbols = update[status]
        if not symbols:
            continue
        if status == "appended":
            shown = ", ".join(f"{s} +{c['days']}" for s, c in symbols.items())
        elif status == "rebuilt":
            shown = "; ".join(f"{s}: {_describe(c)}" for s, c in symbols.items())
        else:
            shown = ", ".join(symbols)
        lines.append(f"{status} ({len(symbols)}): {shown}")
    lines.append("provider written" if update["written"] else "nothing new: the provider is unchanged (no byte written)")
    return "\n".join(lines)
