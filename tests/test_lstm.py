"""The LSTM and the shared epoch loop: no look-ahead, signal found and noise not, pickling, seeds, early stop, resume.

Unit tests use a tiny network (hidden 8, 5-day windows, 6 features) so that the file runs in a few minutes on
two cores; the workflow test runs `qrun workflows/lstm_vn30.yaml` as shipped, cut to one epoch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import qlib
import torch
from qlib.data.dataset import DatasetH
from qlib.data.dataset.handler import DataHandlerLP
from qlib.utils import init_instance_by_config

from conftest import run_qrun, write_workflow
from vn30_qlib.models import lstm as lstm_module
from vn30_qlib.models.lstm import LSTM
from vn30_qlib.models.training import LabelledRows
from vn30_qlib.models.windows import SequenceWindows

FEATURES = ["KSFT", "KMID", "KLOW", "KUP", "ROC5", "STD5"]
# one thread: faster for a network this small, and steady on a CI machine shared with other jobs
SMALL = {"hidden_size": 8, "num_layers": 1, "step_len": 5, "batch_size": 1024, "device": "cpu", "n_threads": 1}


def make_dataset(provider: Path, features: list[str] = FEATURES) -> DatasetH:
    qlib.init(provider_uri=str(provider), region="cn", kernels=1)
    handler = {"class": "VN30Alpha158", "module_path": "handlers", "kwargs": {
        "instruments": "vn30", "start_time": "2015-10-05", "end_time": "2024-09-30",
        "fit_start_time": "2015-10-05", "fit_end_time": "2021-12-31", "features": features}}
    segments = {"train": ("2015-10-05", "2021-12-31"), "valid": ("2022-01-01", "2022-12-31"),
                "test": ("2023-01-01", "2024-09-26")}
    return DatasetH(handler, segments=segments)


@pytest.fixture(scope="module")
def planted(sim_provider) -> DatasetH:
    return make_dataset(sim_provider(0.1))


def daily_corr(pred: pd.Series, label: pd.Series, method: str) -> pd.Series:
    both = pd.concat([pred, label], axis=1, keys=["pred", "label"]).dropna()
    return both.groupby(level="datetime").apply(lambda day: day["pred"].corr(day["label"], method=method))


def rank_ic(model: LSTM, dataset: DatasetH, segment: str = "test") -> float:
    label = dataset.prepare(segment, col_set="label", data_key=DataHandlerLP.DK_L).iloc[:, 0]
    return float(daily_corr(model.predict(dataset, segment), label, "spearman").mean())


class LaterDaysReplaced:
    """The dataset as the model reads it, with every feature on a day after ``cut`` replaced by noise."""

    def __init__(self, dataset: DatasetH, cut: str):
        self.dataset, self.cut, self.handler = dataset, pd.Timestamp(cut), self

    def fetch(self, col_set: str, data_key: str) -> pd.DataFrame:
        features = self.dataset.handler.fetch(col_set=col_set, data_key=data_key).copy()
        later = features.index.get_level_values("datetime") > self.cut
        features.loc[later] = np.random.default_rng(0).normal(0, 5, size=(later.sum(), features.shape[1]))
        return features

    def prepare(self, segment, col_set, data_key):
        return self.dataset.prepare(segment, col_set=col_set, data_key=data_key)


def test_windows_and_predictions_never_read_a_later_day(planted):
    features = planted.handler.fetch(col_set="feature", data_key=DataHandlerLP.DK_I)
    days = pd.Series(features.index.get_level_values("datetime")).rank(method="dense").to_numpy()
    codes, _ = pd.factorize(features.index.get_level_values("instrument"))
    tagged = pd.DataFrame({"day": days, "instrument": codes}, index=features.index)
    sequences = SequenceWindows(tagged, step_len=7)
    windows = sequences.gather(sequences.positions(tagged.index))
    assert (windows[:, -1, 0] == days).all() and (windows[:, :, 0] <= days[:, None]).all()
    assert (windows[:, :, 1] == codes[:, None]).all()      # never another stock's rows
    assert (np.diff(windows[:, :, 0], axis=1) >= 0).all()   # in time order

    model = LSTM(**SMALL, n_epochs=1)
    model.fit(planted)
    cut = "2023-06-30"
    before = model.predict(planted)
    after = model.predict(LaterDaysReplaced(planted, cut))
    early = before.index.get_level_values("datetime") <= pd.Timestamp(cut)
    pd.testing.assert_series_equal(before[early], after[early])    # day t's score ignores days after t ...
    assert (before[~early] != after[~early]).mean() > 0.99         # ... and the replaced days do change scores


def test_lstm_recovers_the_planted_signal(planted):
    model = LSTM(**SMALL, n_epochs=3)
    model.fit(planted)
    assert rank_ic(model, planted) > 0.07   # planted at 0.1 in the close's place in the day's range


def test_bidirectional_stacked_lstm_recovers_the_planted_signal(planted):
    """Two bidirectional layers: the second reads both directions' outputs (twice the width) of the first."""
    model = LSTM(**{**SMALL, "num_layers": 2}, bidirectional=True, n_epochs=3)
    model.fit(planted)
    assert model.module.layers[1].input_size == 2 * SMALL["hidden_size"]
    assert rank_ic(model, planted) > 0.07


