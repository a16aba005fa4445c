"""Walk-forward folds and the Optuna search: no overlap, gaps kept, test never read, search improves, resumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from conftest import small_lgb_workflow
from vn30_qlib.cv import cross_validate, folds_for, walk_forward_folds
from vn30_qlib.harness import harness_score
from vn30_qlib.loop import init_qlib_for
from vn30_qlib.workflow_config import load_workflow

CALENDAR = pd.bdate_range("2015-10-05", "2024-09-30")
TEST_START = pd.Timestamp("2023-01-01")
# L1 so strong that every leaf is shrunk to 0: constant predictions, no skill (Rank IC scored 0)
BAD_START = {"num_leaves": 2, "lambda_l1": 100000.0, "colsample_bytree": 0.1}


@pytest.mark.parametrize("scheme, train_days", [("expanding", None), ("rolling", 500)])
def test_folds_do_not_overlap_keep_the_gap_and_never_reach_the_test_segment(scheme, train_days):
    folds = walk_forward_folds(CALENDAR, "2015-10-05", "2022-12-31", n_folds=4, valid_days=120, gap_days=2,
                               scheme=scheme, train_days=train_days)
    assert len(folds) == 4
    for fold in folds:
        gap = CALENDAR[(CALENDAR > fold.train[1]) & (CALENDAR < fold.valid[0])]
        assert len(gap) == 2, "exactly the label horizon between the last training day and validation"
        assert fold.valid[1] < TEST_START and fold.train[1] < fold.valid[0]
        assert len(CALENDAR[(CALENDAR >= fold.valid[0]) & (CALENDAR <= fold.valid[1])]) == 120
        if scheme == "rolling":
            assert len(CALENDAR[(CALENDAR >= fold.train[0]) & (CALENDAR <= fold.train[1])]) == 500
    for earlier, later in zip(folds, folds[1:]):
        assert earlier.valid[1] < later.valid[0], "validation blocks never overlap"
    assert folds[-1].valid[1] == pd.Timestamp("2022-12-30")
    with pytest.raises(ValueError, match="too little training data"):
        walk_forward_folds(CALENDAR, "2015-10-05", "2022-12-31", n_folds=30, valid_days=120, gap_days=2)


@pytest.fixture(scope="module")
def small_search(tmp_path_factory) -> Path:
    """A LightGBM workflow on 8 features, 40 rounds, with a small search space beside it."""
    folder = tmp_path_factory.mktemp("search")
    small_lgb_workflow(folder, rounds=40)
    (folder / "lgb_vn30.search.yaml").write_text(
        "n_trials: 5\nseed: 0\nseeds: [0]\npruner_startup_trials: 10\n"
        "folds: {n_folds: 2, valid_days: 120, scheme: expanding}\n"
        "params:\n"
        "    num_leaves: {type: int, low: 2, high: 64, log: true}\n"
        "    lambda_l1: {type: float, low: 0.01, high: 100000.0, log: true}\n"
        "    colsample_bytree: {type: float, low: 0.1, high: 1.0}\n")
    return folder / "lgb_vn30.yaml"


def test_folds_from_a_workflow_stay_inside_train_and_valid(small_search, sim_provider):
    init_qlib_for(sim_provider(0.1))
    task, folds = folds_for(small_search, sim_provider(0.1), n_folds=2, valid_days=120)
    segments = load_workflow(small_search, {"VN30_PROVIDER": str(sim_provider(0.1))})["task"]["dataset"]["kwargs"]["segments"]
    assert folds[0].train[0] >= pd.Timestamp(segments["train"][0])
    assert folds[-1].valid[1] <= pd.Timestamp(segments["valid"][1]) < TEST_START
    with pytest.raises(ValueError, match="shorter than the label horizon 2"):
        folds_for(small_search, sim_provider(0.1), n_folds=2, valid_days=120, gap_days=1)


@pytest.mark.slow
def test_search_improves_on_a_bad_start_and_writes_a_runnable_workflow(small_search, sim_provider, tmp_path):
    from vn30_qlib.tune import tune

    provider = sim_provider(0.1)
    init_qlib_for(provider, f"sqlite:///{tmp_path / 'bad.db'}")
    task, folds = folds_for(small_search, provider, n_folds=2, valid_days=120)
    task["model"]["kwargs"].update(BAD_START)
    bad = cross_validate(task, folds, f"sqlite:///{tmp_path / 'bad.db'}", "bad")["mean_rank_ic"]
    result = tune(small_search, provider, tmp_path / "tuning", n_trials=5, start=BAD_START)
    first = optuna.load_study(study_name="lgb_vn30", storage=f"sqlite:///{tmp_path / 'tuning' / 'optuna.db'}").trials[0]
    assert first.params == BAD_START and first.value == pytest.approx(bad, abs=1e-9)
    assert bad == 0.0 and result["best_value"] > bad + 0.05, (bad, result)
    tuned = load_workflow(result["tuned_workflow"], {"VN30_PROVIDER": str(provider)})
    assert tuned["task"]["model"]["kwargs"]["num_leaves"] == result["best_params"]["num_leaves"]
    assert tuned["experiment_name"] == "lgb_tuned_vn30"
    assert tuned["task"]["dataset"]["kwargs"]["segments"]["test"]  # the base config is still merged
    # the objective is the harness score; the selection bias re-scores the best trial where the search did not look
    score = harness_score(result["tuned_workflow"], provider, tmp_path / "harness", seeds=[0], n_folds=2,
                          valid_days=120)
    assert score["rank_ic_mean"] == pytest.approx(result["best_value"], abs=1e-9)
    bias = json.loads((tmp_path / "tuning" / "selection_bias.json").read_text())
    assert bias == result["selection_bias"] and bias["search"]["rank_ic"] == result["best_value"]
    assert bias["fresh_seeds"]["seeds"] == [1000] and np.isfinite(bias["fresh_seeds"]["rank_ic"])
    unseen_ends = [pd.Timestamp(f.split("..")[1]) for f in bias["unseen_folds"]["folds"]]
    assert len(unseen_ends) == 2 and max(unseen_ends) < folds[0].valid[0]
    assert np.isfinite(bias["unseen_folds"]["rank_ic"])
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(f"sqlite:///{tmp_path / 'tuning' / 'mlruns.db'}").search_runs(
        [MlflowClient(f"sqlite:///{tmp_path / 'tuning' / 'mlruns.db'}").get_experiment_by_name("vn30_cv").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in parents if "/trial" in r.data.tags["mlflow.runName"]]  # one per trial and seed
    assert len(trials) == 5 and all("num_leaves" in r.data.params for r in trials if r.info.status == "FINISHED")
    assert sorted(r.data.tags["mlflow.runName"] for r in parents if r not in trials) == [
        "lgb_vn30/best_fresh_seeds/seed1000", "lgb_vn30/best_unseen_folds/seed0"]


@pytest.mark.slow
def test_killed_search_resumes_with_its_finished_trials(small_search, sim_provider, tmp_path):
    out = tmp_path / "tuning"
    code = ("from vn30_qlib.tune import tune; "
            f"tune({str(small_search)!r}, {str(sim_provider(0.1))!r}, {str(out)!r}, n_trials=50)")
    log = tmp_path / "tune.log"
    with log.open("w") as stderr:  # progress is read from the log: polling the study's database would race
        process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,  # its schema creation
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    storage = f"sqlite:///{out / 'optuna.db'}"

    def finished() -> list:
        study = optuna.load_study(study_name="lgb_vn30", storage=storage)
        return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]

    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and log.read_text().count(" finished with value") < 2:
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert log.read_text().count(" finished with value") >= 2, log.read_text()[-3000:]
    before = {t.number: (t.params, t.value) for t in finished()}
    assert len(before) >= 2
    from vn30_qlib.tune import tune

    done = sum(t.state.is_finished() for t in optuna.load_study(study_name="lgb_vn30", storage=storage).trials)
    tune(small_search, sim_provider(0.1), out, n_trials=done + 1)
    after = {t.number: (t.params, t.value) for t in finished()}
    assert all(after[n] == before[n] for n in before), "finished trials survive the kill unchanged"
    assert len(after) == len(before) + 1, "the resumed search adds the missing trial"


def test_epoch_callback_sees_every_epoch_and_can_stop_training():
    """The hook `vn30-qlib tune` uses to prune neural-network trials by epoch."""
    import torch

    from vn30_qlib.models.training import LoopConfig, fit_epochs

    torch.manual_seed(0)
    x, y = torch.randn(64, 3), torch.randn(64)
    days = torch.arange(64) // 8
    module = torch.nn.Linear(3, 1)
    seen = []

    def on_epoch(epoch: int, row: dict) -> None:
        seen.append((epoch, row["valid_ic"]))
        if epoch == 2:
            raise optuna.TrialPruned("pruned at epoch 2")

    config = LoopConfig(n_epochs=10, early_stop=10, on_epoch=on_epoch)
    with pytest.raises(optuna.TrialPruned):
        fit_epochs(module, torch.optim.SGD(module.parameters(), lr=0.1), lambda: [(x, y, days)],
                   lambda: module(x).reshape(-1), y, days, lambda out, label, d: ((out.reshape(-1) - label) ** 2).mean(),
                   config)
    assert [epoch for epoch, _ in seen] == [0, 1, 2]


@pytest.mark.parametrize("text, message", [
    ("params: {num_leaves: {type: int, low: 2\n", "not valid YAML"),
    ("- a list\n", "must be a mapping with keys params and folds, got list"),
    ("params: {num_leaves: {type: int, low: 2, high: 8}}\n", "key 'folds' must be a mapping, got None"),
    ("folds: {n_folds: 2}\nparams: {num_leaves: {type: integer, low: 2, high: 8}}\n",
     "params.num_leaves.type must be float, int or categorical, got 'integer'"),
    ("folds: {n_folds: 2}\nparams: {num_leaves: {type: int, low: 2}}\n", "params.num_leaves (int) lacks high"),
    ("objective: mse_learnt\nfolds: {n_folds: 2}\nparams: {}\n", "objective must be rank_ic (the harness score"),
    ("seeds: [0, 0]\nfolds: {n_folds: 2}\nparams: {}\n", "seeds must be a list of distinct integers, got [0, 0]"),
])
def test_a_malformed_search_space_is_exit_2_naming_the_file_and_key(text, message, sim_provider, tmp_path, capsys):
    from vn30_qlib.cli import main

    workflow = tmp_path / "lgb_vn30.yaml"
    workflow.write_text("task: {}\n")
    (tmp_path / "lgb_vn30.search.yaml").write_text(text)
    code = main(["tune", str(workflow), "--provider", str(sim_provider(0.1)), "--out", str(tmp_path / "tuning")])
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path / 'lgb_vn30.search.yaml'}: " in err and message in err, err
    assert "Traceback" not in err and not (tmp_path / "tuning").exists()
