"""TFT: each module's shapes and weights, tensors made on the inputs' device, the pinball loss, calendar-only
known-future inputs, the planted signal found and noise not, one seed one model, and
``qrun workflows/tft_vn30.yaml`` with a reload from the recorder."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from qlib.data.dataset import DatasetH
from qlib.data.dataset.handler import DataHandlerLP
from qlib.utils import init_instance_by_config

from conftest import REPO, run_qrun
from handlers import VN30TFT
from handlers.vn30_alpha158 import LABEL
from handlers.vn30_tft import horizon_labels
from vn30_qlib.data.check import init_qlib
from vn30_qlib.data.holidays import hose_trading_days
from vn30_qlib.data.sectors import SECTOR
from vn30_qlib import metrics
from vn30_qlib.models.tft import TFT, diagnostics
from vn30_qlib.models.tft.network import TemporalFusionNetwork, TFTBatch, TFTWeights
from vn30_qlib.models.tft.sub_modules import (
    DecoderPositions, GatedLinearUnit, GatedResidualNetwork, InterpretableMultiHeadAttention, LSTMEncoderDecoder,
    QuantileOutput, StaticCovariateEncoder, VariableSelectionNetwork, quantile_loss,
)
from vn30_qlib.model_files import read_model, write_model
from vn30_qlib.models.training import _take_rows
from vn30_qlib.models.tft_inputs import (CALENDAR_FEATURES, calendar_features, static_codes, validate_known_future,
                                         day_means, relative_to_sector)
from vn30_qlib.workflow_config import load_workflow

# Short segments and a small network keep each fit to seconds; the planted signal is strong enough for that.
# One thread: the TFT's many small kernels slow down badly with two threads on a CPU shared with other jobs.
SEGMENTS = {"train": ("2019-01-01", "2020-12-31"), "valid": ("2021-01-01", "2021-12-31"),
            "test": ("2022-01-01", "2023-06-30")}
# Half a year of training days, for tests of arithmetic and storage rather than skill.
SHORT_SEGMENTS = {"train": ("2020-01-01", "2020-06-30"), "valid": ("2020-07-01", "2020-09-30"),
                  "test": ("2020-10-01", "2020-12-31")}
SMALL = dict(hidden_size=8, variable_hidden_size=8, attention_hidden_size=4, num_heads=2, batch_size=256, lr=0.003,
             n_epochs=2, early_stop=2, n_threads=1, importance_repeats=0)
# The simulated market plants its signal in where the close sits in the day's range: these inputs carry it.
K_BAR = {"KMID", "KLEN", "KUP", "KLOW", "KSFT", "KMID2", "KUP2", "KLOW2", "KSFT2"}


def test_module_shapes_and_weights_sum_to_one():
    torch.manual_seed(0)
    batch, steps, hidden = 5, 7, 12
    assert GatedLinearUnit(3, hidden)(torch.randn(batch, 3)).shape == (batch, hidden)
    grn = GatedResidualNetwork(3, 6, hidden, context_size=4)
    assert grn(torch.randn(batch, steps, 3), torch.randn(batch, 1, 4)).shape == (batch, steps, hidden)
    per_variable = GatedResidualNetwork(2, 3, 5, n_groups=4)
    assert per_variable(torch.randn(batch, steps, 4, 2)).shape == (batch, steps, 4, 5)

    vsn = VariableSelectionNetwork(n_vars=6, variable_size=3, hidden_size=hidden, context_size=4)
    selected, weights = vsn(torch.randn(batch, steps, 6), torch.randn(batch, 1, 4))
    assert selected.shape == (batch, steps, hidden) and weights.shape == (batch, steps, 6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(batch, steps))
    with pytest.raises(ValueError, match=r"\(\.\.\., 6\) values"):
        vsn(torch.randn(batch, steps, 6, 3))
    embedded_vsn = VariableSelectionNetwork(n_vars=6, variable_size=3, hidden_size=hidden, numeric=False)
    selected, weights = embedded_vsn(torch.randn(batch, steps, 6, 3))
    assert selected.shape == (batch, steps, hidden)
    torch.testing.assert_close(weights.sum(-1), torch.ones(batch, steps))

    contexts, static_weights = StaticCovariateEncoder([31, 9], variable_size=3, hidden_size=hidden)(
        torch.tensor([[1, 2], [5, 0], [30, 8], [0, 0], [7, 7]]))
    assert contexts.shape == (batch, 4, hidden)
    assert not torch.allclose(contexts[:, 0], contexts[:, 1])  # four distinct contexts, not one copied
    torch.testing.assert_close(static_weights.sum(-1), torch.ones(batch))

    lstm = LSTMEncoderDecoder(hidden)
    temporal = lstm(torch.randn(batch, steps, hidden), torch.randn(batch, 2, hidden), torch.randn(batch, hidden),
                    torch.randn(batch, hidden))
    assert temporal.shape == (batch, steps + 2, hidden)

    attention = InterpretableMultiHeadAttention(hidden, num_heads=3, attention_size=4)
    mask = torch.ones(2, steps + 2, dtype=torch.bool).tril(diagonal=steps)
    out, attn = attention(temporal[:, steps:], temporal, mask)
    assert out.shape == (batch, 2, hidden) and attn.shape == (batch, 2, steps + 2)
    torch.testing.assert_close(attn.sum(-1), torch.ones(batch, 2))
    assert (attn[:, 0, steps + 1] == 0).all()  # horizon 1 never attends to day t+2

    assert QuantileOutput(hidden, 3)(torch.randn(batch, 2, hidden)).shape == (batch, 2, 3)


def test_static_contexts_encoded_once_give_the_same_forecasts():
    """`encode_static` (which the training loop runs once per batch, before its chunks) changes nothing: chunks of
    the encoded batch give the whole batch's forecasts and weights."""
    torch.manual_seed(0)
    net = TemporalFusionNetwork(n_past=5, n_future=8, horizons=2, n_quantiles=3, hidden_size=16).eval()
    batch = TFTBatch(torch.randint(0, 9, (10, 2)), torch.randn(10, 6, 5), torch.randn(10, 2, 8))
    output, weights = net.interpret(batch)
    encoded = net.encode_static(batch)
    parts = [net.interpret(_take_rows(encoded, rows)) for rows in (slice(0, 4), slice(4, 10))]
    torch.testing.assert_close(torch.cat([part[0] for part in parts]), output)
    for name in TFTWeights._fields:
        torch.testing.assert_close(torch.cat([getattr(part[1], name) for part in parts]), getattr(weights, name))


