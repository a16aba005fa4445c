"""Faults of the model store and the loop's environment (issue 20, items 4-6): nothing in a store runs code when
loaded, validated or reported; a bad ``latest``, damaged files and old pickle versions are clear errors (exit 2)
that change no byte; the loop survives concurrent starts, an unwritable store, any working directory and a
platform without fcntl."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, small_lgb_workflow, write_workflow
from vn30_qlib import store
from vn30_qlib.cli import main
from vn30_qlib.loop import run_loop

pytestmark = pytest.mark.slow
SYMBOL = "ACB"


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path: to prove a refused command changed no byte."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def workflows(tmp_path_factory) -> list[Path]:
    """A 30-round LightGBM and a 2-epoch, 16-unit LSTM on one thread: a user's small variants."""
    folder = tmp_path_factory.mktemp("wf")
    lgb = small_lgb_workflow(folder)
    lstm = write_workflow(folder, "lstm_vn30.yaml", {"{{ LSTM_EPOCHS | default(100, true) }}": "2",
                                                      "{{ LSTM_THREADS | default(\"auto\", true) }}": "1",
                                                      "hidden_size: 64": "hidden_size: 16"})
    return [lgb, lstm]


@pytest.fixture(scope="module")
def stored(workflows, sim_provider, tmp_path_factory) -> Path:
    """A store with one per-symbol LightGBM and one per-symbol LSTM version; tests work on copies of it."""
    root = tmp_path_factory.mktemp("stored") / "models"
    results = run_loop(workflows, sim_provider(0.1), root, symbols=[SYMBOL], modes=["per_symbol"], progress=False)
    assert [r["status"] for r in results] == ["done", "done"], results
    return root


@pytest.fixture
def store_copy(stored, tmp_path) -> Path:
    copy = tmp_path / "models"
    shutil.copytree(stored, copy)
    return copy


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


# ---------------------------------------------------------------- 5. nothing in a store runs code

def test_versions_hold_no_pickle_and_reload_without_unpickling(stored, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pd, "read_pickle", refuse)
    for model, files in (("lgb", ["model/model.txt"]), ("lstm", ["model/fitted.json", "model/weights.pt"])):
        version = store.latest(stored / "symbols" / SYMBOL / model)
        assert sorted(store.read_metadata(version)["sha256"]) == ["config.yaml", *files, "predictions.parquet"]
        assert store.validate(version) == 0.0
        assert list(store.read_predictions(version, store.read_metadata(version)).columns) == ["score", "label"]


def test_tft_seed_ensemble_round_trips_through_its_state_dicts(sim_provider, tmp_path):
    from test_tft import SHORT_SEGMENTS, SMALL, dataset

    from vn30_qlib.models.seed_ensemble import SeedEnsemble

    data = dataset(sim_provider(0.1), segments=SHORT_SEGMENTS)
    config = {"class": "SeedEnsemble", "module_path": "vn30_qlib.models.seed_ensemble",
              "kwargs": {"seeds": [0, 1], "model": {"class": "TFT", "module_path": "vn30_qlib.models.tft",
                                                     "kwargs": {**SMALL, "n_epochs": 1, "importance_repeats": 1}}}}
    ensemble = SeedEnsemble(**config["kwargs"])
    ensemble.fit(data)
    pred = ensemble.predict(data)
    version = store.save_version(tmp_path / "entry", ensemble, {"model": config, "dataset": {}},
                                 pred.rename("score").to_frame().assign(label=0.0), _metadata())
    assert sorted(store.read_metadata(version)["sha256"]) == [
        "config.yaml", "model/seed0/fitted.json", "model/seed0/weights.pt", "model/seed1/fitted.json",
        "model/seed1/weights.pt", "predictions.parquet"]
    reloaded, _, stored_pred, _ = store.load(version)
    np.testing.assert_array_equal(reloaded.predict(data).to_numpy(), pred.to_numpy())
    np.testing.assert_array_equal(stored_pred["score"].to_numpy(), pred.to_numpy())
    for member, again in zip(ensemble.members, reloaded.members):
        pd.testing.assert_frame_equal(member.predict_quantiles(data), again.predict_quantiles(data))
        pd.testing.assert_series_equal(member.get_feature_importance(), again.get_feature_importance())
        pd.testing.assert_frame_equal(member.importance["permutation"], again.importance["permutation"])
        pd.testing.assert_frame_equal(member.importance["attention"], again.importance["attention"])
        assert member.history == again.history


