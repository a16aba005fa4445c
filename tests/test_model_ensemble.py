"""ModelEnsemble: the weighted mean of its members' per-day z-scores, members on their own handlers, the choice of
members on the valid segment alone, the model store without pickle, ``vn30-qlib loop`` and ``validate`` on
workflows/ensemble_vn30.yaml, and clear errors for bad configs."""
from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pandas as pd
import pytest
from qlib.data.dataset import DatasetH
from qlib.data.dataset.handler import DataHandler
from qlib.workflow import R

from conftest import REPO, write_workflow
from handlers import VN30Alpha158
from vn30_qlib import store
from vn30_qlib.loop import LoopEntry, adapt_task, fit_entry, init_qlib_for, sqlite_tracking_uri
from vn30_qlib.metrics import cross_sectional_metrics
from vn30_qlib.model_files import read_model, write_model
from vn30_qlib.models.lgb import LGBModel
from vn30_qlib.models.model_ensemble import ModelEnsemble, daily_zscores
from vn30_qlib.workflow_config import load_workflow

SEGMENTS = {"train": ("2019-01-02", "2020-12-29"), "valid": ("2021-01-04", "2021-12-28"),
            "test": ("2022-01-04", "2022-12-28")}
FIT = {"fit_start_time": "2019-01-02", "fit_end_time": "2020-12-29"}
SPAN = {"start_time": "2018-10-01", "end_time": "2023-01-31", **FIT}
EXPERIMENT = "model_ensemble"  # fits run inside a recorder run (LightGBM and the ensemble log to it), as under qrun
FEATURES = ["KMID", "KLEN", "KUP", "KLOW", "KSFT", "ROC5", "STD20", "VSTD5"]
LGB = {"class": "LGBModel", "module_path": "vn30_qlib.models.lgb",
       "kwargs": {"num_boost_round": 20, "num_threads": 1, "verbose": -1}}
# lambda_l1 far above any split's gain: every tree is a single leaf, so the member predicts one constant
FLAT = {**LGB, "kwargs": {**LGB["kwargs"], "num_boost_round": 5, "lambda_l1": 1e9}}
LSTM_FEATURES = ["KMID", "KUP", "KSFT", "ROC5", "CORR5"]
LSTM = {"class": "LSTM", "module_path": "vn30_qlib.models.lstm",
        "kwargs": {"hidden_size": 8, "num_layers": 1, "n_epochs": 1, "step_len": 5, "batch_size": 512, "n_threads": 1},
        "handler": {"class": "VN30Alpha158", "module_path": "handlers", "kwargs": {**FIT, "features": LSTM_FEATURES}}}
# a LightGBM that learns minus the return on its own handler: it ranks the names backwards
REVERSED = {**LGB, "handler": {"class": "VN30Alpha158", "module_path": "handlers", "kwargs": {
    **FIT, "features": FEATURES, "label": [["-1 * (Ref($close, -2) / Ref($close, -1) - 1)"], ["LABEL0"]]}}}


class LabelReadsAlpha158(VN30Alpha158):
    """VN30Alpha158 that notes the last day of every fetch that returns labels (``last_label_days``)."""

    last_label_days: list[pd.Timestamp] = []

    def fetch(self, selector=slice(None, None), level="datetime", col_set=DataHandler.CS_ALL, *args, **kwargs):
        frame = super().fetch(selector, level, col_set, *args, **kwargs)
        columns = [col_set] if isinstance(col_set, str) else list(col_set)
        if ("label" in columns or DataHandler.CS_ALL in columns) and len(frame):
            LabelReadsAlpha158.last_label_days.append(frame.index.get_level_values("datetime").max())
        return frame


@pytest.fixture(scope="module")
def provider(sim_provider, tmp_path_factory):
    path = sim_provider(0.1)
    init_qlib_for(path, sqlite_tracking_uri(tmp_path_factory.mktemp("mlruns")))  # LightGBM logs to the recorder
    return path


@pytest.fixture(scope="module")
def data(provider) -> DatasetH:
    return DatasetH(VN30Alpha158(features=FEATURES, **SPAN), SEGMENTS)


@pytest.fixture(scope="module")
def fitted_run(data) -> tuple[ModelEnsemble, dict]:
    """LightGBM on the workflow's dataset, an LSTM on its own handler and a constant member, weights 2:1:1; and
    the metrics of the recorder run it was fitted in."""
    ensemble = ModelEnsemble({"lgb": LGB, "lstm": LSTM, "flat": FLAT}, weights={"lgb": 2, "lstm": 1, "flat": 1})
    with R.start(experiment_name=EXPERIMENT):
        ensemble.fit(data)
        recorder = R.get_recorder()
    return ensemble, recorder.list_metrics()  # read once the run has ended: the recorder logs asynchronously


