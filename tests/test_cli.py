"""The command line as a newcomer meets it: help and defaults, one error style (``error: ...`` on stderr, exit 2)
for bad input, inputs checked before a loop or a search starts, and a report that never overwrites a folder it did
not write and says which market it describes."""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO, run_qrun, small_lgb_workflow
from vn30_qlib.cli import build_parser, main


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (a missing folder: empty)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


def sub_commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every leaf sub-command parser by its command line, e.g. ``data simulate``."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found |= sub_commands(child, f"{prefix}{name} ") or {f"{prefix}{name}": child}
    return found


def test_every_option_has_help_that_names_its_default(capsys):
    commands = sub_commands(build_parser())
    assert set(commands) == {"data ingest", "data simulate", "data check", "data update", "loop", "report", "tune",
                             "validate", "predict", "rolling", "retrain", "harness"}
    for command, parser in commands.items():
        with pytest.raises(SystemExit) as exit_info:
            main([*command.split(), "--help"])
        assert exit_info.value.code == 0
        shown = " ".join(capsys.readouterr().out.split())
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"{command} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help text"
            if not action.option_strings or action.required or isinstance(action, argparse._StoreTrueAction):
                continue  # positional, required or a flag: no default to name
            assert "(default: " in action.help, f"{where}: its help does not name its default"
            if action.default is not None:
                default = " ".join(action.default) if isinstance(action.default, list) else str(action.default)
                assert f"(default: {default})" in shown, f"{where}: default {default!r} not shown in --help"


