"""VN30Alpha158: 158 features, the t+1 -> t+2 label, feature subsets, processors fitted on train only."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from qlib.data import D
from qlib.data.dataset.handler import DataHandlerLP

from handlers import VN30Alpha158, alpha158_feature_config
from handlers.processors import CrossSectionalZScore, InfToNan
from vn30_qlib.data.check import init_qlib

FIT_END = "2019-12-31"


@pytest.fixture(scope="module")
def handler(sim_provider) -> VN30Alpha158:
    init_qlib(sim_provider(0.05))
    return VN30Alpha158(start_time="2018-01-01", end_time="2020-12-31", fit_start_time="2018-01-01",
                        fit_end_time=FIT_END, features=["KMID", "KSFT", "ROC5", "STD20", "VWAP0"])


def test_feature_config_has_all_158_and_subsets_keep_order():
    fields, names = alpha158_feature_config()
    assert len(names) == len(set(names)) == 158 and "VWAP0" in names
    assert alpha158_feature_config(["ROC5", "KMID"])[1] == ["ROC5", "KMID"]
    with pytest.raises(KeyError, match=r"unknown Alpha158 feature name\(s\) \['ROC7'\]"):
        alpha158_feature_config(["ROC5", "ROC7"])


def test_label_is_the_close_to_close_return_from_t_plus_1_to_t_plus_2(handler):
    raw = handler.fetch(col_set="label", data_key=DataHandlerLP.DK_R).iloc[:, 0]
    close = D.features(["ACB"], ["$close"], "2018-01-01", "2020-12-31").droplevel("instrument")["$close"]
    label = raw.xs("ACB", level="instrument").reindex(close.index)
    expected = close.shift(-2) / close.shift(-1) - 1
    np.testing.assert_allclose(label.to_numpy()[:-2], expected.to_numpy()[:-2], rtol=1e-5, atol=1e-7)


def test_infer_normalisation_is_fitted_on_the_train_window_only(handler):
    raw = handler.fetch(col_set="feature", data_key=DataHandlerLP.DK_R)
    train = raw.loc[pd.IndexSlice[:FIT_END, :], :].replace([np.inf, -np.inf], np.nan)
    norm = next(p for p in handler.infer_processors if type(p).__name__ == "RobustZScoreNorm")
    np.testing.assert_allclose(norm.mean_train, np.nanmedian(train.to_numpy(), axis=0), rtol=1e-5)
    # the whole-span median differs: a processor fitted on all data would not match the line above
    assert not np.allclose(norm.mean_train, np.nanmedian(raw.replace([np.inf, -np.inf], np.nan).to_numpy(), axis=0))
    infer = handler.fetch(col_set="feature", data_key=DataHandlerLP.DK_I)
    assert infer.notna().all().all() and (infer.abs() <= 3 + 1e-6).all().all()
    learn = handler.fetch(col_set="label", data_key=DataHandlerLP.DK_L).iloc[:, 0]
    by_day = learn.groupby(level="datetime")
    np.testing.assert_allclose(by_day.mean().abs().max(), 0, atol=1e-6)
    np.testing.assert_allclose(by_day.std().dropna().to_numpy(), 1, rtol=1e-6)


def test_fast_processors_match_their_definitions():
    index = pd.MultiIndex.from_product([pd.bdate_range("2024-01-01", periods=3), ["A", "B", "C"]],
                                       names=["datetime", "instrument"])
    columns = pd.MultiIndex.from_tuples([("feature", "x"), ("label", "y")])
    frame = pd.DataFrame({("feature", "x"): [1.0, np.inf, -np.inf, 2, 3, 4, 5, 6, np.nan],
                          ("label", "y"): [1.0, 2, 3, 5, 5, 8, -1, 0, 1]}, index=index)[columns]
    out = InfToNan("feature")(frame.copy())
    assert out[("feature", "x")].isna().tolist() == [False, True, True, False, False, False, False, False, True]
    out = CrossSectionalZScore("label")(frame.copy())[("label", "y")]
    expected = frame[("label", "y")].groupby(level="datetime").transform(lambda s: (s - s.mean()) / s.std())
    np.testing.assert_allclose(out.to_numpy(), expected.to_numpy())
