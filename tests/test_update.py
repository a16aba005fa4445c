"""`vn30-qlib data update`: a provider ingested from the first part of the simulated market's export, updated
with the longer export, is the provider a full ingest of the longer export writes."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vn30_qlib.cli import main
from vn30_qlib.data.ingest import ingest
from vn30_qlib.data.provider import read_calendar, read_instruments
from vn30_qlib.data.simulate import simulate_market
from vn30_qlib.data.update import update

SPLIT = "2024-09-20"  # the first export ends here; the longer one runs to 2024-09-30 (6 more trading days)
PROVIDER_PARTS = ("calendars", "instruments", "features")


def write_export(bars: dict[str, pd.DataFrame], folder: Path, until: str | None = None,
                 since: str | None = None) -> Path:
    """One vnstock-layout CSV per symbol, holding the bars from ``since`` to ``until`` (inclusive)."""
    folder.mkdir(parents=True)
    for symbol, frame in bars.items():
        frame = frame.loc[since:until]
        table = frame.assign(time=frame.index.strftime("%Y-%m-%d"))[["time", "open", "high", "low", "close", "volume"]]
        table.to_csv(folder / f"{symbol}.csv", index=False)
    return folder


def hashes(folder: Path, parts: tuple[str, ...] | None = None) -> dict[str, str]:
    """sha256 of every file under ``folder`` (only under ``parts`` when given), by relative path."""
    roots = [folder / part for part in parts] if parts else [folder]
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def tree(folder: Path) -> dict[str, str]:
    """Every entry beside and under ``folder`` (leftovers of a write would show) with its content hash."""
    return {**hashes(folder), **{p.name: "" for p in folder.parent.iterdir()}}


@pytest.fixture(scope="module")
def market() -> dict[str, pd.DataFrame]:
    bars, _, _ = simulate_market(seed=0, signal=0.1, start="2024-01-02", end="2024-09-30")
    return bars


@pytest.fixture(scope="module")
def exports(market, tmp_path_factory) -> dict[str, Path]:
    """The first part, the full export, and a full ingest of the full export (the reference)."""
    root = tmp_path_factory.mktemp("exports")
    full = write_export(market, root / "full")
    reference = root / "reference"
    ingest(full, reference)
    return {"first": write_export(market, root / "first", until=SPLIT), "full": full, "reference": reference}


@pytest.fixture
def first_provider(exports, tmp_path) -> Path:
    out = tmp_path / "provider"
    ingest(exports["first"], out)
    return out


def test_update_with_the_next_days_is_a_full_ingest_of_the_longer_export(exports, first_provider, market, tmp_path):
    held = read_calendar(first_provider)
    one_more = write_export(market, tmp_path / "one_more", until="2024-09-23")
    report = update(one_more, first_provider)  # day by day: first one day, then the rest
    assert report["update"]["written"] and set(report["update"]["appended"]) == set(market)
    assert {c["days"] for c in report["update"]["appended"].values()} == {1}
    report = update(exports["full"], first_provider)
    assert hashes(first_provider, PROVIDER_PARTS) == hashes(exports["reference"], PROVIDER_PARTS)
    reference = json.loads((exports["reference"] / "ingest_report.json").read_text())
    stored = json.loads((first_provider / "ingest_report.json").read_text())
    assert stored == report
    for key in ("options", "calendar", "symbols"):
        assert report[key] == reference[key], key
    assert report["update"]["provider_before"]["last"] == "2024-09-23"
    assert {c["days"] for c in report["update"]["appended"].values()} == {5}
    assert read_calendar(first_provider)[: len(held)].equals(held)


def test_an_export_of_only_the_last_days_appends_them(exports, first_provider, market, tmp_path):
    recent = write_export(market, tmp_path / "recent", since="2024-09-18")  # overlaps the provider by 3 days
    report = update(recent, first_provider)
    assert set(report["update"]["appended"]) == set(market)
    same = hashes(first_provider, PROVIDER_PARTS)
    reference = hashes(exports["reference"], PROVIDER_PARTS)
    differing = {path for path in reference if same.get(path) != reference[path]}
    # the first appended day's change reads the stored (float32) previous close, the full ingest its float64
    assert differing <= {f"features/{s.lower()}/change.day.bin" for s in market}
    for symbol in market:
        path = f"features/{symbol.lower()}/change.day.bin"
        ours = np.fromfile(first_provider / path, dtype="<f4")
        assert np.allclose(ours, np.fromfile(exports["reference"] / path, dtype="<f4"), rtol=1e-6, equal_nan=True)
    entry = report["symbols"]["ACB"]
    assert entry["rows_kept"] == len(market["ACB"]) and entry["rows_from_provider"] == len(market["ACB"].loc[:"2024-09-17"])
    assert entry["first_day"] == "2024-01-02" and entry["missing_days"] == []


def test_update_with_the_bars_already_held_changes_no_byte(exports, first_provider, capsys):
    before = tree(first_provider)
    assert main(["data", "update", "--source", str(exports["first"]), "--out", str(first_provider)]) == 0
    assert "nothing new" in capsys.readouterr().out
    assert tree(first_provider) == before
    report = update(exports["first"], first_provider)
    assert not report["update"]["written"] and set(report["update"]["unchanged"]) == set(exports_symbols(exports))


def exports_symbols(exports: dict[str, Path]) -> list[str]:
    return [p.stem for p in exports["first"].glob("*.csv")]


def test_a_readjusted_symbol_is_rebuilt_and_reported(market, first_provider, tmp_path, capsys):
    adjusted = dict(market)
    before = market["ACB"].index < pd.Timestamp("2024-06-03")
    scaled = market["ACB"].copy()
    scaled.loc[before, ["open", "high", "low", "close"]] = (scaled.loc[before, ["open", "high", "low", "close"]]
                                                          * 0.95).round(2)
    adjusted["ACB"] = scaled
    source = write_export(adjusted, tmp_path / "adjusted")
    reference = tmp_path / "reference"
    ingest(source, reference)
    assert main(["data", "update", "--source", str(source), "--out", str(first_provider)]) == 0
    printed = capsys.readouterr().out
    assert "rebuilt (1): ACB:" in printed and "x0.95" in printed
    report = json.loads((first_provider / "ingest_report.json").read_text())
    change = report["update"]["rebuilt"]["ACB"]
    assert change["days_differing"] == int(before.sum())
    assert change["first_day_differing"] == "2024-01-02" and change["last_day_differing"] == "2024-05-31"
    assert change["close_ratio"]["median"] == pytest.approx(0.95, abs=1e-3)
    assert "ACB" not in report["update"]["appended"] and len(report["update"]["appended"]) == len(market) - 1
    assert hashes(first_provider, PROVIDER_PARTS) == hashes(reference, PROVIDER_PARTS)


def test_a_readjusted_symbol_in_an_export_of_recent_days_is_refused(market, first_provider, tmp_path, capsys):
    adjusted = dict(market)
    adjusted["FPT"] = market["FPT"].assign(close=market["FPT"]["close"] * 1.02, high=market["FPT"]["high"] * 1.02)
    source = write_export(adjusted, tmp_path / "recent", since="2024-09-10")
    before = tree(first_provider)
    assert main(["data", "update", "--source", str(source), "--out", str(first_provider)]) == 2
    error = capsys.readouterr().err
    assert f"{source / 'FPT.csv'}: the bars of FPT differ" in error and "x1.0200" in error
    assert "starts 2024-09-10" in error and "export the symbol's full history" in error
    assert tree(first_provider) == before


def test_bad_input_names_the_file_and_line_and_changes_nothing(exports, first_provider, tmp_path, capsys):
    source = tmp_path / "bad"
    source.mkdir()
    for path in exports["full"].glob("*.csv"):
        (source / path.name).write_bytes(path.read_bytes())
    lines = (source / "VNM.csv").read_text().splitlines()
    lines[7] = lines[7].replace(lines[7].split(",")[4], "12,5", 1)  # a decimal comma: one field too many
    (source / "VNM.csv").write_text("\n".join(lines) + "\n")
    before = tree(first_provider)
    assert main(["data", "update", "--source", str(source), "--out", str(first_provider)]) == 2
    assert f"{source / 'VNM.csv'}, line 8: 7 fields, the header has 6" in capsys.readouterr().err
    assert tree(first_provider) == before
    assert main(["data", "update", "--source", str(exports["full"]), "--out", str(tmp_path / "none")]) == 2
    assert "not a provider vn30-qlib wrote" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_a_new_symbol_joins_all_and_a_stopped_one_keeps_its_end(market, first_provider, tmp_path):
    listed = {symbol: frame for symbol, frame in market.items() if symbol != "FPT"}
    listed["NEWCO"] = market["VNM"].loc["2024-09-23":]
    report = update(write_export(listed, tmp_path / "changed"), first_provider)
    assert report["update"]["new"] == {"NEWCO": {"status": "new", "days": 6, "first_day": "2024-09-23"}}
    assert report["update"]["not_in_export"] == {"FPT": {"status": "not_in_export", "last_day": SPLIT}}
    everything = read_instruments(first_provider, "all").set_index("symbol")
    assert everything.loc["NEWCO", "start"] == pd.Timestamp("2024-09-23")
    assert everything.loc["FPT", "end"] == pd.Timestamp(SPLIT)
    assert everything.loc["VNM", "end"] == pd.Timestamp("2024-09-30")
    assert "NEWCO" not in set(read_instruments(first_provider, "vn30")["symbol"])
    assert report["symbols"]["FPT"]["last_day"] == SPLIT and report["symbols"]["FPT"]["file"].endswith("FPT.csv")