def test_bad_counts_are_refused_by_the_parser(capsys):
    for argv in (["loop", "w.yaml", "--jobs", "0"], ["tune", "w.yaml", "--trials", "0"], ["tune", "w.yaml", "--jobs", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "must be 1 or more" in capsys.readouterr().err


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_loop_with_a_missing_workflow_stops_before_it_starts(sim_provider, tmp_path, capsys):
    store_root = tmp_path / "models"
    (store_root / "failures").mkdir(parents=True)
    (store_root / "failures" / "kept.json").write_text("{}")
    before = folder_hashes(store_root)
    code, out, err = run_cli(["loop", str(tmp_path / "nope.yaml"), "--provider", str(sim_provider(0.1)),
                              "--store", str(store_root)], capsys)
    assert code == 2 and out == ""
    assert err == f"error: {tmp_path / 'nope.yaml'}: workflow file not found\n"
    assert folder_hashes(store_root) == before, "no failure record, no tracking database"
    code, _, err = run_cli(["loop", str(REPO / "workflows" / "lgb_vn30.yaml"), "--provider", str(tmp_path / "none"),
                            "--store", str(tmp_path / "other")], capsys)
    assert code == 2 and err.startswith(f"error: {tmp_path / 'none'}: not a Qlib provider")
    assert not (tmp_path / "other").exists()


def test_tune_with_a_missing_workflow_or_provider_writes_nothing(sim_provider, tmp_path, capsys):
    out = tmp_path / "tuning"
    code, _, err = run_cli(["tune", str(tmp_path / "nope.yaml"), "--provider", str(sim_provider(0.1)),
                            "--out", str(out)], capsys)
    assert code == 2 and err == f"error: {tmp_path / 'nope.yaml'}: workflow file not found\n"
    code, _, err = run_cli(["tune", str(REPO / "workflows" / "lgb_vn30.yaml"), "--provider", str(tmp_path / "none"),
                            "--out", str(out)], capsys)
    assert code == 2 and err.startswith(f"error: {tmp_path / 'none'}: not a Qlib provider")
    assert not out.exists()


@pytest.fixture(scope="module")
def small_store(sim_provider, tmp_path_factory) -> Path:
    """A model store from a 30-round LightGBM on the simulated market: one symbol and the pooled fit."""
    from vn30_qlib.loop import run_loop

    folder = tmp_path_factory.mktemp("cli")
    workflow = small_lgb_workflow(folder / "wf")
    store_root = folder / "models"
    results = run_loop([workflow], sim_provider(0.1), store_root, symbols=["ACB"], jobs=1, progress=False)
    assert {r["status"] for r in results} == {"done"}
    return store_root


@pytest.mark.slow
def test_report_writes_into_the_store_by_default_and_states_the_simulated_market(small_store, tmp_path, capsys):
    store_root = tmp_path / "models"
    shutil.copytree(small_store, store_root)
    code, out, err = run_cli(["report", "--store", str(store_root)], capsys)
    assert code == 0, err
    report = store_root / "report"
    marker = json.loads((report / "vn30_report.json").read_text())
    assert sorted(marker["entries"]) == sorted(p.name for p in report.iterdir() if p.name != "vn30_report.json")
    assert f"wrote {report / 'report.md'}" in out
    header = (report / "report.md").read_text().split("## ")[0]
    assert "simulated (vn30-qlib data simulate, seed 0, planted signal 0.1)" in header
    assert "not real prices" in header and "no survivorship bias" in header
    assert "October 2025" not in header
    assert json.loads((report / "metrics.json").read_text())["header"]["market"].startswith("simulated")
    # the provider by its folder's name and fingerprint: no path of this machine in a report meant to be shared
    assert "- **provider**: provider (sha256 " in header
    for name in ("report.md", "report.html", "metrics.json", "metrics.csv"):
        assert str(tmp_path.parents[1]) not in (report / name).read_text(), name
    # its own folder is rewritten; a file an earlier report wrote and this one does not is removed
    marker["entries"].append("cumulative_ic.png")
    (report / "vn30_report.json").write_text(json.dumps(marker))
    (report / "cumulative_ic.png").unlink()
    (report / "rank_ic_distribution.png").write_bytes(b"old")
    shutil.rmtree(store_root / "pooled")
    code, _, err = run_cli(["report", "--store", str(store_root)], capsys)
    assert code == 0, err
    assert not (report / "cumulative_ic.png").exists()
    assert (report / "rank_ic_distribution.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cumulative_ic.png" not in json.loads((report / "vn30_report.json").read_text())["entries"]


@pytest.mark.slow
def test_report_states_survivorship_for_a_real_provider(small_store, tmp_path):
    from vn30_qlib.report import describe_setup

    version = tmp_path / "v0001"
    shutil.copytree(small_store / "symbols" / "ACB" / "lgb" / "v0001", version)
    metadata = json.loads((version / "metadata.json").read_text())
    metadata["provider"]["simulated"] = None  # what the fingerprint of an ingested provider records
    (version / "metadata.json").write_text(json.dumps(metadata))
    header = describe_setup(version)
    assert header["market"] == "real daily bars (vn30-qlib data ingest)"
    assert "October 2025" in header["universe"] and "survivorship bias" in header["universe"]


@pytest.mark.slow
def test_report_refuses_a_folder_it_did_not_write(small_store, tmp_path, capsys):
    committed = tmp_path / "reports"
    shutil.copytree(REPO / "reports", committed)  # the repository's real-data report, as an older vn30-qlib wrote
    (committed / "vn30_report.json").unlink()       # it: without the marker naming the report's files
    (tmp_path / "notes.txt").write_text("mine")
    for out, named in ((committed, "cumulative_ic.png"), (small_store, "symbols"), (tmp_path, "notes.txt"),
                       (tmp_path / "notes.txt", "is a file")):
        before, store_before = folder_hashes(tmp_path), folder_hashes(small_store)
        code, stdout, err = run_cli(["report", "--store", str(small_store), "--out", str(out)], capsys)
        assert code == 2 and stdout == ""
        assert err.startswith(f"error: {out}: ") and named in err and err.count("\n") == 1, err
        assert folder_hashes(tmp_path) == before and folder_hashes(small_store) == store_before


def test_report_on_a_missing_store_is_one_error_line(tmp_path, capsys):
    code, out, err = run_cli(["report", "--store", str(tmp_path / "models"), "--out", str(tmp_path / "report")],
                             capsys)
    assert code == 2 and out == ""
    assert err == f"error: {tmp_path / 'models'}: no model store here; fill one with vn30-qlib loop, or pass --store\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_readme_recorder_snippet_opens_the_newest_finished_run(sim_provider, tmp_path):
    """The README's snippet, against a finished qrun followed by a run still going (or killed: mlflow leaves
    it RUNNING)."""
    from mlflow.tracking import MlflowClient
    from qlib.utils.exceptions import LoadObjectError
    from qlib.workflow import R

    from vn30_qlib.loop import sqlite_tracking_uri

    finished = run_qrun(str(small_lgb_workflow(tmp_path / "wf")), sim_provider(0.1), tmp_path, "lgb_vn30")
    client = MlflowClient(tracking_uri=sqlite_tracking_uri(tmp_path))
    running = client.create_run(client.get_experiment_by_name("lgb_vn30").experiment_id, run_name="still running")
    # the old snippet: the newest recorder, whatever its state
    recorders = R.list_recorders(experiment_name="lgb_vn30")
    newest = R.get_recorder(recorder_id=next(iter(recorders)), experiment_name="lgb_vn30")
    assert newest.id == running.info.run_id
    with pytest.raises(LoadObjectError):
        newest.load_object("pred.pkl")
    # the README's snippet
    rec = R.get_exp(experiment_name="lgb_vn30", create=False).list_recorders(rtype="list", status="FINISHED")[0]
    assert rec.id == finished.id
    assert len(rec.load_object("pred.pkl")) > 0
