"""Rolling retraining and DDG-DA through Qlib's own rolling module (issue 23, items 1, 2, 3 and 6).

A small LightGBM workflow (8 K-bar and price features, 40 rounds) on simulated markets with a planted signal of
strength 0.1: one whose signal flips sign on the first test day (``data simulate --drift``), one stationary. Each
rolling task's fit is instrumented: the label days its handler hands out must read no close of its test window.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from vn30_qlib.cli import main

pytestmark = pytest.mark.slow

REACH = 2  # the label Ref($close, -2) / Ref($close, -1) - 1 reads two trading days ahead
DRIFT_DATE = "2022-01-04"  # the first test day of SEGMENTS
SEGMENTS = dict(start="2019-01-02", train_end="2021-10-27", valid_start="2021-11-01", valid_end="2021-12-29",
                test_start="2022-01-01", test_end="2023-12-27")
STEP = 60
TRAIN_WINDOW = 250  # trading days: a sliding window forgets the regime before the change
DDGDA_TEST_END = "2022-06-29"  # two tasks of 60 days

WORKFLOW = """\
BASE_CONFIG_PATH: {base}
experiment_name: small_lgb
qlib_init:
    provider_uri: {{{{ VN30_PROVIDER }}}}
data_handler_config: &data_handler_config
    start_time: {start}
    end_time: 2024-09-30
    fit_start_time: {start}
    fit_end_time: {train_end}
    instruments: vn30
    features: [KMID, KLOW, KUP, KSFT, KLEN, ROC5, STD5, RSV5]
task:
    model:
        class: LGBModel
        module_path: vn30_qlib.models.lgb
        kwargs: {{num_boost_round: 40, early_stopping_rounds: 10, num_leaves: 7, min_data_in_leaf: 100,
                 learning_rate: 0.1, lambda_l2: 10.0, num_threads: 1}}
    dataset:
        kwargs:
            handler:
                kwargs: *data_handler_config
            segments:
                train: [{start}, {train_end}]
                valid: [{valid_start}, {valid_end}]
                test: [{test_start}, {test_end}]
{records}"""
# the signal records only (the full list, with the VN backtest, runs in the DDG-DA test)
SIGNAL_RECORDS = """\
    record:
        - {class: SignalRecord, module_path: qlib.workflow.record_temp, kwargs: {model: <MODEL>, dataset: <DATASET>}}
        - {class: VN30SigAnaRecord, module_path: vn30_qlib.records, kwargs: {ana_long_short: false, ann_scaler: 252}}
