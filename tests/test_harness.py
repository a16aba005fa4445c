"""The harness, the one judge of a modelling choice: a model that learns the planted signal scores above one that
predicts a constant by far more than the noise, over folds of train + valid only, and the CLI says so."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from conftest import small_lgb_workflow
from vn30_qlib.cli import main

VALID_END = pd.Timestamp("2022-12-28")  # base_vn30.yaml's purged valid end: no fold may score a later day


def test_the_harness_ranks_a_learner_above_a_constant_on_train_and_valid_days_only(sim_provider, tmp_path, capsys):
    learner = small_lgb_workflow(tmp_path / "learner", rounds=20)
    written = small_lgb_workflow(tmp_path / "constant", rounds=20)
    constant = written.with_name("lgb_constant.yaml")  # L1 so strong that every leaf is 0
    constant.write_text(written.read_text().replace("lambda_l1: 205.6999", "lambda_l1: 100000.0"))
    out = tmp_path / "harness"
    code = main(["harness", str(learner), str(constant), "--provider", str(sim_provider(0.1)), "--out", str(out),
                 "--seeds", "0,1", "--folds", "2", "--valid-days", "60"])
    printed = capsys.readouterr().out
    assert code == 0
    results = json.loads((out / "harness.json").read_text())
    good, bad = results["scores"]
    assert good["days"] == bad["days"] == 120 and good["seeds"] == [0, 1]
    for fold in good["folds"]:
        assert pd.Timestamp(fold["valid"].split("..")[1]) <= VALID_END
    assert good["rank_ic_mean"] > 0.05 and good["rank_ic_mean"] > 4 * good["rank_ic_se"]
    assert good["seed_sd"] > 0  # the seed changes LightGBM's feature sampling
    assert bad["rank_ic_mean"] == 0.0  # constant predictions score no skill, not NaN
    (pair,) = results["comparisons"]
    assert pair["mean"] == pytest.approx(-good["rank_ic_mean"]) and pair["t"] < -2
    assert pair["verdict"] == "lgb_vn30 beats lgb_constant"
    assert f"Rank IC {good['rank_ic_mean']:.4f} ± {good['rank_ic_se']:.4f}" in printed


def test_bad_seeds_or_skipped_folds_are_exit_2(tmp_path, capsys):
    for seeds in ("0,0", "a,b", ""):
        assert main(["harness", "w.yaml", "--seeds", seeds, "--out", str(tmp_path / "h")]) == 2
        assert "--seeds must be distinct integers" in capsys.readouterr().err
    for skip in ("4", "-1"):
        assert main(["harness", "w.yaml", "--folds", "4", "--skip-last", skip, "--out", str(tmp_path / "h")]) == 2
        assert f"--skip-last must be at least 0 and leave some of the 4 folds to score, got {skip}" in \
            capsys.readouterr().err
    assert not (tmp_path / "h").exists()


def test_skip_last_scores_the_folds_before_the_last_ones(sim_provider, tmp_path):
    """``--folds 3 --skip-last 1`` fits and scores the first two of the three folds, and nothing after them."""
    from vn30_qlib.cv import folds_for
    from vn30_qlib.harness import harness_score

    workflow = small_lgb_workflow(tmp_path / "wf", rounds=5)
    score = harness_score(workflow, sim_provider(0.1), tmp_path / "harness", seeds=[0], n_folds=3, valid_days=60,
                          skip_last=1)
    _, folds = folds_for(workflow, sim_provider(0.1), 3, 60)
    assert [fold["valid"] for fold in score["folds"]] == [f"{f.valid[0]:%Y-%m-%d}..{f.valid[1]:%Y-%m-%d}"
                                                         for f in folds[:2]]
    days = score["predictions"].index.get_level_values("datetime")
    assert score["days"] == 120 and days.max() <= folds[1].valid[1] < folds[2].valid[0]


def test_the_harness_keeps_the_predictions_its_score_is_made_of(sim_provider, tmp_path):
    """Each seed's kept validation predictions give back the harness's daily series, so an ensemble of fitted
    workflows can be scored from them without refitting; they hold the folds' validation days only."""
    from vn30_qlib.harness import harness_score
    from vn30_qlib.metrics import daily_rank_ic

    workflow = small_lgb_workflow(tmp_path / "wf", rounds=20)
    score = harness_score(workflow, sim_provider(0.1), tmp_path / "harness", seeds=[0, 1], n_folds=2, valid_days=60)
    predictions = score["predictions"]
    assert list(predictions.index.names) == ["seed", "fold", "datetime", "instrument"]
    rebuilt = pd.concat({seed: daily_rank_ic(frame["score"].droplevel(["seed", "fold"]),
                                             frame["label"].droplevel(["seed", "fold"]))
                         for seed, frame in predictions.groupby(level="seed")}, axis=1).mean(axis=1)
    pd.testing.assert_series_equal(rebuilt, score["daily"], check_names=False)
    days = predictions.index.get_level_values("datetime")
    assert days.nunique() == score["days"] == 120 and days.max() <= VALID_END
