"""Where fits run: the local process pool's scheduling, and the loop and the search through Ray (a local Ray
instance started by the test) against the local executor."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from conftest import small_lgb_workflow, write_workflow
from vn30_qlib import store
from vn30_qlib.executors import WorkerCannotSee, missing_paths, run_calls
from vn30_qlib.loop import LoopEntry, create_tracking_store, fit_entry, run_loop

pytestmark = pytest.mark.slow

# A model whose fit kills its own worker process, counting its attempts in a file next to it.
KILLER_MODEL = '''
import os, signal
from pathlib import Path
from qlib.model.base import Model

class KillerModel(Model):
    def __init__(self, attempts_file, **lightgbm_kwargs):  # the workflow's other kwargs are ignored
        self.attempts_file = attempts_file

    def fit(self, dataset):
        with open(self.attempts_file, "a") as handle:
            handle.write("attempt\\n")
        os.kill(os.getpid(), signal.SIGKILL)

    def predict(self, dataset, segment="test"):
        raise NotImplementedError
'''


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> list[Path]:
    """Small LightGBM and LSTM variants of the shipped workflows."""
    folder = tmp_path_factory.mktemp("ray_wf")
    lgb = small_lgb_workflow(folder)
    lstm = write_workflow(folder, "lstm_vn30.yaml", {"{{ LSTM_EPOCHS | default(100, true) }}": "2",
                                                      "hidden_size: 64": "hidden_size: 16"})
    return [lgb, lstm]


def _timed_nap(seconds: float) -> tuple[float, float]:
    start = time.monotonic()
    time.sleep(seconds)
    return start, time.monotonic()


def test_local_pool_never_runs_two_exclusive_calls_at_once():
    calls = [(1.5,), (1.5,), (0.2,), (0.2,), (0.2,)]
    spans = dict(run_calls(_timed_nap, calls, jobs=2, exclusive=[0, 1]))
    (start0, end0), (start1, end1) = spans[0], spans[1]
    assert start1 >= end0 or start0 >= end1, "the two exclusive calls overlapped"
    assert spans[2][0] < end0, "a non-exclusive call ran beside the first exclusive one"


def _stored(store_root: Path) -> dict:
    out = {}
    for version in sorted(store_root.glob("symbols/*/*/v0001")):
        meta = store.read_metadata(version)
        out[(meta["symbol"], meta["model"])] = (store.read_predictions(version, meta)["score"], meta["metrics"], meta["config_hash"])
    return out


def test_ray_loop_matches_the_local_loop(two_models, sim_provider, tmp_path):
    provider = sim_provider(0.1)
    local = run_loop(two_models, provider, tmp_path / "local", symbols=["ACB"], modes=["per_symbol"], jobs=2,
                     progress=False)
    ray = run_loop(two_models, provider, tmp_path / "ray", symbols=["ACB"], modes=["per_symbol"], jobs=2,
                   progress=False, executor="ray")
    assert [r["status"] for r in local] == [r["status"] for r in ray] == ["done"] * 2
    from_local, from_ray = _stored(tmp_path / "local"), _stored(tmp_path / "ray")
    assert set(from_local) == set(from_ray) == {("ACB", m) for m in ("lgb", "lstm")}
    for key, (pred, metrics, config_hash) in from_local.items():
        ray_pred, ray_metrics, ray_hash = from_ray[key]
        pd.testing.assert_series_equal(pred, ray_pred, rtol=0, atol=1e-6)
        assert config_hash == ray_hash
        for name, value in metrics["per_symbol"][key[0]].items():
            assert value == pytest.approx(ray_metrics["per_symbol"][key[0]][name], abs=1e-6), (key, name)
    for version in (tmp_path / "ray").glob("symbols/*/*/v0001"):
        assert store.validate(version) < 1e-6


def test_a_task_that_kills_its_worker_is_retried_then_recorded(two_models, sim_provider, tmp_path):
    (tmp_path / "killer_model.py").write_text(KILLER_MODEL)
    attempts = tmp_path / "attempts.txt"
    killer = write_workflow(tmp_path / "wf", "lgb_vn30.yaml", {
        "class: LGBModel\n        module_path: vn30_qlib.models.lgb\n        kwargs:\n":
            f"class: KillerModel\n        module_path: {tmp_path / 'killer_model.py'}\n        kwargs:\n"
            f"            attempts_file: {attempts}\n"})
    killer = killer.rename(tmp_path / "wf" / "killer_vn30.yaml")
    results = run_loop([killer, two_models[0]], sim_provider(0.1), tmp_path / "models", symbols=["ACB"],
                       modes=["per_symbol"], jobs=2, progress=False, executor="ray")
    by_model = {Path(r["workflow"]).stem: r for r in results}
    assert by_model["lgb_vn30"]["status"] == "done"
    assert by_model["killer_vn30"]["status"] == "failed" and "WorkerDied" in by_model["killer_vn30"]["error"]
    assert attempts.read_text().count("attempt") == 3, "one attempt and two retries"
    failure = json.loads((tmp_path / "models" / "failures" / "killer__per_symbol__ACB.json").read_text())
    assert "WorkerDied" in failure["error"]
    assert not list((tmp_path / "models").glob("symbols/ACB/killer/v*")), "nothing half-written"


def test_ray_search_records_every_trial(tmp_path, sim_provider):
    from vn30_qlib.tune import tune

    folder = tmp_path / "search"
    workflow = write_workflow(folder, "lgb_vn30.yaml", {"            loss: mse\n": "            loss: mse\n            num_boost_round: 20\n"},
                              "    dataset:\n        kwargs:\n            handler:\n                kwargs:\n"
                              "                    features: [KMID, KLEN, KUP, KLOW, KSFT, ROC5]\n")
    (folder / "lgb_vn30.search.yaml").write_text(
        "n_trials: 4\nseed: 0\nseeds: [0]\nfolds: {n_folds: 2, valid_days: 120, scheme: expanding}\n"
        "params:\n    num_leaves: {type: int, low: 2, high: 64, log: true}\n")
    result = tune(workflow, sim_provider(0.1), tmp_path / "tuning", executor="ray", jobs=2)
    study = optuna.load_study(study_name="lgb_vn30", storage=f"sqlite:///{tmp_path / 'tuning' / 'optuna.db'}")
    assert len(study.trials) == 4 and all(t.state.is_finished() for t in study.trials)
    assert len({t.params["num_leaves"] for t in study.trials}) > 1, "parallel trials must not all draw the same parameters"
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) >= 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'tuning' / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("vn30_cv")
    parents = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in parents if "/trial" in r.data.tags["mlflow.runName"]]
    assert len(trials) == 4, "one mlflow parent run per trial (and seed)"
    assert Path(result["tuned_workflow"]).is_file()


def test_a_node_that_cannot_see_the_provider_fails_fast(tmp_path):
    missing = str(tmp_path / "not_shared" / "provider")
    assert missing_paths([missing], [str(tmp_path)]) == [f"{__import__('socket').gethostname()}: cannot read {missing}"]
    with pytest.raises(WorkerCannotSee, match="cannot read .*not_shared/provider"):
        list(run_calls(len, [("x",)], executor="ray", jobs=1, readable=[missing]))


def test_ray_option_without_ray_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[ray\]'"):
        list(run_calls(len, [("x",)], executor="ray"))


def test_two_workers_finishing_the_same_entry_store_it_once(two_models, sim_provider, tmp_path):
    provider = str(sim_provider(0.1))
    entry = LoopEntry(str(two_models[0]), "per_symbol", "ACB")
    tracking_uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    create_tracking_store(tracking_uri)
    calls = [(entry, provider, str(tmp_path), False, tracking_uri)] * 2
    outcomes = [result for _, result in run_calls(fit_entry, calls, jobs=2)]
    assert sorted(r["status"] for r in outcomes) == ["done", "skipped"]
    assert [p.name for p in store.versions(tmp_path / "symbols" / "ACB" / "lgb")] == ["v0001"]


def _process_state(pid: int) -> str | None:
    """The state letter in /proc (``Z`` for a zombie), or None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def _pool_workers(driver_pid: int) -> list[int]:
    children = Path(f"/proc/{driver_pid}/task/{driver_pid}/children").read_text().split()
    return [int(pid) for pid in children
            if b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes()
            and b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux-only")
def test_local_workers_die_with_a_killed_driver():
    driver = subprocess.Popen([sys.executable, "-c", "import time\nfrom vn30_qlib.executors import run_calls\n"
                               "list(run_calls(time.sleep, [(120,)], jobs=1))"])
    try:
        deadline, workers = time.monotonic() + 60, []
        while not workers and time.monotonic() < deadline:
            time.sleep(0.2)
            workers = _pool_workers(driver.pid)
        assert workers, "the driver started no pool worker within 60 s"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 10
        while _process_state(workers[0]) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _process_state(workers[0]) in (None, "Z"), "the pool worker outlived its killed driver"
    finally:
        driver.kill()