def test_attention_equals_projected_keys_with_any_key_bias_and_old_models_still_load():
    """The module takes queries into the keys' space instead of projecting the keys, and has no key bias; both
    give the textbook attention: scores q . (W_k x + b_k) per head, softmax, heads averaged, with any b_k (it
    shifts all of a query's scores alike). A TFT recorded with a key bias (before it was dropped) loads."""
    torch.manual_seed(0)
    heads, size = 2, 4
    attention = InterpretableMultiHeadAttention(16, num_heads=heads, attention_size=size).eval()
    keys = torch.randn(3, 7, 16)
    mask = torch.ones(2, 7, dtype=torch.bool).tril(diagonal=5)
    out, weights = attention(keys[:, 5:], keys, mask)

    with torch.no_grad():
        q = attention.query(keys[:, 5:]).view(3, 2, heads, size).transpose(1, 2)
        k = (attention.key(keys) + torch.randn(heads * size) * 3.0).view(3, 7, heads, size).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / size ** 0.5
        expected = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).mean(dim=1)
        expected_out = attention.out(expected @ attention.value(keys))
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(out, expected_out)

    net = TemporalFusionNetwork(n_past=5, n_future=8, horizons=2, n_quantiles=3, hidden_size=16)
    recorded = {**net.state_dict(), "attention.key.bias": torch.randn(4 * 32)}
    TemporalFusionNetwork(n_past=5, n_future=8, horizons=2, n_quantiles=3, hidden_size=16).load_state_dict(recorded)


