"""Faults a user hits with `data ingest` / `data simulate` / `data check`: each asserts the exit code, the
message, and that no byte of what was on disk before changed (sha256 of every file, before and after)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vn30_qlib.cli import main
from vn30_qlib.data.provider import MARKER, WRITING_MARKER

HEADER = "time,open,high,low,close,volume,data_source\n"
DAYS = pd.bdate_range("2024-01-02", periods=10)  # 2024-01-02 .. 2024-01-15


def rows(days=DAYS, start: float = 10.0, date_format: str = "{:%Y-%m-%d}") -> str:
    lines, close = [], start
    for day in days:
        lines.append(f"{date_format.format(day)},{close},{close * 1.01:.4f},{close * 0.99:.4f},{close},1000,TCBS\n")
        close = round(close * 1.01, 4)
    return "".join(lines)


def write_files(folder: Path, files: dict[str, str | bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return folder


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (links not followed), by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def ingest_cli(source: Path, out: Path, *extra: str) -> int:
    return main(["data", "ingest", "--source", str(source), "--out", str(out), *extra])


def assert_refused(capsys, code: int, message: str, root: Path, before: dict[str, str]) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err, err
    assert "Traceback" not in err
    assert hashes(root) == before, "a pre-existing file changed"
    return err


@pytest.fixture
def source(tmp_path) -> Path:
    return write_files(tmp_path / "src", {"AAA.csv": HEADER + rows(), "BBB.csv": HEADER + rows(start=20.0)})


# ---------------------------------------------------------------- 1. ingest never deletes what it did not write


@pytest.mark.parametrize(
    "make_out, message",
    [
        (lambda tmp, src: src, "holds the input"),
        (lambda tmp, src: src / "provider", "inside the input folder"),
        (lambda tmp, src: tmp, "holds the input"),
        (lambda tmp, src: write_files(tmp / "notes", {"thesis.tex": "years of work"}), "holds files vn30-qlib did not write"),
        (lambda tmp, src: write_files(tmp, {"a_file": "x"}) / "a_file", "is a file, not a folder"),
    ],
    ids=["source itself", "inside source", "above source", "folder with other files", "a file"],
)
def test_out_that_would_destroy_other_files_is_refused(tmp_path, source, capsys, make_out, message):
    out = make_out(tmp_path, source)
    before = hashes(tmp_path)
    assert_refused(capsys, ingest_cli(source, out), message, tmp_path, before)
    assert not [p for p in out.parent.iterdir() if ".writing-" in p.name or ".old-" in p.name]


def test_home_folder_is_refused(tmp_path, source, capsys, monkeypatch):
    home = write_files(tmp_path / "home", {".bashrc": "alias ll='ls -l'"})
    monkeypatch.setenv("HOME", str(home))
    before = hashes(tmp_path)
    assert_refused(capsys, ingest_cli(source, Path("~")), "home folder", tmp_path, before)


def test_simulate_follows_the_same_out_rules(tmp_path, capsys):
    out = write_files(tmp_path / "data", {"prices.csv": "precious"})
    before = hashes(tmp_path)
    code = main(["data", "simulate", "--out", str(out)])
    assert_refused(capsys, code, "holds files vn30-qlib did not write", tmp_path, before)


def test_a_marked_provider_is_replaced_but_files_a_user_added_to_it_are_not(tmp_path, source, capsys):
    out = tmp_path / "provider"
    assert ingest_cli(source, out) == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["written_by"] == "vn30_qlib" and "ingest_report.json" in marker["entries"]
    assert ingest_cli(source, out) == 0, "re-ingesting over its own provider is allowed"
    (out / "my_notes.txt").write_text("mine")
    before = hashes(tmp_path)
    assert_refused(capsys, ingest_cli(source, out), "my_notes.txt", tmp_path, before)


def test_a_foreign_qlib_provider_is_replaced_only_with_force(tmp_path, source, capsys):
    out = write_files(tmp_path / "qlib_data", {"calendars/day.txt": "2024-01-02\n",
                                               "instruments/all.txt": "X\t2024-01-02\t2024-01-02\n",
                                               "features/x/close.day.bin": b"\x00\x00\x00\x00\x00\x00\x80\x3f"})
    before = hashes(tmp_path)
    assert_refused(capsys, ingest_cli(source, out), "pass --force", tmp_path, before)
    assert ingest_cli(source, out, "--force") == 0
    assert (out / MARKER).is_file() and not (out / "features" / "x").exists()
    assert hashes(source) == {k[len("src/"):]: v for k, v in before.items() if k.startswith("src/")}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".qlib_data.")]


def test_a_provider_of_an_earlier_vn30_qlib_without_marker_is_replaced_with_force(tmp_path, source, capsys):
    out = tmp_path / "provider"
    assert ingest_cli(source, out) == 0
    (out / MARKER).unlink()
    before = hashes(tmp_path)
    assert_refused(capsys, ingest_cli(source, out), "earlier vn30-qlib); pass --force", tmp_path, before)
    assert ingest_cli(source, out, "--force") == 0 and (out / MARKER).is_file()


def test_force_never_replaces_an_arbitrary_folder(tmp_path, source, capsys):
    out = write_files(tmp_path / "qlib_data", {"calendars/day.txt": "2024-01-02\n", "instruments/all.txt": "",
                                               "features/.keep": "", "paper.pdf": "draft"})
    before = hashes(tmp_path)
    assert_refused(capsys, ingest_cli(source, out, "--force"), "paper.pdf", tmp_path, before)


def test_leftovers_of_killed_runs_are_removed_only_when_marked(tmp_path, source):
    out = tmp_path / "provider"
    assert ingest_cli(source, out) == 0
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # its pid no longer runs
    dead_writer = write_files(tmp_path / ".provider.writing-dead", {"features/aaa/close.day.bin": b"1234"})
    (dead_writer / WRITING_MARKER).write_text(json.dumps({"written_by": "vn30_qlib", "pid": finished.pid,
                                                          "host": os.uname().nodename}))
    old_copy = write_files(tmp_path / ".provider.old-abc", {"calendars/day.txt": "2024-01-02\n"})
    (old_copy / MARKER).write_text((out / MARKER).read_text())
    empty = tmp_path / ".provider.writing-empty"
    empty.mkdir()
    someone_elses = write_files(tmp_path / ".provider.old-mine", {"keep.txt": "not vn30-qlib's"})
    before = hashes(someone_elses)
    assert ingest_cli(source, out) == 0
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".provider."))
    assert left == [".provider.old-mine"] and hashes(someone_elses) == before


KILLER = """
import os, signal, sys
from vn30_qlib.data import provider
point, argv = sys.argv[1], sys.argv[2:]
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if point == "writing":
    calls = []
    real = provider.derive_fields
    def derive_fields(bars):
        calls.append(1)
        return die() if len(calls) == 2 else real(bars)
    provider.derive_fields = derive_fields