@pytest.fixture(scope="module")
def fitted(fitted_run) -> ModelEnsemble:
    return fitted_run[0]


def zscored(score: pd.Series) -> pd.Series:
    """One member's scores z-scored per day (population sd), 0 on a day without spread: computed day by day."""
    days = []
    for _, day in score.groupby(level="datetime"):
        sd = day.std(ddof=0)
        days.append((day - day.mean()) / sd if sd > 1e-9 else day * 0.0)
    return pd.concat(days)


def test_prediction_is_the_weighted_mean_of_the_members_daily_zscores(fitted_run, data, caplog):
    fitted, logged = fitted_run
    lstm_data = DatasetH(VN30Alpha158(features=LSTM_FEATURES, **SPAN), SEGMENTS)  # the LSTM member's data, rebuilt
    members = {"lgb": fitted.fitted_members["lgb"].predict(data), "flat": fitted.fitted_members["flat"].predict(data),
               "lstm": fitted.fitted_members["lstm"].predict(lstm_data)}
    assert members["flat"].nunique() == 1 and members["lgb"].nunique() > 100
    alone = LGBModel(**LGB["kwargs"])  # the LightGBM member fitted on its own: the ensemble passed it nothing else
    with R.start(experiment_name=EXPERIMENT):
        alone.fit(data)
    np.testing.assert_array_equal(members["lgb"].to_numpy(), alone.predict(data).to_numpy())
    expected = (2 * zscored(members["lgb"]) + zscored(members["lstm"]) + zscored(members["flat"])) / 4
    predicted = fitted.predict(data)
    pd.testing.assert_index_equal(predicted.index, members["lgb"].index)
    assert np.isfinite(predicted).all()
    days = predicted.index.get_level_values("datetime").nunique()
    assert f"member flat: no spread across the names on {days} of {days} days of segment 'test'" in caplog.text
    assert "member lgb: no spread" not in caplog.text
    np.testing.assert_allclose(predicted.to_numpy(), expected.reindex(predicted.index).to_numpy(), atol=1e-12)
    label = data.prepare("test", col_set="label").iloc[:, 0]
    assert cross_sectional_metrics(predicted, label)["cs_rank_ic"] > 0.05  # the planted signal
    assert {"lstm/valid_ic", "lstm/train_loss", "lgb/valid_rank_ic", "flat/kept"} <= set(logged)


def test_member_handlers_load_once_per_workflow_handler(fitted, data):
    """Rolling retraining builds one ensemble per task, all on one workflow handler: each member handler loads once,
    and each task's member dataset has that task's segments."""
    fitted_on = fitted._datasets(data, ["lstm"])["lstm"]
    next_task = DatasetH(data.handler, {**SEGMENTS, "test": ("2022-07-01", "2022-12-28")})
    again = ModelEnsemble({"lgb": LGB, "lstm": LSTM})._datasets(next_task, ["lgb", "lstm"])
    assert again["lgb"] is next_task and again["lstm"].handler is fitted_on.handler
    assert again["lstm"].segments == next_task.segments != fitted_on.segments


def test_a_day_with_one_name_or_no_spread_gives_zero_not_nan():
    index = pd.MultiIndex.from_tuples([("2022-01-03", "A"), ("2022-01-03", "B"), ("2022-01-03", "C"),
                                       ("2022-01-04", "A"), ("2022-01-05", "A"), ("2022-01-05", "B")],
                                      names=["datetime", "instrument"])
    scores = pd.DataFrame({"m": [1.0, 2.0, 6.0, 5.0, 0.3, 0.3], "n": [0.1, 0.1, 0.1, 1.0, 1.0, 3.0]}, index=index)
    z = daily_zscores(scores)
    np.testing.assert_allclose(z["m"], [*(np.array([-2.0, -1.0, 3.0]) / np.sqrt(14 / 3)), 0.0, 0.0, 0.0])
    np.testing.assert_allclose(z["n"], [0.0, 0.0, 0.0, 0.0, -1.0, 1.0])