"""


def write_small_workflow(folder: Path, records: str = SIGNAL_RECORDS, **segments) -> Path:
    path = folder / "small_lgb.yaml"
    path.write_text(WORKFLOW.format(base=REPO / "workflows" / "base_vn30.yaml", records=records,
                                    **{**SEGMENTS, **segments}))
    return path


def folder_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


class FitLabelReads:
    """Wraps `LGBModel.fit`: for each fit, its dataset's test window and the days of every label its handler
    hands out during the fit (train, and valid for early stopping)."""

    def __init__(self):
        self.fits: list[tuple[pd.Timestamp, set[pd.Timestamp]]] = []
        self.reweighters: list = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from vn30_qlib.models.lgb import LGBModel

        fit = LGBModel.fit

        def recorded_fit(model, dataset, *args, reweighter=None, **kwargs):
            days: set[pd.Timestamp] = set()
            handler, fetch = dataset.handler, dataset.handler.fetch

            def recorded_fetch(*fetch_args, **fetch_kwargs):
                frame = fetch(*fetch_args, **fetch_kwargs)
                col_set = fetch_kwargs.get("col_set", fetch_args[1] if len(fetch_args) > 1 else "__all")
                if (col_set in ("label", "__all") or (isinstance(col_set, list) and "label" in col_set)) and len(frame):
                    labels = frame["label"] if isinstance(frame.columns, pd.MultiIndex) else frame
                    days.update(frame.index.get_level_values("datetime")[labels.notna().any(axis=1).to_numpy()])
                return frame

            handler.fetch = recorded_fetch
            try:
                return fit(model, dataset, *args, reweighter=reweighter, **kwargs)
            finally:
                del handler.fetch  # the class's method again
                self.fits.append((pd.Timestamp(dataset.segments["test"][0]), days))
                self.reweighters.append(reweighter)

        monkeypatch.setattr(LGBModel, "fit", recorded_fit)


def assert_fits_read_before_their_test(fits: list, calendar: pd.DatetimeIndex, step: int, most_days: int) -> None:
    """One fit per ``step`` test days, in order; each read labels (at most ``most_days`` days) whose closes all
    come before its test window opens, cut by exactly one purge (the last label day read is REACH + 1 trading days
    before the test start)."""
    tests = pd.DatetimeIndex([start for start, _ in fits])
    assert tests.is_monotonic_increasing and (np.diff(calendar.get_indexer(tests)) == step).all(), tests
    for test_start, days in fits:
        assert days, "the fit read no label"
        last_read = calendar.get_loc(max(days))
        assert calendar[last_read + REACH] < test_start, (f"the label of {max(days):%Y-%m-%d} reads the close of "
                                                          f"{calendar[last_read + REACH]:%Y-%m-%d}, in the test "
                                                          f"window from {test_start:%Y-%m-%d}")
        assert last_read + REACH + 1 == calendar.get_loc(test_start), "one purge, no more"
        assert len(days) <= most_days, len(days)


def static_rank_ic(workflow: Path, provider: Path, tracking_uri: str, experiment: str) -> pd.Series:
    """The daily Rank IC of the workflow fitted once, as ``qrun`` fits it."""
    from qlib.model.trainer import task_train

    from vn30_qlib.loop import init_qlib_for
    from vn30_qlib.workflow_config import load_workflow

    init_qlib_for(provider, tracking_uri)
    task = load_workflow(workflow, {"VN30_PROVIDER": str(provider)})["task"]
    return task_train(task, experiment_name=experiment).load_object("sig_analysis/ric.pkl")


def rolling_vs_static(provider: Path, folder: Path, uri: str) -> dict:
    """Static and rolling (sliding TRAIN_WINDOW, STEP) daily Rank IC on ``provider``, each rolling fit's reads."""
    from vn30_qlib.rolling.command import run_rolling

    workflow = write_small_workflow(folder)
    reads = FitLabelReads()
    static = static_rank_ic(workflow, provider, uri, "static")
    with pytest.MonkeyPatch.context() as monkeypatch:
        reads.install(monkeypatch)
        recorder = run_rolling(workflow, provider, STEP, train_window=TRAIN_WINDOW, tracking_uri=uri)
    return {"static": static, "rolling": recorder.load_object("sig_analysis/ric.pkl"), "reads": reads.fits,
            "recorder": recorder}


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One mlflow store for the module's runs (creating one takes seconds)."""
    from vn30_qlib.loop import sqlite_tracking_uri

    return sqlite_tracking_uri(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(scope="module")
def drifting(tmp_path_factory, tracking_uri) -> dict:
    from vn30_qlib.data.simulate import write_simulated_provider

    folder = tmp_path_factory.mktemp("drift")
    provider = write_simulated_provider(folder / "provider", seed=0, signal=0.1, start="2018-06-01",
                                        drift=DRIFT_DATE)
    return {"provider": provider, **rolling_vs_static(provider, folder, tracking_uri)}


def paired(result: dict) -> pd.DataFrame:
    return pd.concat([result["static"].rename("static"), result["rolling"].rename("rolling")], axis=1).dropna()


def test_rolling_lightgbm_follows_a_regime_change_that_static_lightgbm_misses(drifting):
    """The planted signal flips sign on the first test day. Static LightGBM keeps the old sign; rolling LightGBM
    on a 250-day window relearns it once its windows hold the new regime. Measured (seed 0, 496 test days):
    static -0.087, rolling +0.033, paired difference 0.120 with a standard error of 0.013 (from 2022-10 on:
    rolling +0.070). The margin asked, 0.06, is 4.7 standard errors; the measured difference is 9.4."""
    days = paired(drifting)
    difference = days["rolling"] - days["static"]
    standard_error = difference.std() / np.sqrt(len(difference))
    assert days["static"].mean() < -0.03, "the static model should be wrong after the flip"
    assert difference.mean() > 0.06, (difference.mean(), standard_error)
    assert difference.mean() > 4 * standard_error
    late = days[days.index >= "2022-10-01"]  # once the windows hold only the new regime
    assert late["rolling"].mean() > 0.04, late["rolling"].mean()


def test_each_rolling_fit_reads_no_label_of_its_test_window(drifting):
    """Every task's fit (train, and valid for early stopping) reads only labels whose closes come before its
    test window opens, and no more than its sliding train window and valid segment."""
    from qlib.data import D

    calendar = pd.DatetimeIndex(D.calendar(freq="day"))
    test_days = calendar[(calendar >= SEGMENTS["test_start"]) & (calendar <= SEGMENTS["test_end"])]
    assert len(drifting["reads"]) == int(np.ceil(len(test_days) / STEP))
    assert drifting["reads"][0][0] == test_days[0]
    valid_days = ((calendar >= SEGMENTS["valid_start"]) & (calendar <= SEGMENTS["valid_end"])).sum()
    assert_fits_read_before_their_test(drifting["reads"], calendar, STEP, TRAIN_WINDOW + valid_days)


def test_on_a_stationary_market_rolling_and_static_are_level(sim_provider, tmp_path, tracking_uri):
    """Same workflow and rolling set-up, no regime change: level within 0.025 (a quarter of the planted signal).
    Measured (seed 0): static 0.114, rolling 0.099, paired difference -0.015 with a standard error of 0.005: the
    250-day window costs a little skill when nothing changes, far less than it gains after a change (0.12)."""
    days = paired(rolling_vs_static(sim_provider(0.1), tmp_path, tracking_uri))
    difference = days["rolling"] - days["static"]
    assert days["static"].mean() > 0.05 and days["rolling"].mean() > 0.05
    assert abs(difference.mean()) < 0.025, difference.mean()


def test_the_rolling_recorder_holds_the_joined_predictions_like_a_qrun(drifting):
    recorder = drifting["recorder"]
    pred = recorder.load_object("pred.pkl")
    dates = pred.index.get_level_values("datetime")
    assert f"{dates.min():%Y-%m-%d}" == DRIFT_DATE and dates.max() <= pd.Timestamp(SEGMENTS["test_end"])
    assert not pred.index.duplicated().any()
    params = recorder.list_params()
    assert params["method"] == "rr" and params["step"] == str(STEP) and params["train_window"] == f"{TRAIN_WINDOW}d"
    metrics = recorder.list_metrics()
    for key in ("IC", "ICIR", "Rank IC", "Rank ICIR"):
        assert np.isfinite(metrics[key]), key


DDGDA_OPTIONS = {"hist_step_n": 3, "max_epoch": 1, "fea_imp_n": 4}  # the proxy data: LightGBM's top 4 of 8


def test_ddgda_runs_end_to_end_and_writes_its_recorder(drifting, tmp_path, tracking_uri):
    """Qlib's DDG-DA on the drifting market with the workflow's full records (the VN backtest included); its
    meta-model trains only on meta-tasks whose labels end before the test window. `DDGDARetrain`, the model the
    loop and the store keep, fits the same inside an open run (the loop's): the same predictions, its internal
    runs kept out of the caller's store, and stored and rebuilt without a pickle it predicts the same again."""
    import torch
    from qlib.data import D
    from qlib.utils import init_instance_by_config
    from qlib.workflow import R

    from vn30_qlib.model_files import read_model, write_model
    from vn30_qlib.rolling.command import run_rolling
    from vn30_qlib.workflow_config import load_workflow

    record = load_workflow(REPO / "workflows" / "lgb_vn30.yaml")["task"]["record"]
    for entry in record:  # the backtest over the test segment below
        if entry["class"] == "VN30PortAnaRecord":
            entry["kwargs"]["config"]["backtest"].update(start_time=DRIFT_DATE, end_time=DDGDA_TEST_END)
    records = "    record: " + json.dumps(record, default=str) + "\n"
    workflow = write_small_workflow(tmp_path, records=records, start="2020-01-02", test_end=DDGDA_TEST_END)
    reads = FitLabelReads()
    with pytest.MonkeyPatch.context() as monkeypatch:
        reads.install(monkeypatch)
        recorder = run_rolling(workflow, drifting["provider"], 60, method="ddgda",
                               tracking_uri=tracking_uri, ddgda_options=DDGDA_OPTIONS)
    metrics = recorder.list_metrics()
    for key in ("IC", "Rank IC", "1day.excess_return_with_cost.annualized_return"):
        assert np.isfinite(metrics[key]), key
    assert recorder.list_params()["method"] == "ddgda"
    assert torch.is_grad_enabled(), "Qlib's meta-model left autograd off for the rest of the process"
    calendar = pd.DatetimeIndex(D.calendar(freq="day"))
    assert_fits_read_before_their_test(reads.fits, calendar, 60, 10_000)
    test_days = ((calendar >= pd.Timestamp(DRIFT_DATE)) & (calendar <= pd.Timestamp(DDGDA_TEST_END))).sum()
    assert len(reads.fits) == int(np.ceil(test_days / 60)) and all(reweighter is not None for reweighter in reads.reweighters)
    # the meta-model trains on the meta-tasks whose test windows end before the split date, REACH trading days
    # before the test start: the last label it reads reads no test close
    params = recorder.list_params()
    split = calendar[calendar.searchsorted(pd.Timestamp(DRIFT_DATE)) - REACH]
    assert params["meta_train_split"] == f"{split:%Y-%m-%d}" and int(params["meta_train_tasks"]) >= 1
    last_read = calendar[calendar.get_loc(pd.Timestamp(params["meta_train_last_test_end"])) + REACH]
    assert last_read < pd.Timestamp(DRIFT_DATE), f"the meta-model read the close of {last_read:%Y-%m-%d}"
    # DDG-DA's internal runs (proxy models, meta-model: pickled artifacts) stay out of the user's store
    assert not [name for name in R.list_experiments() if name.startswith(params["rolling_exp"] + "_")]

    task = load_workflow(workflow, {"VN30_PROVIDER": str(drifting["provider"])})["task"]
    config = {"class": "DDGDARetrain", "module_path": "vn30_qlib.models.ddgda_retrain",
              "kwargs": {"model": task["model"], "step": 60, **DDGDA_OPTIONS}}
    model, dataset = init_instance_by_config(config), init_instance_by_config(task["dataset"])
    experiments = set(R.list_experiments())
    model_reads = FitLabelReads()
    with pytest.MonkeyPatch.context() as monkeypatch, R.start(experiment_name="ddgda_retrain"):
        model_reads.install(monkeypatch)
        run_id = R.get_recorder().id
        model.fit(dataset)
        assert R.get_recorder().id == run_id, "the caller's run is no longer the active one"
    assert set(R.list_experiments()) == experiments | {"ddgda_retrain"}, "DDG-DA's internal runs reached the store"
    assert torch.is_grad_enabled()
    assert_fits_read_before_their_test(model_reads.fits, calendar, 60, 10_000)
    assert [start for start, _ in model_reads.fits] == [start for start, _ in reads.fits]
    assert len(model.time_weights) == len(model.windows) and all(w.notna().all() for w in model.time_weights)
    ours, qlibs = model.predict(dataset), recorder.load_object("pred.pkl").iloc[:, 0]
    assert ours.index.equals(qlibs.index)
    np.testing.assert_allclose(ours.to_numpy(), qlibs.to_numpy(), rtol=0, atol=1e-12)
    write_model(model, tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["time_weights.csv", "window0", "window1",
                                                                      "windows.json"]
    restored = read_model(config, tmp_path / "model")
    np.testing.assert_array_equal(restored.predict(dataset).to_numpy(), ours.to_numpy())
    assert len(restored.time_weights) == len(model.time_weights)
    for kept, fitted in zip(restored.time_weights, model.time_weights):
        assert [(pd.Timestamp(start), pd.Timestamp(end)) for start, end in fitted.index] == list(kept.index)
        np.testing.assert_allclose(kept.to_numpy(), fitted.to_numpy(dtype=float), rtol=1e-15)


def exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse refuses bad options before any handler runs
        return stop.code


@pytest.mark.parametrize("arguments, message", [
    (["--workflow", "missing.yaml", "--step", "20"], "error: missing.yaml: workflow file not found"),
    (["--step", "0"], "argument --step: must be 1 or more trading days, got 0"),
    (["--step", "-20"], "argument --step: must be 1 or more trading days, got -20"),
    (["--step", "20", "--method", "dgda"], "argument --method: invalid choice: 'dgda'"),
    (["--step", "20", "--train-window", "2y"],
     "argument --train-window: use 'expanding' or a number of trading days such as '500d', got '2y'"),
    (["--step", "20", "--provider", "no_provider"], "no_provider: not a Qlib provider (calendars/day.txt missing)"),
    (["--workflow", str(REPO / "workflows" / "lstm_vn30.yaml"), "--step", "20", "--method", "ddgda"],
     "error: DDG-DA reweights the training days, and LSTM.fit takes no reweighter: use --method rr"),
    (["--step", "4", "--method", "ddgda"], "error: DDG-DA needs a step of 5 trading days or more"),
])
def test_bad_rolling_input_exits_2_naming_the_problem_and_writes_nothing(arguments, message, sim_provider, tmp_path,
                                                                       monkeypatch, capsys):
    provider = sim_provider(0.1)
    workflow = write_small_workflow(tmp_path)
    before = {"provider": folder_hashes(provider), "cwd": folder_hashes(tmp_path)}
    monkeypatch.chdir(tmp_path)  # where qrun-like runs write mlruns.db
    argv = ["rolling", "--workflow", str(workflow), "--provider", str(provider), *arguments]
    assert exit_code(argv) == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert {"provider": folder_hashes(provider), "cwd": folder_hashes(tmp_path)} == before


def test_drift_flips_the_planted_signal_from_its_date_and_nothing_else():
    from vn30_qlib.data.simulate import simulate_market

    start, end = "2021-01-01", "2022-12-30"
    stationary, calendar, params = simulate_market(seed=3, signal=0.1, start=start, end=end)
    drifting, _, drift_params = simulate_market(seed=3, signal=0.1, start=start, end=end, drift="2022-01-01")
    assert "drift" not in params, "the stationary market's parameters (and provider) stay as they were"
    drift = drift_params["drift"]
    assert drift["date"] == "2022-01-04" and drift["first_changed_label"] == "2021-12-30"
    assert drift["signal_after"] == -0.1 and drift["k_after"] == pytest.approx(-drift["k_before"])
    before, after = drift["measured_signal_before"]["mean"], drift["measured_signal_after"]["mean"]
    assert before > 0.06 and after < -0.06, (before, after)
    for symbol in stationary:  # the same draws: the bars differ from the drift day on only
        until = stationary[symbol].index < pd.Timestamp(drift["date"])
        pd.testing.assert_frame_equal(stationary[symbol][until], drifting[symbol][until])
        assert not stationary[symbol]["close"][~until].equals(drifting[symbol]["close"][~until])
    strength = simulate_market(seed=3, signal=0.0, start=start, end=end, drift="2022-01-01", drift_signal=0.1)[2]
    assert abs(strength["drift"]["measured_signal_before"]["mean"]) < 0.03
    assert strength["drift"]["measured_signal_after"]["mean"] > 0.06


def test_simulate_drift_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "provider"
    assert main(["data", "simulate", "--out", str(out), "--signal", "0.1", "--drift", "2022-01-01"]) == 0
    assert "signal 0.1, drift from 2022-01-01" in capsys.readouterr().out
    drift = json.loads((out / "simulate_params.json").read_text())["drift"]
    assert drift["date"] == "2022-01-04" and drift["signal_after"] == -0.1
    before = folder_hashes(tmp_path)
    for argv, message in [
        (["--drift-signal", "0.1"], "error: --drift-signal needs --drift DATE"),
        (["--drift", "2022-1-1"], "argument --drift: not a date: '2022-1-1' (use YYYY-MM-DD)"),
        (["--drift", "2030-01-01"], "argument --drift: drift date 2030-01-01 must fall inside the simulated days "
                                    "2015-10-05 .. 2024-09-30, with two trading days on each side"),
        (["--drift", "2022-01-01", "--drift-signal", "0.9"], "argument --drift-signal: signal 0.9 is out of reach"),
    ]:
        assert exit_code(["data", "simulate", "--out", str(out), *argv]) == 2
        assert message in " ".join(capsys.readouterr().err.split())
        assert folder_hashes(tmp_path) == before


def test_the_rolling_retrain_model_fits_the_tasks_of_qlibs_rolling(drifting, tmp_path, tracking_uri):
    """`RollingRetrain`, the rolled model the loop and the store keep, fits the tasks `vn30-qlib rolling` fits
    through Qlib's `Rolling`: the same windows and, LightGBM being deterministic on one thread, the same
    predictions; stored and rebuilt without a pickle, it predicts the same again."""
    from qlib.utils import init_instance_by_config
    from qlib.workflow import R

    from vn30_qlib.loop import init_qlib_for
    from vn30_qlib.model_files import read_model, write_model
    from vn30_qlib.workflow_config import load_workflow

    init_qlib_for(drifting["provider"], tracking_uri)
    task = load_workflow(write_small_workflow(tmp_path), {"VN30_PROVIDER": str(drifting["provider"])})["task"]
    config = {"class": "RollingRetrain", "module_path": "vn30_qlib.models.rolling_retrain",
              "kwargs": {"model": task["model"], "step": STEP, "train_window": TRAIN_WINDOW}}
    model = init_instance_by_config(config)
    dataset = init_instance_by_config(task["dataset"])
    with R.start(experiment_name="rolling_retrain"):  # as qrun fits: LightGBM logs its curves to a recorder
        model.fit(dataset)
    assert [start for start, _ in model.windows] == [start for start, _ in drifting["reads"]]
    ours = model.predict(dataset)
    qlibs = drifting["recorder"].load_object("pred.pkl").iloc[:, 0]
    assert ours.index.equals(qlibs.index)
    np.testing.assert_allclose(ours.to_numpy(), qlibs.to_numpy(), rtol=0, atol=1e-12)
    # the store keeps it as one LightGBM text model per window and the windows, and rebuilds it from them
    write_model(model, tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == [f"window{k}" for k in range(9)] + ["windows.json"]
    np.testing.assert_array_equal(read_model(config, tmp_path / "model").predict(dataset).to_numpy(), ours.to_numpy())
    with pytest.raises(ValueError, match="before the first window"):
        model.predict(type(dataset)(handler=dataset.handler, segments={"test": ("2021-12-01", "2022-02-01")}))


def test_seeds_and_per_symbol_kwargs_reach_the_model_a_rolled_workflow_refits():
    from vn30_qlib.loop import adapt_task
    from vn30_qlib.workflow_config import load_workflow

    task = load_workflow(REPO / "workflows" / "lgb_rolling_vn30.yaml")["task"]
    pooled = adapt_task(task, "pooled", None, seed=3)["model"]["kwargs"]
    assert pooled["model"]["kwargs"]["seed"] == 3 and "seed" not in pooled
    assert pooled["model"]["kwargs"]["num_leaves"] == 210
    per_symbol = adapt_task(task, "per_symbol", "ACB", seed=3)["model"]["kwargs"]
    assert per_symbol["model"]["kwargs"]["seed"] == 3 and per_symbol["model"]["kwargs"]["num_leaves"] == 15
    assert set(per_symbol) == {"step", "model"}


@pytest.mark.parametrize("name, step", [("lgb", 20), ("lstm", 60)])
def test_the_shipped_rolled_workflows_refit_their_static_workflows_model(name, step):
    from vn30_qlib.workflow_config import load_workflow

    rolled = load_workflow(REPO / "workflows" / f"{name}_rolling_vn30.yaml")["task"]
    static = load_workflow(REPO / "workflows" / f"{name}_vn30.yaml")["task"]
    assert rolled["model"]["kwargs"]["model"] == {key: static["model"][key] for key in ("class", "module_path", "kwargs")}
    assert rolled["model"].get("per_symbol_kwargs") == static["model"].get("per_symbol_kwargs")
    assert rolled["model"]["kwargs"]["step"] == step
    assert rolled["dataset"] == static["dataset"] and rolled["record"] == static["record"]


def test_the_shipped_ddgda_workflow_reweights_lgb_vn30s_model_pooled_only_with_the_loops_seeds():
    from vn30_qlib.loop import adapt_task
    from vn30_qlib.workflow_config import load_workflow

    task = load_workflow(REPO / "workflows" / "lgb_ddgda_vn30.yaml")["task"]
    static = load_workflow(REPO / "workflows" / "lgb_vn30.yaml")["task"]
    assert task["model"]["kwargs"]["model"] == {key: static["model"][key] for key in ("class", "module_path", "kwargs")}
    assert task["dataset"] == static["dataset"] and task["model"]["kwargs"]["step"] == 20
    pooled = adapt_task(task, "pooled", None, seed=3)["model"]["kwargs"]
    assert pooled["model"]["kwargs"]["seed"] == 3 and "seed" not in pooled
    with pytest.raises(ValueError, match="DDGDARetrain weighs training days by its proxy models' daily Rank IC.*"
                                         "no per-symbol mode"):
        adapt_task(task, "per_symbol", "ACB", seed=3)


@pytest.mark.parametrize("kwargs, message", [
    ({"model": {"class": "LSTM", "module_path": "vn30_qlib.models.lstm"}},
     "LSTM.fit takes no reweighter: use RollingRetrain"),
    ({"step": 4}, "DDG-DA needs a step of 5 trading days or more"),
    ({"hist_stepn": 3}, "unknown kwarg 'hist_stepn' \\(did you mean 'hist_step_n'\\?\\)"),
])
def test_a_ddgda_model_refuses_what_ddgda_cannot_fit_naming_it(kwargs, message):
    from vn30_qlib.models.ddgda_retrain import DDGDARetrain

    with pytest.raises((ValueError, TypeError), match=message):
        DDGDARetrain(**{"model": {"class": "LGBModel", "module_path": "vn30_qlib.models.lgb"}, **kwargs})


def test_qlibs_ddgda_refuses_a_model_without_reweighter_before_building_its_handler():
    from vn30_qlib.rolling.bridge import RollingError
    from vn30_qlib.rolling.ddgda import VN30DDGDA

    unbuildable = {"class": "NoSuchHandler", "module_path": "no_such_module"}  # building it would raise otherwise
    workflow = {"task": {"model": {"class": "LSTM", "module_path": "vn30_qlib.models.lstm"},
                         "dataset": {"class": "DatasetH", "module_path": "qlib.data.dataset",
                                     "kwargs": {"handler": unbuildable, "segments": {}}}}}
    with pytest.raises(RollingError, match="LSTM.fit takes no reweighter: use --method rr"):
        VN30DDGDA(workflow, None, step=20)


@pytest.mark.parametrize("text, message", [
    ("window,start,end\n0,2020-01-02,2020-03-31\n", "must hold columns"),
    ("period,start,end,weight\n0,2020-01-02,2020-03-31,0.5\n", "must hold columns"),
    ("window,start,end,weight\n0,2020-01-02,2020-03-31,heavy\n", "damaged, cannot be read as CSV"),
    ("window,start,end,weight\n0,2020-01-02,2020-03-31,0.5\n", "rows for windows 0 to 1"),
    ("window,start,end,weight\n0,2020-13-45,2020-03-31,0.5\n", "damaged, cannot be read as CSV"),
])
def test_a_damaged_ddgda_time_weights_file_is_refused_naming_it(text, message, tmp_path):
    from vn30_qlib.model_files import _read_time_weights
    from vn30_qlib.store import StoreError

    path = tmp_path / "time_weights.csv"
    path.write_text(text)
    with pytest.raises(StoreError, match=f"{path}: .*{message}"):
        _read_time_weights(path, windows=2)


def test_a_rolled_lstm_is_stored_as_state_dicts_per_window_and_predicts_the_same(drifting, tmp_path, tracking_uri):
    from qlib.utils import init_instance_by_config
    from test_lstm import SMALL

    from vn30_qlib.loop import init_qlib_for
    from vn30_qlib.model_files import read_model, write_model
    from vn30_qlib.workflow_config import load_workflow

    init_qlib_for(drifting["provider"], tracking_uri)
    task = load_workflow(write_small_workflow(tmp_path, test_end=DDGDA_TEST_END),
                         {"VN30_PROVIDER": str(drifting["provider"])})["task"]
    lstm = {"class": "LSTM", "module_path": "vn30_qlib.models.lstm", "kwargs": {**SMALL, "n_epochs": 1}}
    config = {"class": "RollingRetrain", "module_path": "vn30_qlib.models.rolling_retrain",
              "kwargs": {"model": lstm, "step": STEP, "train_window": TRAIN_WINDOW}}
    model = init_instance_by_config(config)
    dataset = init_instance_by_config(task["dataset"])
    model.fit(dataset)
    predicted = model.predict(dataset)
    write_model(model, tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["window0", "window1", "windows.json"]
    assert (tmp_path / "model" / "window0" / "weights.pt").is_file()
    np.testing.assert_array_equal(read_model(config, tmp_path / "model").predict(dataset).to_numpy(),
                                  predicted.to_numpy())