def test_network_makes_every_tensor_on_its_inputs_device():
    """What a GPU run needs of the network, checked without a GPU: on torch's "meta" device (shapes only, no
    data) forward and backward fail if any tensor the network makes lands on the CPU instead of its inputs'
    device (a mask, a constant, a dropout draw)."""
    net = TemporalFusionNetwork(n_past=5, n_future=8, horizons=2, n_quantiles=3, hidden_size=16).train().to("meta")
    batch = TFTBatch(torch.zeros(4, 2, dtype=torch.long, device="meta"), torch.randn(4, 6, 5, device="meta"),
                     torch.randn(4, 2, 8, device="meta"))
    out = net(batch)
    assert out.shape == (4, 2, 3) and out.device.type == "meta"
    quantile_loss(out, torch.randn(4, 2, device="meta"), torch.tensor([0.1, 0.5, 0.9], device="meta")).backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in net.parameters())


def test_quantile_loss_matches_a_hand_computed_case():
    pred = torch.tensor([[[0.0, 1.0, 2.0]], [[-1.0, 0.0, 3.0]]])  # 2 rows, 1 horizon, 3 quantiles
    target = torch.tensor([[1.5], [-2.0]])
    quantiles = torch.tensor([0.1, 0.5, 0.9])
    # row 1, e = 1.5 - pred = (1.5, 0.5, -0.5): 0.1*1.5, 0.5*0.5, 0.1*0.5
    # row 2, e = -2 - pred = (-1, -2, -5): 0.9*1, 0.5*2, 0.1*5
    expected = (0.15 + 0.25 + 0.05 + 0.9 + 1.0 + 0.5) / 6
    assert quantile_loss(pred, target, quantiles).item() == pytest.approx(expected)


def test_a_future_step_cannot_change_earlier_horizons():
    """Known-future day t+3 may shape the t+3 forecast but never t+1 or t+2 (causal decoder and mask)."""
    torch.manual_seed(0)
    net = TemporalFusionNetwork(n_past=5, n_future=2, horizons=3, n_quantiles=3, hidden_size=8,
                                variable_hidden_size=4, attention_hidden_size=4, num_heads=2, dropout=0.0).eval()
    x = TFTBatch(torch.tensor([[1, 2], [3, 4]]), torch.randn(2, 6, 5), torch.randn(2, 3, 2))
    changed_future = x.future.clone()
    changed_future[:, 2] += 5.0
    with torch.no_grad():
        before, after = net(x), net(x._replace(future=changed_future))
    torch.testing.assert_close(before[:, :2], after[:, :2], rtol=0, atol=0)
    assert not torch.allclose(before[:, 2], after[:, 2])


def test_known_future_inputs_are_only_calendar_facts():
    with pytest.raises(ValueError, match=r"known-future inputs must be calendar facts, got \['KMID'\]"):
        TFT(known_future=["day_of_week", "KMID"])
    with pytest.raises(ValueError, match="calendar facts"):
        calendar_features(hose_trading_days("2023-01-01", "2023-03-31"), ["$close"])
    assert validate_known_future(CALENDAR_FEATURES) == list(CALENDAR_FEATURES)


def test_without_known_future_inputs_the_decoder_is_fed_learnt_positions():
    """``known_future: []``: the decoder's input is one learnt vector per position, the same for every row, which
    the loss trains, and the forecasts still differ by row (through the past window)."""
    torch.manual_seed(0)
    net = TemporalFusionNetwork(n_past=5, n_future=0, horizons=3, n_quantiles=3, hidden_size=8,
                                variable_hidden_size=4, attention_hidden_size=4, num_heads=2, dropout=0.0)
    assert isinstance(net.future_selection, DecoderPositions)
    x = TFTBatch(torch.tensor([[1, 2], [3, 4]]), torch.randn(2, 6, 5), torch.zeros(2, 3, 0))
    output, weights = net.interpret(x)
    assert output.shape == (2, 3, 3) and weights.future.shape == (2, 3, 0)
    assert not torch.allclose(output[0], output[1])
    output.sum().backward()
    assert net.future_selection.position.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"DecoderPositions takes \(batch, 3, 0\) inputs"):
        net(x._replace(future=torch.zeros(2, 3, 1)))
    assert validate_known_future([]) == []