elif point == "before_swap":
    provider._swap_into_place = die
elif point == "after_exchange":
    provider._remove_ours = die
elif point == "between_renames":
    provider._exchange = lambda first, second: False
    real_rename, renames = os.rename, []
    def rename(*args):
        renames.append(args)
        return die() if len(renames) == 2 else real_rename(*args)
    os.rename = rename
from vn30_qlib.cli import main
sys.exit(main(argv))
"""


@pytest.mark.parametrize("point", ["writing", "before_swap", "after_exchange", "between_renames"])
def test_sigkill_during_ingest_leaves_a_complete_provider_and_the_next_run_cleans_up(tmp_path, point):
    old_source = write_files(tmp_path / "old_src", {"AAA.csv": HEADER + rows()})
    source = write_files(tmp_path / "src", {"AAA.csv": HEADER + rows(), "BBB.csv": HEADER + rows(start=20.0)})
    out, reference = tmp_path / "provider", tmp_path / "reference"
    assert ingest_cli(old_source, out) == 0 and ingest_cli(source, reference) == 0
    old, new = hashes(out), hashes(reference)
    inputs = hashes(source)
    killed = subprocess.run([sys.executable, "-c", KILLER, point, "data", "ingest", "--source", str(source),
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if point == "between_renames":  # no atomic exchange: --out is briefly missing, its old copy marked
        assert not out.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".provider.old-")]
    else:
        assert hashes(out) == (new if point == "after_exchange" else old), "a complete provider at --out"
    assert ingest_cli(source, out) == 0
    assert hashes(out) == new and hashes(source) == inputs
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".provider.")], "leftovers removed"


def test_without_atomic_exchange_the_next_run_restores_the_old_provider_first(tmp_path, source, monkeypatch):
    from vn30_qlib.data import provider

    out = tmp_path / "provider"
    assert ingest_cli(source, out) == 0
    old = hashes(out)
    monkeypatch.setattr(provider, "_exchange", lambda first, second: False)
    renames = []

    def rename_then_fail(src, dst):
        renames.append((src, dst))
        if len(renames) == 1:
            return os.replace(src, dst)
        raise KeyboardInterrupt("killed between the two renames")

    monkeypatch.setattr(provider.os, "rename", rename_then_fail)
    with pytest.raises(KeyboardInterrupt):
        ingest_cli(source, out)
    monkeypatch.undo()
    assert not out.exists()
    provider.recover_interrupted_swap(out)
    assert hashes(out) == old


# ---------------------------------------------------------------- 2. only finite, plausible numbers


def test_infinite_and_float32_overflowing_values_are_removed_with_a_reason(tmp_path, capsys):
    lines = rows().splitlines(keepends=True)
    lines[2] = "2024-01-04,10.2,inf,10.1,10.2,1000,TCBS\n"
    lines[4] = "2024-01-08,10.4,10.5,10.3,10.4,1e50,TCBS\n"
    lines[6] = "2024-01-10,10.6,10.7,10.5,-inf,1000,TCBS\n"
    source = write_files(tmp_path / "src", {"AAA.csv": HEADER + "".join(lines)})
    assert ingest_cli(source, tmp_path / "provider") == 0
    report = json.loads((tmp_path / "provider" / "ingest_report.json").read_text())["symbols"]["AAA"]
    assert report["removed"]["nonfinite_value"] == [4, 6, 8]
    for path in (tmp_path / "provider" / "features" / "aaa").glob("*.bin"):
        assert np.isfinite(np.fromfile(path, dtype="<f4")[1:][~np.isnan(np.fromfile(path, dtype="<f4")[1:])]).all()


def test_check_names_instrument_field_and_day_of_an_infinite_value(tmp_path, source, capsys):
    out = tmp_path / "provider"
    assert ingest_cli(source, out) == 0
    path = out / "features" / "bbb" / "volume.day.bin"
    values = np.fromfile(path, dtype="<f4")
    values[4] = np.inf  # calendar day 3: 2024-01-05
    values.tofile(path)
    before = hashes(tmp_path)
    capsys.readouterr()
    assert main(["data", "check", str(out)]) == 1
    assert "BBB.volume: non-finite value inf on 2024-01-05" in capsys.readouterr().out
    assert hashes(tmp_path) == before


def test_check_fails_on_an_instrument_without_feature_files(tmp_path, source, capsys):
    out = tmp_path / "provider"
    assert ingest_cli(source, out) == 0
    for path in (out / "features" / "bbb").iterdir():
        path.unlink()
    (out / "features" / "bbb").rmdir()
    before = hashes(tmp_path)
    capsys.readouterr()
    assert main(["data", "check", str(out)]) == 1
    output = capsys.readouterr()
    assert "BBB: listed in instruments/ but" in output.out and "Traceback" not in output.err
    assert hashes(tmp_path) == before


def test_vnd_prices_read_as_thousands_stop_the_ingest(tmp_path, capsys):
    source = write_files(tmp_path / "src", {"AAA.csv": HEADER + rows(start=25300.0)})
    out = write_files(tmp_path / "provider_parent", {}) / "provider"
    before = hashes(tmp_path)
    err = assert_refused(capsys, ingest_cli(source, out), "--price-unit vnd", tmp_path, before)
    assert "AAA.csv" in err and not out.exists()


@pytest.mark.parametrize(
    "text, message",
    [
        (HEADER + rows(DAYS[:2]) + "2024-01-04,10,11,9,10,1000,TCBS,extra\n", "AAA.csv, line 4: 8 fields, the header has 7"),
        ("time,open,high,low,close,volume,close\n" + rows(DAYS[:2]), "AAA.csv, line 1: the header names column(s) ['close']"),
    ],
    ids=["too many fields", "column named twice"],
)
def test_malformed_rows_and_headers_are_errors_with_file_and_line(tmp_path, capsys, text, message):
    source = write_files(tmp_path / "src", {"AAA.csv": text})
    before = hashes(tmp_path)
    assert_refused(capsys, ingest_cli(source, tmp_path / "provider"), message, tmp_path, before)


# ---------------------------------------------------------------- 3. symbol names checked before they are paths


@pytest.mark.parametrize("name", ["..csv", "...csv", "A\tB.csv", "A\nB.csv", " AAA.csv", "A B.csv"])
def test_a_file_name_that_is_not_a_symbol_is_refused(tmp_path, capsys, name):
    source = write_files(tmp_path / "src", {"GOOD.csv": HEADER + rows(), name: HEADER + rows()})
    before = hashes(tmp_path)
    err = assert_refused(capsys, ingest_cli(source, tmp_path / "provider"), repr(name), tmp_path, before)
    assert "is not SYMBOL.csv" in err and not (tmp_path / "provider").exists()


def test_a_link_to_a_file_outside_the_source_is_refused_without_echoing_it(tmp_path, capsys):
    secret = write_files(tmp_path / "private", {"id_rsa": "TOP-SECRET-KEY-MATERIAL\nmore\n"}) / "id_rsa"
    source = write_files(tmp_path / "src", {"AAA.csv": HEADER + rows()})
    (source / "KEY.csv").symlink_to(secret)
    before = hashes(tmp_path)
    capsys.readouterr()
    code = ingest_cli(source, tmp_path / "provider")
    output = capsys.readouterr()
    assert code == 2 and "a link to a file outside the source folder" in output.err
    assert "TOP-SECRET" not in output.err + output.out
    assert hashes(tmp_path) == before


# ---------------------------------------------------------------- 4. clear errors, not tracebacks


def test_dates_with_a_time_zone_become_the_exchange_local_date(tmp_path):
    # 17:00 UTC is midnight of the next day in Ho Chi Minh City; +07:00 is local already.
    text = HEADER + rows(DAYS[:5] - pd.Timedelta(days=1), date_format="{:%Y-%m-%d}T17:00:00Z") \
        + rows(DAYS[5:], start=10.5, date_format="{:%Y-%m-%d}T09:15:00+07:00")
    source = write_files(tmp_path / "src", {"AAA.csv": text})
    assert ingest_cli(source, tmp_path / "provider") == 0
    calendar = (tmp_path / "provider" / "calendars" / "day.txt").read_text().split()
    assert calendar == [f"{d:%Y-%m-%d}" for d in DAYS]


def test_a_file_that_is_not_utf8_names_the_line_and_a_bom_is_accepted(tmp_path, capsys):
    latin1 = (HEADER + rows(DAYS[:2])).encode() + "2024-01-04,10,11,9,10,1000,Sài Gòn\n".encode("latin-1")
    source = write_files(tmp_path / "src", {"AAA.csv": latin1})
    before = hashes(tmp_path)
    assert_refused(capsys, ingest_cli(source, tmp_path / "provider"), "AAA.csv, line 4: not UTF-8", tmp_path, before)
    bom = write_files(tmp_path / "bom", {"AAA.csv": "\ufeff".encode() + (HEADER + rows()).encode()})
    assert ingest_cli(bom, tmp_path / "provider") == 0


# ---------------------------------------------------------------- 8. exports from another vendor


def test_date_column_is_detected_per_file_kind(tmp_path):
    source = write_files(tmp_path / "src", {"AAA.csv": "date,open,high,low,close,volume\n" + rows().replace(",TCBS", "")})
    index = write_files(tmp_path, {"VN30.csv": HEADER + rows(start=1200.0)}) / "VN30.csv"
    assert ingest_cli(source, tmp_path / "p1", "--index", str(index)) == 0
    assert ingest_cli(source, tmp_path / "p2", "--index", str(index), "--date-column", "date") == 0
    assert (tmp_path / "p1" / "calendars" / "day.txt").read_text() == (tmp_path / "p2" / "calendars" / "day.txt").read_text()


def test_the_calendar_is_the_stocks_trading_days_and_index_days_beyond_are_reported(tmp_path, capsys):
    source = write_files(tmp_path / "src", {"AAA.csv": HEADER + rows()})
    index_days = pd.bdate_range("2023-12-28", "2024-01-19")  # 3 days before the stocks, 4 after
    index = write_files(tmp_path, {"VN30.csv": HEADER + rows(index_days, start=1200.0)}) / "VN30.csv"
    assert ingest_cli(source, tmp_path / "provider", "--index", str(index)) == 0
    assert "index: 7 days on which no stock traded were dropped (2023-12-28 .. 2024-01-19)" in capsys.readouterr().out
    calendar = (tmp_path / "provider" / "calendars" / "day.txt").read_text().split()
    assert calendar == [f"{d:%Y-%m-%d}" for d in DAYS]
    report = json.loads((tmp_path / "provider" / "ingest_report.json").read_text())
    assert len(report["calendar"]["index_days_not_traded_by_stocks"]) == 7
    assert len(report["symbols"]["VN30"]["removed"]["not_a_stock_day"]) == 7


def test_universe_decides_the_vn30_market_and_other_files_go_to_all(tmp_path, capsys):
    source = write_files(tmp_path / "src", {f"{s}.csv": HEADER + rows() for s in ("AAA", "BBB", "CCC")})
    universe = write_files(tmp_path, {"constituents.csv": "symbol\nAAA\nbbb\n"}) / "constituents.csv"
    assert ingest_cli(source, tmp_path / "provider", "--universe", str(universe)) == 0
    instruments = tmp_path / "provider" / "instruments"
    assert (instruments / "vn30.txt").read_text().split()[::3] == ["AAA", "BBB"]
    assert (instruments / "all.txt").read_text().split()[::3] == ["AAA", "BBB", "CCC"]
    assert ingest_cli(source, tmp_path / "p2") == 0
    note = json.loads((tmp_path / "p2" / "ingest_report.json").read_text())["universe"]["note"]
    assert "every file in --source is in market vn30" in note

    missing = write_files(tmp_path, {"u2.txt": "AAA\nZZZ\n"}) / "u2.txt"
    before = hashes(tmp_path)
    assert_refused(capsys, ingest_cli(source, tmp_path / "provider", "--universe", str(missing)),
                   "u2.txt, line 2: universe symbol ZZZ has no file", tmp_path, before)