def test_select_on_valid_drops_members_without_skill_and_reads_no_test_label(provider):
    data = DatasetH(LabelReadsAlpha158(features=FEATURES, **SPAN), SEGMENTS)
    reversed_member = {**REVERSED, "handler": {**REVERSED["handler"], "class": LabelReadsAlpha158}}
    ensemble = ModelEnsemble({"lgb": LGB, "flat": FLAT, "reversed": reversed_member}, select_on_valid=True)
    LabelReadsAlpha158.last_label_days.clear()
    with R.start(experiment_name=EXPERIMENT):
        ensemble.fit(data)
        recorder = R.get_recorder()
    logged = recorder.list_metrics()
    read = LabelReadsAlpha158.last_label_days
    assert read and max(read) == pd.Timestamp("2021-12-28")  # train and valid labels, none of the test segment
    valid_label = data.prepare("valid", col_set="label").iloc[:, 0]
    lgb_valid = ensemble.fitted_members["lgb"].predict(data, "valid")
    assert ensemble.valid_rank_ic["lgb"] == cross_sectional_metrics(lgb_valid, valid_label)["cs_rank_ic"] > 0.05
    assert ensemble.valid_rank_ic["reversed"] < -0.05 and ensemble.valid_rank_ic["flat"] is None
    assert list(ensemble.fitted_members) == ["lgb"]
    assert logged["lgb/valid_rank_ic"] == pytest.approx(ensemble.valid_rank_ic["lgb"])
    assert (logged["lgb/kept"], logged["flat/kept"], logged["reversed/kept"]) == (1.0, 0.0, 0.0)
    lgb_test = ensemble.fitted_members["lgb"].predict(data)
    np.testing.assert_allclose(ensemble.predict(data).to_numpy(), zscored(lgb_test).reindex(lgb_test.index), atol=1e-12)