def test_calendar_features_around_tet_2023():
    """Tet 2023 is Sun 22 Jan: HOSE closed Fri 20 .. Thu 26 Jan."""
    cal = calendar_features(hose_trading_days("2022-12-01", "2023-03-31"))
    assert cal.loc["2023-01-19", "days_to_holiday"] == 0.0  # the last session before the break
    assert cal.loc["2023-01-18", "days_to_holiday"] == pytest.approx(0.1)
    assert cal.loc["2023-01-19", "days_to_tet"] == pytest.approx(3 / 60)
    assert cal.loc["2023-01-27", "closed_before"] == pytest.approx(0.7)  # 20..26 Jan closed
    assert cal.loc["2023-01-27", "days_from_tet"] == pytest.approx(5 / 60)
    assert cal.loc["2023-01-30", "closed_before"] == pytest.approx(0.2)  # a weekend
    assert cal.loc["2023-01-31", "month_position"] == 1.0 and cal.loc["2023-02-01", "month_position"] < 0.1
    assert cal.loc["2023-01-30", "day_of_week"] == 0.0 and cal.loc["2023-01-27", "day_of_week"] == 1.0
    np.testing.assert_array_equal(static_codes(["ACB", "VCB", "NOPE"])[:, 1] > 0, [True, True, False])
    assert static_codes(["ACB"])[0, 1] == static_codes(["VCB"])[0, 1]  # both banks


def dataset(provider, horizons: int = 1, segments: dict = SEGMENTS) -> DatasetH:
    init_qlib(provider)
    handler = VN30TFT(start_time="2018-10-01", end_time="2023-08-31", fit_start_time="2019-01-01",
                      fit_end_time="2020-12-31", horizons=horizons)
    return DatasetH(handler, segments=segments)


def test_handler_labels_one_column_per_horizon(sim_provider):
    assert horizon_labels(1) == (LABEL[0], ["LABEL0"])
    labels = dataset(sim_provider(0.1), horizons=3).handler.fetch(col_set="label")
    assert list(labels.columns) == ["LABEL0", "LABEL1", "LABEL2"]
    acb = labels.xs("ACB", level="instrument")
    # horizon h+1 on day t is horizon h on the next trading day
    np.testing.assert_allclose(acb["LABEL1"].iloc[:-1].to_numpy(), acb["LABEL0"].iloc[1:].to_numpy())
    np.testing.assert_allclose(acb["LABEL2"].iloc[:-1].to_numpy(), acb["LABEL1"].iloc[1:].to_numpy())


def rank_ic(model: TFT, data: DatasetH) -> float:
    pred = model.predict(data)
    label = data.prepare("test", col_set="label").iloc[:, 0]
    both = pd.concat([pred, label], axis=1, keys=["pred", "label"]).dropna()
    return float(both.groupby(level="datetime").apply(lambda d: d["pred"].corr(d["label"], method="spearman")).mean())


@pytest.fixture(scope="module")
def planted(sim_provider) -> tuple[TFT, DatasetH]:
    data = dataset(sim_provider(0.1))
    model = TFT(**{**SMALL, "importance_repeats": 1})
    model.fit(data)
    return model, data


def test_tft_recovers_the_planted_signal_and_its_importance_names_the_bar_shape(planted):
    model, data = planted
    assert rank_ic(model, data) > 0.05
    # valid-segment permutation importance: a K-bar input leads, far ahead of every calendar input (the market
    # has no calendar effect), and no calendar input's drop stands out from its noise; the selection weights
    # (not an importance) had put days_to_tet and closed_before first
    importance = model.get_feature_importance()
    table = model.importance["permutation"]
    calendar = table.loc[list(CALENDAR_FEATURES)]
    assert importance.index[0] in K_BAR, importance.head()
    assert importance.iloc[0] > 2 * calendar["rank_ic_drop"].max()
    assert (calendar["t"].abs() < 3).all(), calendar


def test_same_seed_same_predictions(planted):
    model, data = planted
    again = TFT(**SMALL)
    again.fit(data)
    np.testing.assert_array_equal(again.predict(data).to_numpy(), model.predict(data).to_numpy())