def test_lstm_finds_nothing_in_pure_noise(sim_provider):
    """Leakage canary: with signal 0 a look-ahead bug would show up as a Rank IC well away from 0."""
    noise = make_dataset(sim_provider(0.0))
    model = LSTM(**SMALL, n_epochs=3)
    model.fit(noise)
    assert abs(rank_ic(model, noise)) < 0.03   # ~430 test days x 30 names: standard error about 0.009


def test_same_seed_same_predictions(planted):
    first, second, other = (LSTM(**SMALL, n_epochs=1, seed=seed) for seed in (7, 7, 8))
    for model in (first, second, other):
        model.fit(planted)
    pd.testing.assert_series_equal(first.predict(planted), second.predict(planted))
    assert not first.predict(planted).equals(other.predict(planted))


def test_early_stopping_restores_the_best_epoch(planted):
    model = LSTM(**SMALL, n_epochs=12, early_stop=1, metric="ic", lr=0.02, dropout=0.0)
    model.fit(planted)
    history = pd.DataFrame(model.history)
    assert len(history) < 12, "patience 1 should have stopped the fit early"
    best = history["valid_ic"].idxmax()
    assert best < len(history) - 1 and history["valid_ic"].iloc[-1] < history["valid_ic"].max()
    label = planted.prepare("valid", col_set="label", data_key=DataHandlerLP.DK_L).iloc[:, 0]
    restored_ic = daily_corr(model.predict(planted, "valid"), label, "pearson").mean()
    assert restored_ic == pytest.approx(history["valid_ic"].max(), abs=1e-5)


def test_precision_bfloat16_runs_the_network_in_bf16_and_auto_follows_the_hardware(planted):
    with pytest.raises(ValueError, match="precision must be one of"):
        LSTM(precision="fp16")
    if not lstm_module.bf16_lstm_runs("cpu"):
        # e.g. AMD Zen 3: oneDNN builds no bf16 LSTM. Asking for one is a clear error; auto stays float32.
        with pytest.raises(ValueError, match="cannot run a bfloat16 LSTM"):
            LSTM(**SMALL, n_epochs=1, precision="bfloat16").fit(planted)
        model = LSTM(**SMALL, n_epochs=1, precision="auto")
        model.fit(planted)
        assert model.bf16 is False
        return
    torch.manual_seed(0)
    float32_net = lstm_module.LSTMNet(6, 8, 2, 0.0, False, bf16=False)
    bf16_net = lstm_module.LSTMNet(6, 8, 2, 0.0, False, bf16=True)
    bf16_net.load_state_dict(float32_net.state_dict())
    x = torch.randn(256, 5, 6)
    exact, rounded = float32_net(x), bf16_net(x)
    assert rounded.dtype == torch.float32
    assert not torch.equal(exact, rounded), "bf16 matmuls round: the outputs should differ a little"
    torch.testing.assert_close(rounded, exact, rtol=0, atol=0.05)
    chosen = {}
    for precision in lstm_module.PRECISIONS:
        model = LSTM(**SMALL, n_epochs=1, precision=precision)
        model.fit(planted)
        chosen[precision] = model.bf16
    assert chosen == {"float32": False, "bfloat16": True, "auto": lstm_module.native_bf16(torch.device("cpu"))}