def test_store_round_trip_predicts_the_same_without_pickle(fitted, data, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    write_model(fitted, folder)
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "ensemble.json", "flat/model.txt", "lgb/model.txt", "lstm/fitted.json", "lstm/weights.pt"]
    config = {"class": "ModelEnsemble", "module_path": "vn30_qlib.models.model_ensemble",
              "kwargs": {"members": {"lgb": LGB, "lstm": LSTM, "flat": FLAT},
                         "weights": {"lgb": 2, "lstm": 1, "flat": 1}}}

    def refuse(*args, **kwargs):
        raise AssertionError("the store unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    restored = read_model(config, folder)
    np.testing.assert_array_equal(restored.predict(data).to_numpy(), fitted.predict(data).to_numpy())
    assert restored.valid_rank_ic == pytest.approx(fitted.valid_rank_ic)
    (folder / "ensemble.json").write_text(json.dumps({"kept": ["lgb", "tft"], "valid_rank_ic": {}}))
    with pytest.raises(store.StoreError, match=r"ensemble.json: 'kept' must list distinct members .*'tft'"):
        read_model(config, folder)


def test_the_workflow_members_are_the_single_model_workflows():
    ensemble = load_workflow(REPO / "workflows" / "ensemble_vn30.yaml")["task"]
    members = ensemble["model"]["kwargs"]["members"]
    base_handler = ensemble["dataset"]["kwargs"]["handler"]["kwargs"]
    for name in ("lgb", "lstm", "tft"):
        single = load_workflow(REPO / "workflows" / f"{name}_vn30.yaml")["task"]
        assert {key: members[name][key] for key in ("class", "module_path", "kwargs")} == {
            key: single["model"][key] for key in ("class", "module_path", "kwargs")}, name
        handler = single["dataset"]["kwargs"]["handler"]
        own = members[name].get("handler", {"class": handler["class"], "module_path": handler["module_path"],
                                             "kwargs": {}})
        assert (own["class"], own["module_path"]) == (handler["class"], handler["module_path"]), name
        for key, value in own["kwargs"].items():
            assert handler["kwargs"][key] == value, (name, key)
        # the label each member learns (e.g. the TFT's daily rank) is its single workflow's
        assert own["kwargs"].get("learn_processors") == handler["kwargs"].get("learn_processors"), name
        for key in ("instruments", "start_time", "end_time"):  # what the members take from the workflow's handler
            assert handler["kwargs"][key] == base_handler[key], (name, key)


def test_per_symbol_mode_is_refused():
    task = load_workflow(REPO / "workflows" / "ensemble_vn30.yaml")["task"]
    adapt_task(task, "pooled", None, seed=3)
    with pytest.raises(ValueError, match=re.escape("no per-symbol mode; fit it pooled (--modes pooled)")):
        adapt_task(task, "per_symbol", "ACB")


def test_seed_and_checkpoint_folder_reach_every_member(tmp_path):
    lstm = {**LSTM, "kwargs": {**LSTM["kwargs"], "checkpoint_dir": str(tmp_path)}}
    ensemble = ModelEnsemble({"lgb": LGB, "lstm": lstm}, seed=7)
    assert ensemble._member("lgb").params["seed"] == 7
    member = ensemble._member("lstm")
    assert member.seed == 7 and member.checkpoint_dir == str(tmp_path / "lstm")


@pytest.mark.parametrize("kwargs, error, message", [
    ({"members": {}}, ValueError, "members must map names to Qlib model configs, at least one"),
    ({"members": {"lgb": {"module_path": "vn30_qlib.models.lgb"}}}, ValueError,
     "member 'lgb' must be a Qlib model config"),
    ({"members": {"a/b": LGB}}, ValueError, "member name 'a/b' must start with a letter"),
    ({"members": {"lgb": {**LGB, "dataset": {}}}}, ValueError, "member 'lgb' has unknown key(s) ['dataset']"),
    ({"members": {"lgb": {**LGB, "handler": {"class": "VN30Alpha158", "kwargs": {"start_time": "2019-01-01"}}}}},
     ValueError, "its handler sets ['start_time'], which every member takes from the workflow dataset's handler"),
    ({"members": {"lgb": {**LGB, "kwargs": {"num_leavs": 7}}}}, TypeError,
     "member 'lgb': LGBModel: unknown kwarg 'num_leavs' (did you mean 'num_leaves'?)"),
    ({"members": {"lgb": LGB}, "weights": {"lstm": 1}}, ValueError, "weights must give one weight per member ['lgb']"),
    ({"members": {"lgb": LGB}, "weights": {"lgb": -1}}, ValueError, "weights must be finite numbers >= 0"),
    ({"members": {"lgb": LGB}, "weights": {"lgb": 0}}, ValueError, "at least one weight must be above 0"),
    ({"members": {"lgb": LGB}, "select_on_valid": "yes"}, ValueError, "select_on_valid must be true or false"),
    ({"members": {"lgb": LGB}, "selct_on_valid": True}, TypeError,
     "unknown kwarg 'selct_on_valid' (did you mean 'select_on_valid'?)"),
])
def test_bad_configs_are_refused_when_built(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        ModelEnsemble(**kwargs)


def test_predict_before_fit_and_no_member_kept_are_errors(data):
    with pytest.raises(ValueError, match="fit the ensemble before predict"):
        ModelEnsemble({"lgb": LGB}).predict(data)
    with pytest.raises(ValueError, match=r"no member has a valid Rank IC above 0 \(\{'flat': None\}\)"):
        with R.start(experiment_name=EXPERIMENT):
            ModelEnsemble({"flat": FLAT}, select_on_valid=True).fit(data)


def test_loop_stores_the_workflow_and_validate_reloads_it(sim_provider, tmp_path, monkeypatch):
    """The loop's fit of a small variant of workflows/ensemble_vn30.yaml (short span, few features, small members,
    one epoch each; in this process, where `run_loop` would start a worker). Last in this file: it re-initialises
    Qlib."""
    small = {"fit_start_time: 2015-10-05": "fit_start_time: 2020-01-02",
             "fit_end_time: 2021-12-29": "fit_end_time: 2020-12-29",
             "num_leaves: 210": "num_leaves: 15\n                        num_boost_round: 30",
             "hidden_size: 64": "hidden_size: 8", "num_layers: 2": "num_layers: 1", "step_len: 20": "step_len: 5",
             "attention_hidden_size: 32": "attention_hidden_size: 4", "num_heads: 4": "num_heads: 1"}
    tail = f"""    dataset:
        kwargs:
            handler:
                kwargs:
                    features: {FEATURES}
                    start_time: 2019-10-01
                    end_time: 2021-09-30
                    fit_start_time: 2020-01-02
                    fit_end_time: 2020-12-29
            segments:
                train: [2020-01-02, 2020-12-29]
                valid: [2021-01-04, 2021-06-28]
                test: [2021-07-01, 2021-09-27]
"""
    workflow = write_workflow(tmp_path / "wf", "ensemble_vn30.yaml", small, tail)
    for knob, value in {"LSTM_EPOCHS": 1, "LSTM_THREADS": 1, "TFT_EPOCHS": 1, "TFT_HIDDEN": 8,
                        "TFT_THREADS": 1}.items():
        monkeypatch.setenv(knob, str(value))
    store_root = tmp_path / "models"
    result = fit_entry(LoopEntry(str(workflow), "pooled", None), str(sim_provider(0.1)), str(store_root))
    assert result["status"] == "done", result.get("traceback")
    version = store.latest(store_root / "pooled" / "ensemble")
    metadata = store.read_metadata(version)
    assert metadata["model"] == "ensemble" and metadata["metrics"]["cross_sectional"]["cs_rank_ic"] > 0.05
    kept = json.loads((version / "model" / "ensemble.json").read_text())["kept"]
    assert set(kept) <= {"lgb", "lstm", "tft"} and "lgb" in kept
    assert not list(version.rglob("*.pkl"))
    assert store.validate(version) <= 1e-6