def test_the_ic_loss_term_trains_on_whole_days_and_still_recovers_the_planted_signal(planted, monkeypatch):
    """``ic_loss_weight``: the pinball loss minus a daily-IC term of the median, on batches of whole days."""
    from vn30_qlib.models import training

    _, data = planted
    batches, split = [], training.LabelledRows.batches

    def recorded(rows, batch_size, by_day=False):
        batches.append(by_day)
        return split(rows, batch_size, by_day)

    monkeypatch.setattr(training.LabelledRows, "batches", recorded)
    model = TFT(**{**SMALL, "ic_loss_weight": 0.5})
    model.fit(data)
    assert batches and all(batches)
    assert rank_ic(model, data) > 0.05
    with pytest.raises(ValueError, match="ic_loss_weight must be a number >= 0"):
        TFT(ic_loss_weight=-1)


def test_market_context_feeds_each_features_day_mean_as_a_day_level_input(sim_provider, monkeypatch):
    """``market_context``: each feature's mean over the day's names joins the past inputs, the permutation
    importance shuffles it among days (a fact of the day, as the calendar inputs), and the planted signal is
    still recovered."""
    data = dataset(sim_provider(0.1))
    features = data.handler.fetch(col_set="feature", data_key=DataHandlerLP.DK_I)
    day = features.index.get_level_values("datetime")[500]
    np.testing.assert_allclose(day_means(features).xs(day, level="datetime")["KSFT_day_mean"],
                               features.xs(day, level="datetime")["KSFT"].mean())
    calls, original = [], diagnostics.permutation_importance

    def recorded(forecast, past, index, label, names, per_day, *args, **kwargs):
        calls.append(dict(zip(names, per_day)))
        return original(forecast, past, index, label, names, per_day, *args, **kwargs)

    monkeypatch.setattr(diagnostics, "permutation_importance", recorded)
    model = TFT(**{**SMALL, "market_context": True, "importance_repeats": 1})
    model.fit(data)
    means = [f"{name}_day_mean" for name in features.columns]
    assert model.past_names == list(features.columns) + means + list(CALENDAR_FEATURES)
    assert calls == [{**dict.fromkeys(features.columns, False), **dict.fromkeys(means, True),
                      **dict.fromkeys(CALENDAR_FEATURES, True)}]
    assert rank_ic(model, data) > 0.05


def test_sector_relative_inputs_are_each_feature_less_its_sectors_mean_of_the_day(sim_provider):
    """``sector_relative``: per-name inputs (shuffled among the day's names), each feature less the mean of the
    day's names in its sector; 0 for a name alone in its sector."""
    data = dataset(sim_provider(0.1), segments=SHORT_SEGMENTS)
    features = data.handler.fetch(col_set="feature", data_key=DataHandlerLP.DK_I)
    relative = relative_to_sector(features)
    day = features.index.get_level_values("datetime")[500]
    today, relative_today = features.xs(day, level="datetime"), relative.xs(day, level="datetime")
    banks = [name for name in today.index if SECTOR.get(name) == "banking"]
    assert len(banks) > 5
    np.testing.assert_allclose(relative_today.loc[banks, "KSFT_vs_sector"],
                               today.loc[banks, "KSFT"] - today.loc[banks, "KSFT"].mean(), atol=1e-6)
    assert (relative_today.loc["FPT"] == 0).all()  # the one tech name
    model = TFT(**{**SMALL, "sector_relative": True, "market_context": True, "n_epochs": 1})
    model.fit(data)
    assert model.past_names == (list(features.columns) + [f"{name}_day_mean" for name in features.columns]
                                + list(relative.columns) + list(CALENDAR_FEATURES))
    assert model.predict(data).notna().all()