def test_padded_feature_weights_never_act_and_never_learn():
    """The first layer's input is padded with zeros to a multiple of 8 (6 features -> 8): the weights of the two
    padded inputs change nothing and get no gradient."""
    torch.manual_seed(0)
    net = lstm_module.LSTMNet(6, 8, 2, 0.0, False)
    weights = net.layers[0].weight_ih_l0
    assert weights.shape[1] == 8
    x = torch.randn(32, 5, 6)
    before = net(x)
    with torch.no_grad():
        weights[:, 6:] = torch.randn(weights.shape[0], 2)
    after = net(x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    after.sum().backward()
    assert torch.all(weights.grad[:, 6:] == 0) and torch.any(weights.grad[:, :6] != 0)


def test_ic_loss_trains_on_whole_days(planted):
    model = LSTM(**SMALL, n_epochs=2, loss="ic")
    model.fit(planted)
    assert model.history[-1]["valid_loss"] == pytest.approx(-model.history[-1]["valid_ic"], abs=1e-5)
    assert rank_ic(model, planted) > 0.07


def test_interrupted_fit_resumes_from_its_checkpoint(planted, tmp_path, monkeypatch):
    uninterrupted = LSTM(**SMALL, n_epochs=3, checkpoint_dir=str(tmp_path / "full"))
    uninterrupted.fit(planted)

    batches = LabelledRows.batches
    calls = []

    def interrupt_in_third_epoch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return batches(self, *args, **kwargs)

    monkeypatch.setattr(LabelledRows, "batches", interrupt_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        LSTM(**SMALL, n_epochs=3, checkpoint_dir=str(tmp_path / "cut")).fit(planted)

    calls.clear()
    resumed = LSTM(**SMALL, n_epochs=3, checkpoint_dir=str(tmp_path / "cut"), resume=True)
    resumed.fit(planted)
    assert len(calls) == 1   # only the third epoch was trained again
    assert [row["epoch"] for row in resumed.history] == [0, 1, 2]
    assert resumed.history == uninterrupted.history
    pd.testing.assert_series_equal(resumed.predict(planted), uninterrupted.predict(planted))


@pytest.mark.slow
def test_lstm_workflow_pickles_into_the_recorder(sim_provider, tmp_path):
    provider = sim_provider(0.1)
    workflow = write_workflow(tmp_path / "wf", "lstm_vn30.yaml", {"hidden_size: 64": "hidden_size: 16"})  # quicker
    recorder = run_qrun(workflow, provider, tmp_path, "lstm_pickle", extra_env={"LSTM_EPOCHS": "2", "LSTM_THREADS": "1"})
    metrics = recorder.list_metrics()
    for key in ("IC", "Rank IC", "test_mse_learnt", "1day.excess_return_with_cost.annualized_return",
                "train_loss", "valid_loss", "valid_ic"):
        assert np.isfinite(metrics[key]), key
    assert metrics["Rank IC"] > 0.05
    steps = [m.step for m in recorder.client.get_metric_history(recorder.id, "valid_ic")]
    assert sorted(steps) == [0, 1]

    model = recorder.load_object("params.pkl")
    assert isinstance(model, LSTM) and model.module is not None
    assert all(p.device.type == "cpu" for p in model.module.parameters())
    dataset = init_instance_by_config(recorder.load_object("task")["dataset"])
    pred = recorder.load_object("pred.pkl")["score"]
    pd.testing.assert_series_equal(model.predict(dataset), pred, check_names=False)
