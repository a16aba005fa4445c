"""Ingestion: each defect class handled and counted exactly, bad input refused by file and line, atomic writes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vn30_qlib.cli import main
from vn30_qlib.data import provider as provider_module
from vn30_qlib.data.ingest import IngestError, IngestOptions, ingest

HEADER = "time,open,high,low,close,volume,data_source\n"
# Ten clean weekday bars, 2024-01-02 .. 2024-01-15, steady +1 % closes.
CLEAN_DAYS = pd.bdate_range("2024-01-02", periods=10)


def bar(day: str, o: float, h: float, l: float, c: float, v: float | str = 1000) -> str:
    return f"{day},{o},{h},{l},{c},{v},TCBS\n"


def clean_rows() -> list[str]:
    rows, close = [], 10.0
    for day in CLEAN_DAYS:
        rows.append(bar(f"{day:%Y-%m-%d}", close, close * 1.01, close * 0.99, close))
        close = round(close * 1.01, 4)
    return rows


def write_source(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def ingest_one(tmp_path: Path, rows: list[str], other_symbols: int = 0) -> dict:
    files = {"AAA.csv": HEADER + "".join(rows)}
    for i in range(other_symbols):
        files[f"B{i:02d}.csv"] = HEADER + "".join(clean_rows())
    report = ingest(write_source(tmp_path / "src", files), tmp_path / "provider")
    return report["symbols"]["AAA"]


def nonempty(section: dict) -> dict:
    return {reason: lines for reason, lines in section.items() if lines}


def test_clean_file_passes_untouched(tmp_path):
    entry = ingest_one(tmp_path, clean_rows())
    assert entry["rows_read"] == entry["rows_kept"] == 10
    assert nonempty(entry["removed"]) == nonempty(entry["repaired"]) == nonempty(entry["flagged"]) == {}
    assert entry["missing_days"] == []


def test_provider_folder_has_the_umask_s_permissions_not_mkdtemp_s(tmp_path):
    ingest_one(tmp_path, clean_rows())
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "provider").stat().st_mode & 0o777 == 0o777 & ~mask


@pytest.mark.parametrize(
    "edit, kind, reason, lines",
    [
        # lines are CSV line numbers: the header is line 1, the first bar line 2
        (lambda r: r[:3] + [r[2]] + r[3:], "removed", "duplicate_row", [5]),
        (lambda r: r[:3] + [bar("2024-01-04", 1, 1, 1, 1)] + r[3:], "removed", "conflicting_duplicate", [4, 5]),
        (lambda r: r[:2] + [bar("2024-01-06", 10, 10, 10, 10)] + r[2:], "removed", "weekend_date", [4]),
        (lambda r: r[:4] + [bar("2024-01-08", "", 11, 10, 10.5)] + r[5:], "removed", "missing_value", [6]),
        (lambda r: r[:4] + [bar("2024-01-08", 10.4, 10.5, 10.3, 0.0)] + r[5:], "removed", "nonpositive_price", [6]),
        (lambda r: r[:4] + [bar("2024-01-08", 10.4, 10.5, 10.3, 10.4, -5)] + r[5:], "removed", "negative_volume", [6]),
        (lambda r: r[:4] + [bar("2024-01-08", 10.4, 10.5, 10.3, 10.4, 0)] + r[5:], "removed", "zero_volume", [6]),
        (lambda r: r[:4] + [bar("2024-01-08", 31.0, 31.0, 30.0, 10.4)] + r[5:], "removed", "corrupt_bar", [6]),
        (lambda r: r[:4] + [bar("2024-01-08", 20.0, 20.0, 20.0, 20.0)] + r[5:], "removed", "price_spike", [6]),
        (lambda r: [r[1], r[0]] + r[2:], "repaired", "reordered", [3]),
        (lambda r: r[:4] + [bar("2024-01-08", 10.2, 10.5, 10.3, 10.4)] + r[5:], "repaired", "ohlc_envelope", [6]),
        (lambda r: r[:-1] + [bar("2024-01-15", 11.9, 12.0, 11.8, 11.9)], "flagged", "beyond_price_limit", [11]),
    ],
)
def test_each_defect_class_is_handled_and_counted(tmp_path, edit, kind, reason, lines):
    entry = ingest_one(tmp_path, edit(clean_rows()))
    assert nonempty(entry[kind]) == {reason: lines}
    others = {k: nonempty(entry[k]) for k in ("removed", "repaired", "flagged") if k != kind}
    assert others == {k: {} for k in others}, "no other rule may fire"
    removed = sum(len(v) for v in entry["removed"].values())
    assert entry["rows_kept"] + removed == entry["rows_read"]


def test_envelope_repair_widens_high_and_low(tmp_path):
    rows = clean_rows()
    rows[4] = bar("2024-01-08", 10.2, 10.5, 10.3, 10.55)
    ingest_one(tmp_path, rows)
    from vn30_qlib.data.check import init_qlib
    from qlib.data import D

    init_qlib(tmp_path / "provider")
    got = D.features(["AAA"], ["$open", "$high", "$low", "$close"], "2024-01-08", "2024-01-08").iloc[0]
    np.testing.assert_allclose(got.to_numpy(), [10.2, 10.55, 10.2, 10.55], rtol=1e-6)


def test_isolated_holiday_bar_is_removed_and_gaps_are_listed(tmp_path):
    holiday = 5  # 2024-01-09 plays a market holiday: only B00 has a (stray) bar that day
    without_holiday = [row for i, row in enumerate(clean_rows()) if i != holiday]
    files = {"AAA.csv": HEADER + "".join(r for r in without_holiday if not r.startswith("2024-01-05"))}
    for i in range(5):
        files[f"B{i:02d}.csv"] = HEADER + "".join(clean_rows() if i == 0 else without_holiday)
    report = ingest(write_source(tmp_path / "src", files), tmp_path / "provider")
    assert nonempty(report["symbols"]["B00"]["removed"]) == {"isolated_date": [holiday + 2]}
    assert report["symbols"]["AAA"]["missing_days"] == ["2024-01-05"]
    calendar = (tmp_path / "provider" / "calendars" / "day.txt").read_text().split()
    assert calendar == [f"{d:%Y-%m-%d}" for i, d in enumerate(CLEAN_DAYS) if i != holiday]


def test_vnd_prices_and_date_column_options(tmp_path):
    text = "date,open,high,low,close,volume\n" + "".join(
        f"{d:%Y-%m-%d},{10000 + i},{10100 + i},{9900 + i},{10000 + i},500\n" for i, d in enumerate(CLEAN_DAYS))
    src = write_source(tmp_path / "src", {"AAA.csv": text})
    ingest(src, tmp_path / "provider", options=IngestOptions(date_column="date", price_unit="vnd"))
    stored = np.fromfile(tmp_path / "provider" / "features" / "aaa" / "close.day.bin", dtype="<f4")
    np.testing.assert_allclose(stored[1:], [10.0 + i / 1000 for i in range(10)], rtol=1e-6)


def test_derived_fields_follow_their_definitions(tmp_path):
    rows = clean_rows()
    ingest_one(tmp_path, rows)
    folder = tmp_path / "provider" / "features" / "aaa"
    read = {f: np.fromfile(folder / f"{f}.day.bin", dtype="<f4")[1:].astype("float64")
            for f in ("high", "low", "close", "vwap", "factor", "change")}
    np.testing.assert_allclose(read["vwap"], (read["high"] + read["low"] + read["close"]) / 3, rtol=1e-6)
    assert (read["factor"] == 1.0).all()
    assert np.isnan(read["change"][0])
    np.testing.assert_allclose(read["change"][1:], read["close"][1:] / read["close"][:-1] - 1, atol=1e-6)


def test_index_file_is_kept_out_of_the_stock_markets(tmp_path):
    src = write_source(tmp_path / "src", {"AAA.csv": HEADER + "".join(clean_rows())})
    index = tmp_path / "VN30.csv"
    index.write_text("time,open,high,low,close,volume,symbol,name\n" + "".join(
        f"{d:%Y-%m-%d},1000,1010,990,1005,100000,VN30,VN30\n" for d in CLEAN_DAYS))
    report = ingest(src, tmp_path / "provider", index_file=index)
    instruments = tmp_path / "provider" / "instruments"
    assert (instruments / "vn30.txt").read_text().split() == ["AAA", "2024-01-02", "2024-01-15"]
    assert (instruments / "all.txt").read_text() == (instruments / "vn30.txt").read_text()
    assert (instruments / "index.txt").read_text().split()[0] == "VN30"
    stored = np.fromfile(tmp_path / "provider" / "features" / "vn30" / "close.day.bin", dtype="<f4")
    assert stored[1] == 1005.0, "index levels are points, never rescaled by the price unit"
    assert report["symbols"]["VN30"]["rows_kept"] == 10


# ---------------------------------------------------------------- bad input: clear error, provider untouched


@pytest.fixture
def existing_provider(tmp_path) -> Path:
    src = write_source(tmp_path / "good", {"AAA.csv": HEADER + "".join(clean_rows())})
    ingest(src, tmp_path / "provider")
    return tmp_path / "provider"


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "files, message",
    [
        ({"AAA.csv": "time,open,high,low,volume\n2024-01-02,1,1,1,1\n"}, r"AAA\.csv: missing column\(s\) \['close'\]"),
        ({"AAA.csv": HEADER + bar("2024-01-02", 1, 1, 1, 1) + bar("2024-01-03", 1, "x1", 1, 1)},
         r"AAA\.csv, line 3: non-numeric value 'x1' in column 'high'"),
        ({"AAA.csv": HEADER + bar("2024-01-02", 1, 1, 1, 1) + bar("2024-13-45", 1, 1, 1, 1)},
         r"AAA\.csv, line 3: unparsable date '2024-13-45' in column 'time'"),
        ({"AAA.csv": ""}, r"AAA\.csv: empty file"),
        ({"AAA.csv": HEADER}, r"AAA\.csv: empty file \(a header and no data rows\)"),
        ({"AAA.csv": HEADER + bar("2024-01-02", 1, 1, 1, 1), "aaa.CSV": HEADER + bar("2024-01-02", 1, 1, 1, 1)},
         r"two files for symbol AAA: AAA\.csv and aaa\.CSV"),
    ],
)
def test_bad_input_names_file_and_row_and_leaves_provider(tmp_path, existing_provider, files, message, capsys):
    before = snapshot(existing_provider)
    src = write_source(tmp_path / "bad", files)
    with pytest.raises(IngestError, match=message):
        ingest(src, existing_provider)
    assert main(["data", "ingest", "--source", str(src), "--out", str(existing_provider)]) == 2
    assert "error:" in capsys.readouterr().err
    assert snapshot(existing_provider) == before
    assert not [p for p in existing_provider.parent.iterdir() if p.name.startswith(".provider")], "temp dirs left"


def test_missing_source_dir_is_an_error(tmp_path, existing_provider):
    before = snapshot(existing_provider)
    with pytest.raises(IngestError, match="does-not-exist: source directory does not exist"):
        ingest(tmp_path / "does-not-exist", existing_provider)
    assert snapshot(existing_provider) == before


def test_interrupted_ingest_leaves_the_old_provider_usable(tmp_path, existing_provider, monkeypatch):
    before = snapshot(existing_provider)
    rows = clean_rows()
    src = write_source(tmp_path / "new", {"AAA.csv": HEADER + "".join(rows), "BBB.csv": HEADER + "".join(rows)})
    real_derive = provider_module.derive_fields
    written = []

    def derive_then_die(bars):
        written.append(1)
        if len(written) == 2:  # the first symbol's files are on disk, the second symbol is being written
            raise KeyboardInterrupt("simulated interruption")
        return real_derive(bars)

    monkeypatch.setattr(provider_module, "derive_fields", derive_then_die)
    with pytest.raises(KeyboardInterrupt):
        ingest(src, existing_provider)
    monkeypatch.undo()
    assert snapshot(existing_provider) == before
    assert not [p for p in existing_provider.parent.iterdir() if p.name.startswith(".provider")]
    from qlib.data import D
    from vn30_qlib.data.check import init_qlib

    init_qlib(existing_provider)
    assert len(D.features(["AAA"], ["$close"]).dropna()) == 10


def test_reingest_gives_byte_identical_files(tmp_path):
    rows = clean_rows()
    src = write_source(tmp_path / "src", {"AAA.csv": HEADER + "".join(rows), "BBB.csv": HEADER + "".join(rows[2:])})
    ingest(src, tmp_path / "one")
    ingest(src, tmp_path / "two")
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two")


# ---------------------------------------------------------------- the real VN30 exports


def test_real_exports_round_trip_through_qlib(real_provider, shared_vn30):
    """Every cleaned row is in the provider, equal to the cleaned CSV values, for all 30 symbols."""
    from qlib.data import D
    from vn30_qlib.data.check import check_provider
    from vn30_qlib.data.cleaning import CleaningRules, clean_bars
    from vn30_qlib.data.ingest import read_export

    summary = check_provider(real_provider)
    assert summary["problems"] == []
    report = json.loads((real_provider / "ingest_report.json").read_text())["symbols"]
    constituents = pd.read_csv(shared_vn30 / "constituents.csv")["symbol"].tolist()
    data = D.features(D.instruments("vn30"), ["$close", "$volume", "$change"])
    assert sorted(data.index.get_level_values("instrument").unique()) == sorted(constituents)
    for symbol in constituents:
        raw = read_export(shared_vn30 / "prices" / f"{symbol}.csv", None, 1.0)
        cleaned, _ = clean_bars(raw, CleaningRules())
        got = data.xs(symbol, level="instrument").dropna(subset=["$close"])
        assert len(got) == report[symbol]["rows_kept"], symbol
        assert got.index.equals(cleaned.index.intersection(got.index)) and len(cleaned) >= len(got)
        expected = cleaned.loc[got.index]
        np.testing.assert_allclose(got["$close"], expected["close"], rtol=1e-6, err_msg=symbol)
        np.testing.assert_allclose(got["$volume"], expected["volume"], rtol=1e-6, err_msg=symbol)
        change = expected["close"] / expected["close"].shift(1) - 1
        np.testing.assert_allclose(got["$change"].iloc[1:], change.iloc[1:], atol=1e-6, err_msg=symbol)


def test_real_exports_defects_are_found(real_provider):
    """The defects known to be in the shared exports are all reported (counts read off the raw files)."""
    report = json.loads((real_provider / "ingest_report.json").read_text())["symbols"]
    assert len(report["ACB"]["removed"]["duplicate_row"]) == 9
    assert report["VIB"]["removed"]["nonpositive_price"] and report["VIB"]["removed"]["corrupt_bar"]
    assert len(report["ACB"]["repaired"]["ohlc_envelope"]) == 341
    assert len(report["BID"]["removed"]["zero_volume"]) == 2
    assert "2019-10-01" in report["BID"]["missing_days"]
    for symbol, entry in report.items():
        removed = sum(len(v) for v in entry["removed"].values())
        assert entry["rows_kept"] + removed == entry["rows_read"], symbol