def test_a_tft_without_calendar_inputs_recovers_the_planted_signal_and_reloads(sim_provider, tmp_path):
    """``known_future: []``: no calendar input anywhere (past or future), no future-selection table (nor its
    artifact), the planted signal still found, and the stored model predicts exactly the same after a reload."""
    from qlib.workflow import R

    from vn30_qlib.loop import sqlite_tracking_uri

    data = dataset(sim_provider(0.1))
    model = TFT(**{**SMALL, "known_future": [], "importance_repeats": 1})
    model.fit(data)
    features = data.handler.fetch(col_set="feature", data_key=DataHandlerLP.DK_I)
    assert model.past_names == list(features.columns)
    assert model.calendar_mean.empty and list(model.importance) == ["static", "past", "attention", "permutation"]
    assert rank_ic(model, data) > 0.05
    with R.start(experiment_name="no_calendar", uri=sqlite_tracking_uri(tmp_path)):
        recorder = R.get_recorder()
        assert 0.6 < model.record_diagnostics(data, recorder)["tft_coverage_10_90"] < 0.95
        listed = {a.path for a in recorder.client.list_artifacts(recorder.id, "tft")}
    assert {"tft/past_selection.csv", "tft/attention_by_lag.png"} <= listed
    assert not any("future_selection" in path for path in listed)
    write_model(model, tmp_path / "model")
    config = {"class": "TFT", "module_path": "vn30_qlib.models.tft", "kwargs": {**SMALL, "known_future": []}}
    restored = read_model(config, tmp_path / "model")
    pd.testing.assert_series_equal(restored.predict(data), model.predict(data))


def test_tft_finds_nothing_in_pure_noise(sim_provider):
    """Leakage canary: with signal 0, a look-ahead would show as a Rank IC well away from 0; and no input's
    permutation importance stands out from its noise."""
    data = dataset(sim_provider(0.0))
    model = TFT(**{**SMALL, "importance_repeats": 1})
    model.fit(data)
    # ~370 test days x 30 names: the mean daily Rank IC's standard error is about 0.01
    assert abs(rank_ic(model, data)) < 0.03
    table = model.importance["permutation"]
    assert (table["t"].abs() < 3.5).all(), table.sort_values("t")


def test_permutation_importance_shuffles_names_within_days_and_calendar_inputs_among_days():
    """A forecast that reads input 0 only: its drop is the whole skill, the other inputs' exactly 0; a per-name
    shuffle keeps every row on its own day, a per-day input moves whole days."""
    rng = np.random.default_rng(0)
    days, names = pd.bdate_range("2021-01-04", periods=60), [f"S{i}" for i in range(10)]
    index = pd.MultiIndex.from_product([days, names], names=["datetime", "instrument"])
    n = len(index)
    day_code = np.repeat(np.arange(len(days)), len(names)).astype("float32")
    past = np.stack([rng.normal(size=(n, 3)).astype("float32"),  # input 0: the signal, 3 steps
                     np.repeat(day_code[:, None], 3, axis=1),  # input 1: the day, per name
                     np.repeat(day_code[:, None], 3, axis=1)], axis=-1)  # input 2: the day, per day
    label = pd.Series(past[:, -1, 0] + rng.normal(size=n), index=index)
    seen = []

    def forecast(windows: np.ndarray) -> torch.Tensor:
        seen.append(windows)
        return torch.from_numpy(windows[:, -1, 0].copy())

    table = diagnostics.permutation_importance(forecast, past, index, label, ["signal", "day", "calendar"],
                                               [False, False, True], repeats=2)
    base = metrics.daily_rank_ic(pd.Series(past[:, -1, 0], index=index), label).mean()
    assert base > 0.5 and abs(table.loc["signal", "rank_ic_drop"] - base) < 0.1 and table.loc["signal", "t"] > 10
    assert (table.loc[["day", "calendar"], "rank_ic_drop"] == 0).all()
    day_shuffles, calendar_shuffles = seen[3:5], seen[5:7]
    assert all((w[:, :, 1] == past[:, :, 1]).all() for w in day_shuffles)  # every row kept its own day
    for w in calendar_shuffles:
        moved = w[:, -1, 2].reshape(len(days), len(names))
        assert (moved == moved[:, :1]).all()  # a day's rows all took one other day's value
        assert sorted(moved[:, 0]) == list(range(len(days))) and (moved[:, 0] != np.arange(len(days))).any()


