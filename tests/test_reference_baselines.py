"""The two reference workflows every model is compared with: the one-day reversal factor and plain Qlib
(Alpha158 + LGBModel)."""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from vn30_qlib.workflow_config import load_workflow

pytestmark = pytest.mark.slow


def test_reversal_scores_minus_the_days_return_and_stores_without_pickle(sim_provider, tmp_path):
    """reversal_vn30.yaml's model and dataset: each score is -(close_t / close_t-1 - 1), read independently from
    the provider; the store keeps the model as an empty folder and rebuilds it to predict the same."""
    from qlib.data import D
    from qlib.utils import init_instance_by_config

    from vn30_qlib.loop import init_qlib_for
    from vn30_qlib.model_files import read_model, write_model

    provider = sim_provider(0.1)
    init_qlib_for(provider)
    task = load_workflow(REPO / "workflows" / "reversal_vn30.yaml", {"VN30_PROVIDER": str(provider)})["task"]
    dataset = init_instance_by_config(task["dataset"])
    model = init_instance_by_config(task["model"])
    model.fit(dataset)
    scores = model.predict(dataset)
    close = D.features(["ACB", "FPT"], ["$close"], start_time="2022-12-01", end_time="2024-09-26")["$close"]
    for symbol in ("ACB", "FPT"):
        series = close.xs(symbol, level="instrument")
        expected = -(series / series.shift(1) - 1)
        got = scores.xs(symbol, level="instrument")
        np.testing.assert_allclose(got.to_numpy(), expected.reindex(got.index).to_numpy(), rtol=1e-6)
    assert len(scores.index.get_level_values("instrument").unique()) == 30
    write_model(model, tmp_path / "model")
    assert list((tmp_path / "model").iterdir()) == []
    pd.testing.assert_series_equal(read_model(task["model"], tmp_path / "model").predict(dataset), scores)


def test_plain_qlib_workflow_is_qlibs_alpha158_and_lgbmodel_with_our_lightgbm_parameters():
    """alpha158_lgb_vn30.yaml: Qlib's own handler with Qlib's own default processors, Qlib's own LGBModel, and
    lgb_vn30.yaml's parameters, split and backtest: the two differ in their processors only."""
    from qlib.contrib.data.handler import _DEFAULT_LEARN_PROCESSORS

    plain = load_workflow(REPO / "workflows" / "alpha158_lgb_vn30.yaml")["task"]
    ours = load_workflow(REPO / "workflows" / "lgb_vn30.yaml")["task"]
    handler = plain["dataset"]["kwargs"]["handler"]
    assert (handler["class"], handler["module_path"]) == ("Alpha158", "qlib.contrib.data.handler")
    assert handler["kwargs"]["learn_processors"] == _DEFAULT_LEARN_PROCESSORS
    assert handler["kwargs"]["infer_processors"] == []
    assert plain["model"]["module_path"] == "qlib.contrib.model.gbdt"
    assert plain["model"]["kwargs"] == ours["model"]["kwargs"]
    assert plain["dataset"]["kwargs"]["segments"] == ours["dataset"]["kwargs"]["segments"]
    assert plain["record"] == ours["record"]
    ours_handler = copy.deepcopy(ours["dataset"]["kwargs"]["handler"]["kwargs"])
    assert {k: v for k, v in handler["kwargs"].items() if k not in ("learn_processors", "infer_processors")} == \
        {k: v for k, v in ours_handler.items() if k not in ("learn_processors", "infer_processors")}


def test_reversal_workflow_has_the_shared_label_and_split():
    reversal = load_workflow(REPO / "workflows" / "reversal_vn30.yaml")["task"]
    ours = load_workflow(REPO / "workflows" / "lgb_vn30.yaml")["task"]
    handler = reversal["dataset"]["kwargs"]["handler"]["kwargs"]
    assert handler["data_loader"]["kwargs"]["config"]["label"] == [["Ref($close, -2) / Ref($close, -1) - 1"],
                                                                    ["LABEL0"]]
    assert "fit_start_time" not in handler and "fit_end_time" not in handler
    assert reversal["dataset"]["kwargs"]["segments"] == ours["dataset"]["kwargs"]["segments"]
    assert pd.Timestamp(handler["end_time"]) == pd.Timestamp(ours["dataset"]["kwargs"]["handler"]["kwargs"]["end_time"])