def _metadata() -> dict:
    return {"model": "m", "mode": "per_symbol", "symbol": SYMBOL, "metrics": {}, "timings": {}, "provider": {},
            "data_span": {}, "config_hash": "0"}


def test_a_model_without_a_code_free_format_is_refused(tmp_path):
    from qlib.contrib.model.linear import LinearModel

    entry = tmp_path / "entry"
    with pytest.raises(store.StoreError, match="cannot store a qlib.contrib.model.linear.LinearModel"):
        store.save_version(entry, LinearModel(), {"model": {}, "dataset": {}},
                           pd.DataFrame({"score": [0.0], "label": [0.0]}), _metadata())
    assert [p.name for p in entry.iterdir()] == [], "no version and no partial folder is left"


class _RunsCode:
    """Unpickling this creates ``marker``: the proof that loading a pickle runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_an_old_pickled_version_is_refused_never_unpickled(store_copy, capsys, tmp_path):
    version = store.latest(store_copy / "symbols" / SYMBOL / "lgb")
    marker = tmp_path / "code_ran"
    shutil.rmtree(version / "model")
    (version / "predictions.parquet").unlink()
    for name in ("model.pkl", "pred.pkl"):
        (version / name).write_bytes(pickle.dumps(_RunsCode(marker)))
    metadata = json.loads((version / "metadata.json").read_text())
    del metadata["format"]
    metadata["sha256"] = {name: store.sha256_file(version / name) for name in ("model.pkl", "config.yaml", "pred.pkl")}
    (version / "metadata.json").write_text(json.dumps(metadata))
    before = tree_hashes(store_copy)
    with pytest.raises(store.StoreError, match="older vn30-qlib that pickled the model"):
        store.load(version)
    for argv in (["validate", str(version)], ["report", "--store", str(store_copy), "--out", str(tmp_path / "r")]):
        code, output = _cli(capsys, *argv)
        assert code == 2 and "never loaded (unpickling can run code); retrain it" in output, output
    assert not marker.exists(), "the old pickle was loaded"
    assert tree_hashes(store_copy) == before


def test_a_config_naming_foreign_code_is_refused(store_copy, capsys, tmp_path):
    version = store.latest(store_copy / "symbols" / SYMBOL / "lgb")
    marker = tmp_path / "code_ran"
    config_file = version / "config.yaml"
    task = yaml.safe_load(config_file.read_text())
    metadata = json.loads((version / "metadata.json").read_text())
    for model in ({"class": "Popen", "module_path": "subprocess", "kwargs": {"args": ["touch", str(marker)]}},
                  {"class": "LGBModel", "module_path": str(tmp_path / "evil.py")},
                  {"class": "init_instance_by_config", "module_path": "qlib.utils", "kwargs": {"config": {}}}):
        config_file.write_text(yaml.safe_dump({**task, "model": model}))
        metadata["sha256"]["config.yaml"] = store.sha256_file(config_file)
        (version / "metadata.json").write_text(json.dumps(metadata))
        before = tree_hashes(store_copy)
        code, output = _cli(capsys, "validate", str(version))
        assert code == 2 and f"class {model['class']!r}" in output and "a store builds nothing else" in output, output
        assert tree_hashes(store_copy) == before
    assert not marker.exists()


# ---------------------------------------------------------------- latest

def test_latest_naming_a_folder_outside_its_entry_is_refused(store_copy, capsys, tmp_path):
    other = tmp_path / "other_store"
    shutil.copytree(store_copy, other)
    entry = store_copy / "symbols" / SYMBOL / "lgb"
    (entry / "latest").write_text("../../../../other_store/symbols/ACB/lgb/v0001\n")
    before = tree_hashes(tmp_path)
    with pytest.raises(store.StoreError, match="not a version folder of this entry"):
        store.latest(entry)
    code, output = _cli(capsys, "report", "--store", str(store_copy), "--out", str(tmp_path / "report"))
    assert code == 2 and f"{entry / 'latest'}: names '../../../../other_store" in output, output
    assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize("pointer", [None, "v0009\n"])
def test_a_missing_or_dangling_latest_is_repaired_not_retrained(store_copy, workflows, sim_provider, tmp_path, pointer):
    entry = store_copy / "symbols" / SYMBOL / "lgb"
    if pointer is None:
        (entry / "latest").unlink()
    else:
        (entry / "latest").write_text(pointer)
    files = build_report_rows(store_copy, tmp_path / "report")
    assert ("lgb", SYMBOL) in files, "the entry is still in the report"
    assert (entry / "latest").read_text() == "v0001\n", "the pointer is repaired"
    again = run_loop(workflows[:1], sim_provider(0.1), store_copy, symbols=[SYMBOL], modes=["per_symbol"],
                     progress=False)
    assert again[0]["status"] == "skipped"
    assert [p.name for p in store.versions(entry)] == ["v0001"]


def build_report_rows(store_root: Path, out: Path) -> set[tuple[str, str]]:
    from vn30_qlib.report import build_report

    metrics = pd.read_csv(build_report(store_root, out)["metrics.csv"])
    return set(zip(metrics["model"], metrics["symbol"]))


# ---------------------------------------------------------------- damaged files

def test_damaged_metadata_is_a_clear_error(store_copy, capsys, tmp_path):
    version = store.latest(store_copy / "symbols" / SYMBOL / "lgb")
    metadata = version / "metadata.json"
    metadata.write_bytes(metadata.read_bytes()[:100])
    before = tree_hashes(store_copy)
    for argv in (["validate", str(version)], ["report", "--store", str(store_copy), "--out", str(tmp_path / "r")]):
        code, output = _cli(capsys, *argv)
        assert code == 2 and f"{metadata}: damaged, cannot be read as JSON" in output, output
        assert "Traceback" not in output
    assert tree_hashes(store_copy) == before


def test_a_truncated_model_file_is_a_clear_error(store_copy, capsys):
    for model, name, kind in (("lgb", "model.txt", "a LightGBM text model"), ("lstm", "weights.pt", "torch tensors")):
        version = store.latest(store_copy / "symbols" / SYMBOL / model)
        path = version / "model" / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        code, output = _cli(capsys, "validate", str(version))
        assert code == 2 and f"model/{name} does not match the checksum recorded when it was saved" in output, output
        # the same truncation with its checksum updated (a copy gone wrong before saving) names the file too
        metadata = json.loads((version / "metadata.json").read_text())
        metadata["sha256"][f"model/{name}"] = store.sha256_file(path)
        (version / "metadata.json").write_text(json.dumps(metadata))
        before = tree_hashes(store_copy)
        code, output = _cli(capsys, "validate", str(version))
        assert code == 2 and f"{path}: damaged, cannot be read as {kind}" in output, output
        assert tree_hashes(store_copy) == before


# ---------------------------------------------------------------- 6. the loop's environment

RACE = """
import sys, time
from vn30_qlib.loop import create_tracking_store
uri, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
create_tracking_store(uri)
"""


def test_processes_creating_one_tracking_store_at_once_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    start = time.time() + 8  # every process has imported mlflow by then
    processes = [subprocess.Popen([sys.executable, "-c", RACE, uri, str(start)], cwd=tmp_path,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, "\n".join(outputs)[-3000:]


def test_two_loops_started_together_both_work_and_write_nothing_in_the_cwd(workflows, sim_provider, tmp_path):
    store_root, cwd = tmp_path / "models", tmp_path / "cwd"
    cwd.mkdir()
    argv = [sys.executable, "-m", "vn30_qlib.cli", "loop", str(workflows[0]), "--provider", str(sim_provider(0.1)),
            "--store", str(store_root), "--symbols", SYMBOL, "--modes", "per_symbol"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    loops = [subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [loop.communicate(timeout=600)[0] for loop in loops]
    assert [loop.returncode for loop in loops] == [0, 0], "\n".join(outputs)[-4000:]
    assert sorted(o.split("loop finished: ")[1].split(",")[0] for o in outputs) == ["0 fitted", "1 fitted"]
    assert [p.name for p in store.versions(store_root / "symbols" / SYMBOL / "lgb")] == ["v0001"]
    assert list(cwd.iterdir()) == [], "the loop wrote into its working directory"
    assert list((store_root / "mlruns").rglob("label.pkl")), "the recorder's artifacts live under the store"


def test_an_unwritable_store_is_one_message_and_exit_2(workflows, sim_provider, tmp_path, capsys, monkeypatch):
    store_root = tmp_path / "models"
    store_root.mkdir()
    (store_root / "keep.txt").write_text("a user's file")
    before = tree_hashes(store_root)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(store_root))

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    code, output = _cli(capsys, "loop", str(workflows[0]), "--provider", str(sim_provider(0.1)), "--store",
                        str(store_root), "--symbols", SYMBOL, "--modes", "per_symbol")
    assert code == 2 and f"cannot write the model store {store_root}: Read-only file system" in output, output
    assert tree_hashes(store_root) == before


def test_a_full_disk_while_recording_a_failure_is_one_message_and_exit_2(workflows, sim_provider, tmp_path, capsys,
                                                                         monkeypatch):
    store_root = tmp_path / "models"
    write_text = Path.write_text

    def disk_full(path: Path, *args, **kwargs):
        if "failures" in path.parts:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    code, output = _cli(capsys, "loop", str(workflows[0]), "--provider", str(sim_provider(0.1)), "--store",
                        str(store_root), "--symbols", "NOPE", "--modes", "per_symbol")
    assert code == 2 and f"cannot write the model store {store_root}: No space left on device" in output, output
    assert not list((store_root / "failures").iterdir()), "no half-written failure record"


def test_loop_store_report_and_cli_import_without_fcntl(tmp_path):
    code = ("import sys; sys.modules['fcntl'] = None\n"
            "import vn30_qlib.loop, vn30_qlib.report, vn30_qlib.cli\n"
            "from pathlib import Path\n"
            "from vn30_qlib import store\n"
            f"with store.entry_lock(Path({str(tmp_path)!r})):\n"
            "    print('locked')\n")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "locked" in result.stdout, result.stderr[-3000:]


def test_the_package_never_unpickles():
    for path in (REPO / "vn30_qlib").rglob("*.py"):
        text = path.read_text()
        for call in ("pickle.load", "read_pickle", "weights_only=False", "import fcntl"):
            assert call not in text, f"{path.relative_to(REPO)} uses {call}"


def test_a_report_out_that_is_a_file_is_exit_2(stored, tmp_path, capsys):
    out = tmp_path / "report"
    out.write_text("a user's file")
    code, output = _cli(capsys, "report", "--store", str(stored), "--out", str(out))
    assert code == 2 and f"{out}: is a file, not a folder" in output and "Traceback" not in output, output
    assert out.read_text() == "a user's file"


def test_leftovers_of_killed_writers_are_removed_only_when_ours(tmp_path):
    """A killed writer leaves a `.partial-*` folder that holds the store's marker (or nothing, if it died before
    writing it): the next writer removes those; a `.partial-*` folder holding anything else is not ours."""
    entry = tmp_path / "pooled" / "lgb"
    ours, empty, foreign = (entry / f"{store.PARTIAL_PREFIX}{name}" for name in ("ours", "empty", "foreign"))
    for folder in (ours, empty, foreign):
        folder.mkdir(parents=True)
    (ours / store.PARTIAL_MARKER).write_text("x")
    (ours / "config.yaml").write_text("half written")
    (foreign / "notes.txt").write_text("a user's file")
    before = tree_hashes(foreign)
    with store.entry_lock(entry):
        store._remove_leftovers(entry)
    assert not ours.exists() and not empty.exists()
    assert tree_hashes(foreign) == before