@pytest.mark.slow
def test_qrun_tft_workflow_records_and_reloads(sim_provider, tmp_path):
    provider = sim_provider(0.1)
    overrides = {"TFT_EPOCHS": "1", "TFT_HIDDEN": "16", "TFT_THREADS": "1"}
    recorder = run_qrun("tft_vn30.yaml", provider, tmp_path, "tft_qrun", overrides)
    metrics = recorder.list_metrics()
    for key in ("IC", "Rank IC", "test_mse_learnt", "tft_coverage_10_90", "tft_quantile_crossing",
                "1day.excess_return_with_cost.annualized_return", "train_loss", "valid_loss"):
        assert np.isfinite(metrics[key]), key
    assert 0.6 < metrics["tft_coverage_10_90"] < 0.95
    assert 0.0 <= metrics["tft_quantile_crossing"] <= 0.05
    listed = {a.path for a in recorder.client.list_artifacts(recorder.id, "tft")}
    for name in ("static_selection", "past_selection", "future_selection", "attention_by_lag", "past_importance"):
        assert {f"tft/{name}.csv", f"tft/{name}.png"} <= listed, name
    quantiles = recorder.load_object("tft/quantiles.pkl")
    assert list(quantiles.columns) == ["h1_q0.1", "h1_q0.5", "h1_q0.9"]
    attention = recorder.load_object("tft/attention_by_lag.pkl")
    np.testing.assert_allclose(attention["h1"].sum(), 1.0, rtol=1e-5)
    past = recorder.load_object("feature_importance/importance.pkl")
    assert past.name == "rank_ic_drop" and "KSFT" in past.index and "day_of_week" in past.index
    table = recorder.load_object("tft/past_importance.pkl")
    assert list(table.columns) == ["rank_ic_drop", "se", "t"] and table["rank_ic_drop"].equals(past.reindex(table.index))

    # the pickled model, loaded back on this CPU, predicts exactly what the run recorded
    model = recorder.load_object("params.pkl")
    pred = recorder.load_object("pred.pkl").iloc[:, 0]
    env = {"VN30_PROVIDER": str(provider)}
    data = init_instance_by_config(load_workflow(REPO / "workflows" / "tft_vn30.yaml", env)["task"]["dataset"])
    np.testing.assert_array_equal(model.predict(data).reindex(pred.index).to_numpy(), pred.to_numpy())
    np.testing.assert_array_equal(quantiles["h1_q0.5"].to_numpy(), pred.to_numpy())


def test_grn_equals_its_textbook_form_with_the_input_and_skip_maps_as_one_matmul():
    """LayerNorm(W_s a + b_s + GLU(W1 ELU(W2 a + b2 + W3 c) + b1)), each map on its own, equals the module, whose
    input and skip maps run as one matmul; and the identity skip where the sizes match."""
    torch.manual_seed(0)
    a, context = torch.randn(6, 5, 7), torch.randn(6, 1, 3)
    for output_size in (4, 7):
        grn = GatedResidualNetwork(7, 9, output_size, context_size=3).eval()
        with torch.no_grad():
            hidden = grn.fc_hidden(torch.nn.functional.elu(grn.fc_input(a) + grn.fc_context(context)))
            skip = grn.skip(a)
            expected = grn.norm(skip + torch.nn.functional.glu(grn.gate.linear(hidden), dim=-1))
            torch.testing.assert_close(grn(a, context), expected, rtol=1e-5, atol=1e-6)


def test_importing_the_package_and_drawing_its_plots_choose_no_matplotlib_backend(tmp_path):
    """No module switches matplotlib's process-wide backend or loads pyplot (a notebook's inline backend stays):
    the plots are drawn on their own Figure objects."""
    code = (
        "import sys, matplotlib, pandas as pd\n"
        "import vn30_qlib.cli, vn30_qlib.records, vn30_qlib.report, vn30_qlib.models.tft\n"
        "from vn30_qlib.models.tft.diagnostics import plot_weights\n"
        f"plot_weights(pd.Series([0.2, 0.8], index=['a', 'b']), 'past', {str(tmp_path / 'p.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'\n"
        "assert matplotlib.rcParams._get_backend_or_none() is None, matplotlib.rcParams._get_backend_or_none()\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "MPLBACKEND"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "p.png").stat().st_size > 1000
