"""The symbol loop, the model store and the report, on the simulated market with a small LightGBM workflow."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import FEW_FEATURES, small_lgb_workflow, write_workflow
from vn30_qlib import store
from vn30_qlib.loop import adapt_task, provider_fingerprint, run_loop, stored_member_fits
from vn30_qlib.report import BEATS_T, build_report, paired_comparisons, tuned_vs_default, verdict
from vn30_qlib.workflow_config import load_workflow

pytestmark = pytest.mark.slow
SYMBOLS = ["ACB", "FPT"]


@pytest.fixture(scope="module")
def small_workflow(tmp_path_factory) -> Path:
    """lgb_vn30.yaml with fewer boosting rounds (a user's own workflow on the same base)."""
    return small_lgb_workflow(tmp_path_factory.mktemp("wf"))


@pytest.fixture(scope="module")
def looped(small_workflow, sim_provider, tmp_path_factory):
    store_root = tmp_path_factory.mktemp("loop") / "models"
    results = run_loop([small_workflow], sim_provider(0.1), store_root, symbols=SYMBOLS + ["NOPE"], jobs=2,
                       progress=False)
    return store_root, results


def test_per_symbol_mode_swaps_cross_sectional_label_norm(small_workflow, sim_provider):
    task = load_workflow(small_workflow, {"VN30_PROVIDER": str(sim_provider(0.1))})["task"]
    adapted = adapt_task(task, "per_symbol", "ACB")
    handler = adapted["dataset"]["kwargs"]["handler"]["kwargs"]
    assert handler["instruments"] == ["ACB"]
    assert [p["class"] for p in handler["learn_processors"]] == ["DropnaLabel", "ZScoreNorm"]
    pooled = adapt_task(task, "pooled", None)
    assert pooled["model"] == {key: value for key, value in task["model"].items() if key != "per_symbol_kwargs"}
    assert {**pooled, "model": task["model"]} == task
    # the TFT's handler inherits VN30Alpha158's per-day label z-score through **kwargs: swapped alike
    tft = load_workflow(Path(__file__).parents[1] / "workflows" / "tft_vn30.yaml")["task"]
    tft_handler = adapt_task(tft, "per_symbol", "ACB")["dataset"]["kwargs"]["handler"]["kwargs"]
    assert [p["class"] for p in tft_handler["learn_processors"]] == ["DropnaLabel", "ZScoreNorm"]
    # and the daily-IC stopping / loss, undefined on one name a day, become the valid loss / MSE
    assert tft["model"]["kwargs"]["metric"] == "ic"
    tft["model"]["kwargs"]["ic_loss_weight"] = 0.5  # the TFT's daily-IC loss term: the pinball loss alone per symbol
    tft["model"]["kwargs"]["market_context"] = True  # the day's mean over one name is that name's own feature
    tft["model"]["kwargs"]["sector_relative"] = True  # and a name less its sector's mean is 0
    per_symbol_tft = adapt_task(tft, "per_symbol", "ACB")["model"]["kwargs"]
    assert per_symbol_tft["metric"] == "loss" and per_symbol_tft["ic_loss_weight"] == 0.0
    assert per_symbol_tft["market_context"] is False and per_symbol_tft["sector_relative"] is False
    pooled_tft = adapt_task(tft, "pooled", None)["model"]["kwargs"]
    assert pooled_tft["ic_loss_weight"] == 0.5
    assert pooled_tft["market_context"] is True and pooled_tft["sector_relative"] is True
    tuned = load_workflow(Path(__file__).parents[1] / "workflows" / "lstm_tuned_vn30.yaml")["task"]
    assert tuned["model"]["kwargs"]["loss"] == "ic"
    assert adapt_task(tuned, "per_symbol", "ACB")["model"]["kwargs"]["loss"] == "mse"
    assert adapt_task(tuned, "pooled", None)["model"]["kwargs"]["loss"] == "ic"


def test_loop_fills_the_store_and_records_the_failure(looped):
    store_root, results = looped
    status = {(r["mode"], r["symbol"]): r["status"] for r in results}
    assert status == {("per_symbol", "ACB"): "done", ("per_symbol", "FPT"): "done",
                      ("per_symbol", "NOPE"): "failed", ("pooled", None): "done"}
    failure = json.loads((store_root / "failures" / "lgb__per_symbol__NOPE.json").read_text())
    assert failure["error"] and "Traceback" in failure["traceback"]
    for entry in [store_root / "symbols" / s / "lgb" for s in SYMBOLS] + [store_root / "pooled" / "lgb"]:
        version = store.latest(entry)
        assert version == entry / "v0001"
        assert {p.name for p in version.iterdir()} == {"model", "config.yaml", "predictions.parquet", "metadata.json",
                                                       store.PARTIAL_MARKER}
        assert [p.name for p in (version / "model").iterdir()] == ["model.txt"]
        meta = store.read_metadata(version)
        for key in ("provider", "config_hash", "data_span", "seed", "packages", "metrics", "timings",
                    "mlflow_run_id", "created"):
            assert key in meta, key
        assert meta["provider"]["first_day"] == "2015-10-05" and len(meta["provider"]["sha256"]) == 64
        assert meta["provider"]["simulated"] == {"seed": 0, "signal": 0.1, "start": "2015-10-05",
                                                 "end": "2024-09-30", "symbols": 30}
        assert store.validate(version) == 0.0
    pooled = store.read_metadata(store.latest(store_root / "pooled" / "lgb"))
    assert set(pooled["metrics"]["per_symbol"]) >= set(SYMBOLS) and pooled["metrics"]["cross_sectional"]["cs_rank_ic"] > 0.03


def test_missing_workflow_or_provider_stops_the_loop_before_it_starts(small_workflow, sim_provider, tmp_path):
    store_root = tmp_path / "models"
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope.yaml'}: workflow file not found"):
        run_loop([small_workflow, tmp_path / "nope.yaml"], sim_provider(0.1), store_root, progress=False)
    with pytest.raises(FileNotFoundError, match="not a Qlib provider"):
        run_loop([small_workflow], tmp_path / "no_provider", store_root, progress=False)
    assert not store_root.exists(), "no failure record, no tracking database"


def test_second_run_trains_nothing_and_force_retrains(looped, small_workflow, sim_provider):
    store_root, _ = looped
    again = run_loop([small_workflow], sim_provider(0.1), store_root, symbols=SYMBOLS, jobs=1, progress=False)
    assert {r["status"] for r in again} == {"skipped"}
    forced = run_loop([small_workflow], sim_provider(0.1), store_root, symbols=["ACB"], modes=["per_symbol"],
                      force=True, progress=False)
    assert forced[0]["status"] == "done" and store.latest(store_root / "symbols" / "ACB" / "lgb").name == "v0002"
    assert (store_root / "symbols" / "ACB" / "lgb" / "v0001" / "model" / "model.txt").is_file(), "versions are never overwritten"


def test_validate_catches_tampering(looped, tmp_path):
    store_root, _ = looped
    source = store.latest(store_root / "symbols" / "FPT" / "lgb")
    import shutil

    version = tmp_path / "v0001"
    shutil.copytree(source, version)
    model_file = version / "model" / "model.txt"
    model_file.write_bytes(model_file.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(store.StoreError, match="model/model.txt does not match the checksum"):
        store.validate(version)
    shutil.rmtree(version)
    shutil.copytree(source, version)
    # a consistent-looking but different model: swap in the pooled model and fix the checksum
    model_file.write_bytes((store.latest(store_root / "pooled" / "lgb") / "model" / "model.txt").read_bytes())
    meta = store.read_metadata(version)
    meta["sha256"]["model/model.txt"] = store.sha256_file(model_file)
    (version / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(store.StoreError, match="re-prediction differs"):
        store.validate(version)


def test_report_from_store_and_recorder(looped, tmp_path):
    store_root, _ = looped
    files = build_report(store_root, tmp_path / "report")
    markdown = files["report.md"].read_text()
    assert "simulated (vn30-qlib data simulate, seed 0, planted signal 0.1)" in markdown
    assert "Ref($close, -2)" in markdown and "0.15%" in markdown
    assert "NOPE" in markdown, "failed entries are listed"
    assert "| lgb | per_symbol |" in markdown and "| lgb | pooled |" in markdown
    exported = pd.read_csv(files["metrics.csv"])
    assert set(exported["mode"]) == {"per_symbol", "pooled"} and len(exported) == len(SYMBOLS) + 30
    assert "data:image/png;base64," in files["report.html"].read_text()
    for png in ("rank_ic_distribution.png", "cumulative_ic.png"):
        assert files[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_puts_a_tuned_workflow_beside_its_seed_default():
    index = pd.MultiIndex.from_tuples([("lgb", "pooled"), ("lgb", "per_symbol"), ("lgb_tuned", "pooled"),
                                       ("lstm", "pooled")], names=["model", "mode"])
    comparison = pd.DataFrame({"mean_rank_ic": [0.01, 0.005, 0.02, 0.03]}, index=index)
    pooled = pd.DataFrame({"model": ["lgb", "lgb_tuned", "lstm"], "cs_rank_ic": [0.04, 0.05, 0.06]})
    assert tuned_vs_default(comparison, pooled).to_dict("records") == [
        {"model": "lgb", "mode": "pooled", "default mean Rank IC": 0.01, "tuned mean Rank IC": 0.02,
         "default cs Rank IC": 0.04, "tuned cs Rank IC": 0.05}]


def test_sigkill_mid_loop_leaves_every_version_loadable(small_workflow, sim_provider, tmp_path):
    store_root = tmp_path / "models"
    code = ("import sys; from vn30_qlib.loop import run_loop; "
            f"run_loop([{str(small_workflow)!r}], {str(sim_provider(0.1))!r}, {str(store_root)!r}, "
            "symbols=['ACB', 'FPT', 'VNM'], modes=['per_symbol'], jobs=2, progress=False)")
    process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:  # kill while a version is being written
        if list(store_root.glob("symbols/*/lgb/.partial-*")):
            break
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for entry in store_root.glob("symbols/*/lgb"):
        for version in entry.glob("v[0-9]*"):
            store.load(version)  # every numbered version is complete
        if store.latest(entry):
            assert store.validate(store.latest(entry)) == 0.0
    resumed = run_loop([small_workflow], sim_provider(0.1), store_root, symbols=["ACB", "FPT", "VNM"],
                       modes=["per_symbol"], jobs=2, progress=False)
    assert {r["status"] for r in resumed} <= {"done", "skipped"}
    assert all(store.latest(store_root / "symbols" / s / "lgb") for s in ["ACB", "FPT", "VNM"])


def test_seeds_fit_every_entry_per_seed_and_the_report_shows_their_spread(small_workflow, sim_provider, tmp_path):
    """``run_loop(seeds=...)``: one store entry per (model, mode, symbol, seed), the seed in the model's kwargs;
    the report gives mean ± sd over seeds and a verdict per pair that never says "beats" when |t| < 2."""
    store_root = tmp_path / "models"
    results = run_loop([small_workflow], sim_provider(0.1), store_root, symbols=SYMBOLS, jobs=1, progress=False,
                       seeds=[0, 1], backtest=True)
    assert [r["status"] for r in results] == ["done"] * 6
    for seed in (0, 1):
        for entry in [store_root / "pooled" / f"lgb.seed{seed}"] + [store_root / "symbols" / s / f"lgb.seed{seed}"
                                                                  for s in SYMBOLS]:
            version = store.latest(entry)
            assert store.read_metadata(version)["seed"] == seed and store.read_task(version)["model"]["kwargs"]["seed"] == seed
    scores = [store.read_predictions(v, store.read_metadata(v))["score"]
              for v in (store.latest(store_root / "pooled" / f"lgb.seed{seed}") for seed in (0, 1))]
    assert not scores[0].equals(scores[1]), "the seed changes the fit (LightGBM's feature sampling)"
    again = run_loop([small_workflow], sim_provider(0.1), store_root, symbols=SYMBOLS, jobs=1, progress=False,
                     seeds=[0, 1])
    assert {r["status"] for r in again} == {"skipped"}
    files = build_report(store_root, tmp_path / "report")
    markdown = files["report.md"].read_text()
    assert "## Seeds: daily cross-sectional metrics, mean ± sd over seeds" in markdown
    seeds = json.loads(files["metrics.json"].read_text())["seeds"]
    assert {(row["model"], row["mode"], row["seeds"]) for row in seeds} == {("lgb", "pooled", 2), ("lgb", "per_symbol", 2)}
    pooled = next(row for row in seeds if row["mode"] == "pooled")
    assert pooled["cs_rank_ic_sd"] > 0 and pooled["rank_ic_se"] > 0
    assert f"| lgb | pooled | 2 | {pooled['cs_ic_mean']:.4f} ± {pooled['cs_ic_sd']:.4f} |" in markdown
    # backtest=True: each pooled fit ran the workflow's top-5 backtest; costs lower the excess return, and on a
    # market with a planted signal (mean daily Rank IC 0.1) the top 5 beat the equal-weight benchmark before costs
    for seed in (0, 1):
        backtest = store.read_metadata(store.latest(store_root / "pooled" / f"lgb.seed{seed}"))["metrics"]["backtest"]
        assert backtest["excess_return_without_cost"] > backtest["excess_return_with_cost"]
        assert backtest["excess_return_without_cost"] > 0.1
    assert f"{pooled['excess_return_with_cost_mean']:.4f} ± {pooled['excess_return_with_cost_sd']:.4f}" in markdown
    for pair in json.loads(files["metrics.json"].read_text())["paired_rank_ic"]:
        assert ("beats" in pair["verdict"]) == (abs(pair["t"]) >= BEATS_T)
        assert pair["verdict"] in markdown


def test_the_report_says_level_unless_the_paired_t_stat_is_at_least_two():
    assert verdict("tft pooled", "lgb pooled", 1.99) == "tft pooled and lgb pooled are level"
    assert verdict("tft pooled", "lgb pooled", -1.99) == "tft pooled and lgb pooled are level"
    assert verdict("tft pooled", "lgb pooled", None) == "tft pooled and lgb pooled are level"
    assert verdict("tft pooled", "lgb pooled", 2.0) == "tft pooled beats lgb pooled"
    assert verdict("tft pooled", "lgb pooled", -2.5) == "lgb pooled beats tft pooled"
    days = pd.bdate_range("2023-01-02", periods=200)
    noise = pd.Series(np.random.default_rng(0).normal(scale=0.1, size=200), index=days)
    daily = {"a pooled": 0.05 + noise, "b pooled": 0.05 + noise.sample(frac=1, random_state=1).set_axis(days) + 0.004,
             "c pooled": 0.05 + noise + 0.02}
    pairs = paired_comparisons(daily).set_index(["first", "second"])
    close = pairs.loc[("a pooled", "b pooled")]
    assert abs(close["t"]) < BEATS_T and close["verdict"] == "a pooled and b pooled are level"
    assert pairs.loc[("a pooled", "c pooled"), "verdict"] == "c pooled beats a pooled"  # a constant 0.02 apart


def test_seeds_reach_models_and_ensembles_and_per_symbol_kwargs_apply_per_symbol_only(small_workflow, sim_provider):
    workflows = Path(__file__).parents[1] / "workflows"
    task = load_workflow(small_workflow, {"VN30_PROVIDER": str(sim_provider(0.1))})["task"]
    assert adapt_task(task, "pooled", None, seed=3)["model"]["kwargs"]["seed"] == 3
    assert "seed" not in adapt_task(task, "pooled", None)["model"]["kwargs"]
    ensemble = load_workflow(workflows / "tft_ensemble_vn30.yaml")["task"]
    assert ensemble["model"]["kwargs"]["seeds"] == [0, 1, 2]
    single_tft = load_workflow(workflows / "tft_vn30.yaml")["task"]
    assert ensemble["dataset"]["kwargs"]["handler"] == single_tft["dataset"]["kwargs"]["handler"]
    assert ensemble["model"]["kwargs"]["model"]["kwargs"] == {key: value for key, value in
                                                           single_tft["model"]["kwargs"].items() if key != "seed"}
    assert adapt_task(ensemble, "pooled", None, seed=0)["model"]["kwargs"]["seeds"] == [0, 1, 2]
    assert adapt_task(ensemble, "pooled", None, seed=2)["model"]["kwargs"]["seeds"] == [6, 7, 8]
    # per-symbol mode reaches the TFT nested in the ensemble: its daily-IC stopping needs cross-sections
    member = ensemble["model"]["kwargs"]["model"]["kwargs"]
    assert member["metric"] == "ic"
    adapted = adapt_task(ensemble, "per_symbol", "ACB")["model"]["kwargs"]["model"]["kwargs"]
    assert adapted["metric"] == "loss" and member["metric"] == "ic", "the workflow's own task is not changed"
    lgb = load_workflow(workflows / "lgb_vn30.yaml")["task"]
    per_symbol = lgb["model"]["per_symbol_kwargs"]
    assert adapt_task(lgb, "per_symbol", "ACB")["model"]["kwargs"] == {**lgb["model"]["kwargs"], **per_symbol}
    pooled = adapt_task(lgb, "pooled", None)["model"]
    assert pooled["kwargs"] == lgb["model"]["kwargs"] and "per_symbol_kwargs" not in pooled
    with pytest.raises(ValueError, match="seeds must be distinct integers"):
        run_loop([small_workflow], sim_provider(0.1), "unused", seeds=[1, 1])


def test_per_symbol_lightgbm_learns_on_every_simulated_symbol(sim_provider, tmp_path):
    """The shipped lgb_vn30.yaml's kwargs in per-symbol mode (its ``per_symbol_kwargs``; 8 of its features): no
    symbol's predictions are constant (with the pooled L1/L2 every one was)."""
    workflow = write_workflow(tmp_path / "wf", "lgb_vn30.yaml", {"num_threads: 0 ": "num_threads: 1 "}, FEW_FEATURES)
    symbols = ["ACB", "FPT", "HPG", "VNM"]
    results = run_loop([workflow], sim_provider(0.1), tmp_path / "models", symbols=symbols, modes=["per_symbol"],
                       progress=False)
    assert [r["status"] for r in results] == ["done"] * len(symbols)
    metrics = [store.read_metadata(store.latest(tmp_path / "models" / "symbols" / s / "lgb"))["metrics"]["per_symbol"][s]
               for s in symbols]
    assert [m["degenerate"] for m in metrics] == [False] * len(symbols)
    assert all(m["rank_ic"] is not None for m in metrics)


def test_seed_ensemble_is_composed_from_stored_member_fits(sim_provider, tmp_path):
    """tft_ensemble_vn30.yaml after tft_vn30.yaml ``--seeds 0 1`` (the same small TFT in both): the loop composes
    the ensemble from the two stored fits (its stored predictions the mean of theirs, and it re-predicts them
    once reloaded); a member config or seed that differs (beyond its threads or device) finds no stored member."""
    small = {"hidden_size: {{ TFT_HIDDEN | default(64, true) }}": "hidden_size: 8",
             "n_epochs: {{ TFT_EPOCHS | default(50, true) }}": "n_epochs: 1",
             'n_threads: {{ TFT_THREADS | default("auto", true) }}': "n_threads: 1"}
    single = write_workflow(tmp_path / "wf", "tft_vn30.yaml", small)
    ensemble = write_workflow(tmp_path / "wf", "tft_ensemble_vn30.yaml",
                              {**small, "seeds: {{ TFT_SEEDS | default([0, 1, 2], true) }}": "seeds: [0, 1]"})
    provider, root = sim_provider(0.1), tmp_path / "models"
    singles = run_loop([single], provider, root, modes=["pooled"], seeds=[0, 1], progress=False)
    assert [r["status"] for r in singles] == ["done", "done"], [r.get("error") for r in singles]
    results = run_loop([ensemble], provider, root, modes=["pooled"], progress=False)
    assert results[0]["status"] == "done", results[0].get("error")
    version = store.latest(root / "pooled" / "tft_ensemble")
    metadata = store.read_metadata(version)
    assert metadata["members_from"] == ["pooled/tft.seed0/v0001", "pooled/tft.seed1/v0001"]
    member_scores = [store.read_predictions(v, store.read_metadata(v))["score"]
                     for v in (root / "pooled" / "tft.seed0" / "v0001", root / "pooled" / "tft.seed1" / "v0001")]
    stored = store.read_predictions(version, metadata)["score"]
    np.testing.assert_allclose(stored.to_numpy(), ((member_scores[0] + member_scores[1]) / 2).to_numpy(), atol=1e-6)
    assert store.validate(version) < 1e-5

    task = adapt_task(load_workflow(ensemble, {"VN30_PROVIDER": str(provider)})["task"], "pooled", None)
    fingerprint = provider_fingerprint(provider)
    damaged = root / "pooled" / "damaged" / "v0001"  # an unreadable entry beside them is no member, and no error
    damaged.mkdir(parents=True)
    (damaged / "metadata.json").write_text("{not json")
    assert stored_member_fits(task, root / "pooled", fingerprint) == [root / "pooled" / f"tft.seed{s}" / "v0001"
                                                                      for s in (0, 1)]
    elsewhere = copy.deepcopy(task)  # where, on how many threads, with what checkpoints a member ran: not what it is
    elsewhere["model"]["kwargs"]["model"]["kwargs"].update(n_threads=2, device="cpu", checkpoint_dir="checkpoints")
    assert stored_member_fits(elsewhere, root / "pooled", fingerprint) is not None
    other_seeds = copy.deepcopy(task)
    other_seeds["model"]["kwargs"]["seeds"] = [0, 2]
    assert stored_member_fits(other_seeds, root / "pooled", fingerprint) is None
    task["model"]["kwargs"]["model"]["kwargs"]["dropout"] = 0.2
    assert stored_member_fits(task, root / "pooled", fingerprint) is None


def test_per_symbol_seed_ensemble_of_tfts_fits(sim_provider, tmp_path):
    """tft_ensemble_vn30.yaml in per-symbol mode: the nested TFT's ``metric: ic`` (a daily IC, undefined on one
    name a day) becomes the valid loss, and a tiny ensemble (1 epoch, hidden 8, 2 seeds) fits and predicts."""
    workflow = write_workflow(tmp_path / "wf", "tft_ensemble_vn30.yaml", {
        "seeds: {{ TFT_SEEDS | default([0, 1, 2], true) }}": "seeds: [0, 1]",
        "hidden_size: {{ TFT_HIDDEN | default(64, true) }}": "hidden_size: 8",
        "n_epochs: {{ TFT_EPOCHS | default(50, true) }}": "n_epochs: 1",
        'n_threads: {{ TFT_THREADS | default("auto", true) }}': "n_threads: 1"})
    results = run_loop([workflow], sim_provider(0.1), tmp_path / "models", symbols=["ACB"], modes=["per_symbol"],
                       progress=False)
    assert results[0]["status"] == "done", results[0].get("error")
    version = store.latest(tmp_path / "models" / "symbols" / "ACB" / "tft_ensemble")
    assert store.read_task(version)["model"]["kwargs"]["model"]["kwargs"]["metric"] == "loss"
    stored = store.read_predictions(version, store.read_metadata(version))
    assert len(stored) > 300 and stored["score"].notna().all()


def test_experiments_qlib_creates_keep_their_artifacts_beside_the_database(sim_provider, tmp_path, monkeypatch):
    """An experiment Qlib creates on the store `init_qlib_for` set (a rolling run's, qrun-like records') writes
    its artifacts under the database's folder, not into the ``./mlruns`` of the folder the process started in."""
    from qlib.workflow import R

    from vn30_qlib.loop import init_qlib_for, sqlite_tracking_uri

    store_folder, started_in = tmp_path / "store", tmp_path / "cwd"
    store_folder.mkdir()
    started_in.mkdir()
    monkeypatch.chdir(started_in)
    init_qlib_for(sim_provider(0.1), sqlite_tracking_uri(store_folder))
    with R.start(experiment_name="made_by_qlib"):
        R.save_objects(**{"note.txt": "kept"})
    assert list(started_in.iterdir()) == []
    assert [path.name for path in (store_folder / "mlruns").rglob("note.txt")] == ["note.txt"]
