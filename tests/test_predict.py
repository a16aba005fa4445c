"""`vn30-qlib predict`: the next trading day's signal from the stored models, on the simulated market with the
smallest LightGBM the loop can fit, and the portfolio rules on hand-built cases."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO
from test_update import hashes, write_export
from vn30_qlib import store
from vn30_qlib.cli import main
from vn30_qlib.data.ingest import ingest
from vn30_qlib.data.provider import read_calendar, read_features
from vn30_qlib.data.simulate import round_to_tick
from vn30_qlib.data.update import update
from vn30_qlib.loop import LoopEntry, fit_entry, provider_fingerprint
from vn30_qlib.predict import (EXPERIMENT, Strategy, fingerprint_until, lot_shares, portfolio, price_limit_flags,
                               target_names)

# lgb_vn30.yaml's base with 6 features, train from 2021 and 20 boosting rounds
WORKFLOW = f"""\
BASE_CONFIG_PATH: {REPO / "workflows" / "base_vn30.yaml"}
experiment_name: predict_test
qlib_init:
    provider_uri: {{{{ VN30_PROVIDER }}}}
task:
    model:
        class: LGBModel
        module_path: vn30_qlib.models.lgb
        kwargs: {{loss: mse, num_boost_round: 20, early_stopping_rounds: 5, num_leaves: 7, learning_rate: 0.1,
                  num_threads: 1, seed: 0, verbosity: -1}}
    dataset:
        kwargs:
            handler:
                kwargs:
                    start_time: 2021-01-04
                    fit_start_time: 2021-01-04
                    features: [KMID, KLEN, KUP, KLOW, KSFT, ROC5]
            segments:
                train: [2021-01-04, 2021-12-29]
"""
STRATEGY = Strategy(topk=3, n_drop=1, account=300_000.0, trade_unit=100, limit=0.07)


@pytest.fixture(scope="module")
def trained(sim_provider, tmp_path_factory) -> tuple[Path, Path]:
    """(provider, store) with one pooled LightGBM fitted by the loop's own fit on the simulated market."""
    folder = tmp_path_factory.mktemp("predict")
    workflow = folder / "lgb_vn30.yaml"
    workflow.write_text(WORKFLOW)
    provider = sim_provider(0.1)
    result = fit_entry(LoopEntry(str(workflow), "pooled", None), str(provider), str(folder / "models"))
    assert result["status"] == "done", result.get("traceback")
    return provider, folder / "models"


def stored_scores(store_root: Path, day: str) -> pd.Series:
    version = store.latest(store_root / "pooled" / "lgb")
    return pd.read_parquet(version / "predictions.parquet")["score"].xs(pd.Timestamp(day), level="datetime")


def test_predict_reproduces_the_loops_test_prediction_and_swaps_at_most_one_name(trained, capsys):
    provider, store_root = trained
    assert main(["predict", "--date", "2024-09-27", "--store", str(store_root), "--provider", str(provider)]) == 0
    printed = capsys.readouterr().out
    assert "signal for 2024-09-27 from the close of 2024-09-26; models: lgb v0001" in printed
    first = pd.read_csv(store_root / "signals" / "2024-09-27.csv").set_index("symbol")
    expected = stored_scores(store_root, "2024-09-26")
    assert set(first.index) == set(expected.index) and len(first) == 30
    assert np.allclose(first["score_lgb"], expected.reindex(first.index), rtol=0, atol=1e-9)
    assert list(first.sort_values("rank").index[:5]) == list(expected.sort_values(ascending=False).index[:5])
    buys = first[first["order"] == "buy"]
    assert len(buys) == 5 and set(buys["rank"]) == {1, 2, 3, 4, 5}  # the workflow's strategy: top 5
    assert (buys["target_shares"] % 100 == 0).all()
    assert (buys["target_shares"] * buys["close"] <= 1_000_000 / 5).all()
    assert ((buys["target_shares"] + 100) * buys["close"] > 1_000_000 / 5).all()

    assert main(["predict", "--date", "2024-09-30", "--store", str(store_root), "--provider", str(provider)]) == 0
    second = pd.read_csv(store_root / "signals" / "2024-09-30.csv").set_index("symbol")
    held, now = set(first.index[first["target_shares"] > 0]), set(second.index[second["target_shares"] > 0])
    assert len(now) == 5 and len(held - now) <= 1
    kept = sorted(held & now)
    assert (second.loc[kept, "target_shares"] == first.loc[kept, "target_shares"]).all()
    assert set(second.loc[kept, "order"]) == {"hold"}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store_root / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id], order_by=["attributes.start_time ASC"])
    assert [run.data.params["date"] for run in runs] == ["2024-09-27", "2024-09-30"]
    record = runs[0].data.params
    assert record["provider_sha256"] == provider_fingerprint(provider)["sha256"]
    assert record["model.lgb"] == str(store.latest(store_root / "pooled" / "lgb"))
    artifact = Path(client.download_artifacts(runs[0].info.run_id, "2024-09-27.csv", str(store_root.parent)))
    assert artifact.read_bytes() == (store_root / "signals" / "2024-09-27.csv").read_bytes()
    inputs = json.loads(Path(client.download_artifacts(runs[1].info.run_id, "inputs.json", str(store_root.parent)))
                        .read_text())
    assert inputs["previous"]["file"] == str(store_root / "signals" / "2024-09-27.csv")


def test_predict_on_an_updated_provider_flags_names_at_the_limit(trained, tmp_path, capsys):
    provider, store_root = trained
    calendar = read_calendar(provider)
    bars = {p.name.upper(): read_features(provider, p.name.upper(), calendar)[["open", "high", "low", "close", "volume"]]
            for p in (provider / "features").iterdir()}
    bars = {symbol: frame.astype("float64").round(2) for symbol, frame in bars.items()}
    source = write_export(bars, tmp_path / "export")
    ingested = tmp_path / "provider"
    ingest(source, ingested)  # the same bars through a CSV export: the provider the model was fitted on
    assert provider_fingerprint(ingested)["sha256"] == provider_fingerprint(provider)["sha256"]
    day = pd.Timestamp("2024-10-01")
    moves = {"VNM": round_to_tick(bars["VNM"]["close"].iloc[-1] * 1.07, "down"),
             "FPT": round_to_tick(bars["FPT"]["close"].iloc[-1] * 0.93, "up")}
    for symbol, frame in bars.items():
        close = float(moves.get(symbol, round_to_tick(frame["close"].iloc[-1] * 1.01)))
        bars[symbol] = pd.concat([frame, pd.DataFrame({"open": close, "high": close, "low": close, "close": close,
                                                       "volume": 100_000.0}, index=[day])])
    update(write_export(bars, tmp_path / "longer"), ingested)
    assert fingerprint_until(ingested, "2024-09-30") == provider_fingerprint(provider)["sha256"]

    out = tmp_path / "signals" / "2024-10-02.csv"
    assert main(["predict", "--store", str(store_root), "--provider", str(ingested), "--out", str(out)]) == 0
    assert "signal for 2024-10-02 from the close of 2024-10-01" in capsys.readouterr().out
    table = pd.read_csv(out, keep_default_na=False).set_index("symbol")
    assert table.loc["VNM", "at_limit"] == "up" and table.loc["FPT", "at_limit"] == "down"
    assert set(table.loc[~table.index.isin(["VNM", "FPT"]), "at_limit"]) == {""}


def test_predict_refuses_a_rebuilt_provider_and_changes_nothing(trained, tmp_path, capsys):
    provider, store_root = trained
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(provider, rebuilt)
    close = rebuilt / "features" / "acb" / "close.day.bin"
    values = np.fromfile(close, dtype="<f4")
    values[1:100] *= np.float32(0.97)  # re-adjusted history
    values.tofile(close)
    before = {**hashes(rebuilt), **hashes(store_root)}
    out = tmp_path / "signal.csv"
    command = ["predict", "--date", "2024-09-27", "--store", str(store_root), "--provider", str(rebuilt),
               "--out", str(out)]
    assert main(command) == 2
    error = capsys.readouterr().err
    assert "v0001: fitted on a provider whose data up to 2024-09-30 is not" in error
    assert "rebuilt or re-adjusted since); retrain it on this provider: vn30-qlib loop" in error and "--force" in error
    assert {**hashes(rebuilt), **hashes(store_root)} == before and not out.exists()


def test_predict_refuses_a_model_without_a_provider_fingerprint(trained, tmp_path, capsys):
    provider, store_root = trained
    copy = tmp_path / "models"
    shutil.copytree(store_root / "pooled", copy / "pooled")
    metadata_path = store.latest(copy / "pooled" / "lgb") / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    del metadata["provider"]["sha256"]
    metadata_path.write_text(json.dumps(metadata))
    assert main(["predict", "--date", "2024-09-27", "--store", str(copy), "--provider", str(provider)]) == 2
    error = capsys.readouterr().err
    assert "records no provider fingerprint" in error and "vn30-qlib loop" in error and "--force" in error


@pytest.mark.parametrize("date, message", [
    ("2024-10-02", "ends 2024-09-30 and lacks the close of 2024-10-01, the last trading day before it; run "
                   "vn30-qlib data update"),
    ("2024-09-28", "2024-09-28 is not a HOSE trading day (weekend or holiday); the next one is 2024-09-30"),
    ("2024-09-02", "2024-09-02 is not a HOSE trading day"),  # national day
    ("2022-06-01", "fitted on data up to 2022-12-28 (its train and valid segments); a signal from the close of "
                   "2022-05-31 would be in-sample"),
])
def test_predict_refuses_a_day_it_cannot_sign(trained, date, message, capsys):
    provider, store_root = trained
    before = hashes(store_root)
    assert main(["predict", "--date", date, "--store", str(store_root), "--provider", str(provider)]) == 2
    assert message in capsys.readouterr().err
    assert hashes(store_root) == before


def test_bad_previous_signal_or_foreign_output_is_refused(trained, tmp_path, capsys):
    provider, store_root = trained
    signals = tmp_path / "signals"
    signals.mkdir()
    (signals / "2024-09-26.csv").write_text("symbol,rank,score,target_shares\nACB,1,0.5,1000\nFPT,2,0.4,150\n")
    command = ["predict", "--date", "2024-09-27", "--store", str(store_root), "--provider", str(provider)]
    assert main(command + ["--out", str(signals / "2024-09-27.csv")]) == 2
    assert (f"{signals / '2024-09-26.csv'}, line 3: target_shares 150 is not a whole number of 100-share lots"
            in capsys.readouterr().err)
    notes = tmp_path / "notes.csv"
    notes.write_text("my own notes\n")
    assert main(command + ["--out", str(notes)]) == 2
    assert "exists and is not a signal file vn30-qlib predict wrote" in capsys.readouterr().err
    assert notes.read_text() == "my own notes\n" and sorted(p.name for p in signals.iterdir()) == ["2024-09-26.csv"]


def test_lots_are_whole_hundreds_rounded_down():
    assert lot_shares(200_000, 23.45, 100) == 8_500  # 8,528.8 shares
    assert lot_shares(234_500, 23.45, 100) == 10_000  # exactly 100 lots, despite floating point
    assert lot_shares(1_000, 23.45, 100) == 0
    assert lot_shares(100_000, np.float32(6.41), 100) == 15_600


def test_the_limit_flag_marks_closes_at_the_rounded_ceiling_or_floor():
    previous = pd.Series([23.45, 23.45, 60.0, 9.99, 50.0, 100.0, np.nan])
    close = pd.Series([25.05, 25.00, 55.8, 10.65, 53.5, 93.1, 10.0])
    # 23.45 * 1.07 = 25.09 -> ceiling 25.05; 60 * 0.93 = 55.8 is on the tick; 9.99 * 1.07 = 10.69 -> 10.65 (the
    # 0.05 tick from 10 on); 50 * 1.07 = 53.5; 100 * 0.93 = 93 and 93.1 is above the floor
    assert price_limit_flags(close, previous, 0.07).tolist() == ["up", "", "down", "up", "up", "", ""]
    stored = price_limit_flags(close.astype("float32").astype("float64"), previous.astype("float32"), 0.07)
    assert stored.tolist() == ["up", "", "down", "up", "up", "", ""]


def test_target_names_follow_topk_dropout():
    scores = pd.Series({"A": 0.9, "B": 0.8, "C": 0.7, "D": 0.6, "E": 0.5, "F": 0.4, "G": np.nan})
    assert target_names(scores, [], 3, 1) == ["A", "B", "C"]
    assert target_names(scores, ["A", "E", "F"], 3, 1) == ["A", "E", "B"]  # one swap a day: F goes, B comes
    assert target_names(scores, ["A", "B", "F"], 3, 1) == ["A", "B", "C"]
    assert target_names(scores, ["A", "B", "C"], 3, 1) == ["A", "B", "C"]  # the best 3 are held: no trade
    assert target_names(scores, ["A", "B", "G"], 3, 1) == ["A", "B", "C"]  # a held name without a score goes
    assert target_names(scores, ["E", "F"], 3, 1) == ["E", "A", "B"]  # filling up: 2 buys, 1 swap


def test_portfolio_orders_in_lots():
    table = pd.DataFrame({"score": [0.9, 0.8, 0.7, 0.1], "close": [23.45, 60.0, 9.99, 30.0]},
                         index=pd.Index(["A", "B", "C", "D"], name="symbol"))
    orders = portfolio(table, {"B": 1_600, "D": 3_300}, STRATEGY)  # 100,000 a new name
    assert orders.to_dict("index") == {
        "A": {"previous_shares": 0, "target_shares": 4_200, "order": "buy", "order_shares": 4_200},
        "B": {"previous_shares": 1_600, "target_shares": 1_600, "order": "hold", "order_shares": 0},
        "C": {"previous_shares": 0, "target_shares": 10_000, "order": "buy", "order_shares": 10_000},  # fills up
        "D": {"previous_shares": 3_300, "target_shares": 0, "order": "sell", "order_shares": 3_300},
    }


class QuantileMember:
    """Stands in for a fitted TFT: its 10/50/90 % quantiles are the first feature -1, +0, +1, moved by ``shift``."""

    def __init__(self, shift: float):
        self.shift = shift

    def predict_quantiles(self, dataset, segment: str) -> pd.DataFrame:
        from qlib.data.dataset.handler import DataHandlerLP

        x = dataset.prepare(segment, col_set="feature", data_key=DataHandlerLP.DK_I).iloc[:, 0] + self.shift
        return pd.DataFrame({"h1_q0.1": x - 1, "h1_q0.5": x, "h1_q0.9": x + 1})


class QuantileEnsemble:
    """Stands in for a `SeedEnsemble` of TFTs: the members' mean median is its score."""

    members = [QuantileMember(0.0), QuantileMember(2.0)]

    def predict(self, dataset, segment: str) -> pd.Series:
        return sum(m.predict_quantiles(dataset, segment)["h1_q0.5"] for m in self.members) / len(self.members)


def test_quantile_models_add_their_10_50_90_columns(trained):
    from vn30_qlib.loop import init_qlib_for
    from vn30_qlib.predict import LoadedModel, score_day

    provider, store_root = trained
    version = store.latest(store_root / "pooled" / "lgb")
    lgb = store.load(version)
    init_qlib_for(provider)
    day = pd.Timestamp("2024-09-26")
    scores = score_day([LoadedModel("lgb", version, lgb[0], lgb[1], lgb[3]),
                        LoadedModel("tft_ensemble", version, QuantileEnsemble(), lgb[1], lgb[3])], day)
    assert list(scores.columns) == ["score_lgb", "score_tft_ensemble", "tft_ensemble_q10", "tft_ensemble_q50",
                                    "tft_ensemble_q90"]
    assert np.allclose(scores["tft_ensemble_q50"], scores["score_tft_ensemble"])
    assert np.allclose(scores["tft_ensemble_q10"], scores["tft_ensemble_q50"] - 1)
    assert np.allclose(scores["tft_ensemble_q90"], scores["tft_ensemble_q50"] + 1)
    assert np.allclose(scores["score_lgb"], stored_scores(store_root, "2024-09-26").reindex(scores.index))


def test_a_name_without_a_bar_on_the_signal_day_gets_no_score_and_is_sold():
    from vn30_qlib.predict import signal_table

    day = pd.Timestamp("2024-09-26")
    closes = {"A": pd.Series([10.0, 10.7], index=[day - pd.Timedelta(days=1), day]),
              "B": pd.Series([20.0, 20.2], index=[day - pd.Timedelta(days=1), day]),
              "C": pd.Series([30.0], index=[day - pd.Timedelta(days=2)])}  # suspended on the signal day
    scores = pd.DataFrame({"score_lgb": [0.1, 0.3, 0.9]}, index=["A", "B", "C"])
    table = signal_table(scores, closes, day, {"C": 1_000}, STRATEGY).set_index("symbol")
    assert list(table.index) == ["B", "A", "C"] and table["rank"].tolist()[:2] == [1, 2]
    assert pd.isna(table.loc["C", "score"]) and pd.isna(table.loc["C", "score_lgb"]) and pd.isna(table.loc["C", "rank"])
    assert table.loc["C", "order"] == "sell" and table.loc["C", "order_shares"] == 1_000
    assert table.loc["A", "at_limit"] == "up"  # 10 * 1.07 = 10.7, on the 0.05 tick
    assert table[["order", "target_shares"]].loc[["A", "B"]].values.tolist() == [["buy", 9_300], ["buy", 4_900]]


def test_features_come_from_the_models_window_only_with_the_scores_of_a_full_refit(trained, sim_provider, tmp_path,
                                                                                 monkeypatch):
    """A version keeps its processors' fitted state, so predict computes features from a few weeks before the
    signal day (not from 2021) and still gives the scores the loop stored; a sequence model (a 1-epoch LSTM on a
    10-day window) reads its whole window from that short span."""
    from vn30_qlib import processor_state
    from vn30_qlib.loop import init_qlib_for
    from vn30_qlib.predict import LoadedModel, score_day

    provider, store_root = trained
    lstm = tmp_path / "lstm_vn30.yaml"
    lstm.write_text(WORKFLOW.replace(
        "class: LGBModel\n        module_path: vn30_qlib.models.lgb\n        kwargs: {loss: mse, num_boost_round: 20, "
        "early_stopping_rounds: 5, num_leaves: 7, learning_rate: 0.1,\n                  num_threads: 1, seed: 0, "
        "verbosity: -1}",
        "class: LSTM\n        module_path: vn30_qlib.models.lstm\n        kwargs: {d_feat: 6, hidden_size: 8, "
        "num_layers: 1, n_epochs: 1, step_len: 10, n_threads: 1, seed: 0}"))
    result = fit_entry(LoopEntry(str(lstm), "pooled", None), str(provider), str(store_root))
    assert result["status"] == "done", result.get("traceback")
    built = []
    original = processor_state.handler_with_state
    monkeypatch.setattr(processor_state, "handler_with_state",
                        lambda config, states: built.append(original(config, states)) or built[-1])
    init_qlib_for(provider)
    day = pd.Timestamp("2024-09-26")
    for name in ("lgb", "lstm"):
        version = store.latest(store_root / "pooled" / name)
        model, task, stored, metadata = store.load(version)
        assert [state["class"] for state in metadata["processors"]][:3] == ["InfToNan", "RobustZScoreNorm", "Fillna"]
        scores = score_day([LoadedModel(name, version, model, task, metadata)], day)[f"score_{name}"]
        expected = stored["score"].xs(day, level="datetime").reindex(scores.index)
        assert np.allclose(scores, expected, rtol=0, atol=1e-6), name
    first_days = [handler.fetch(col_set="feature").index.get_level_values("datetime").min() for handler in built]
    assert len(first_days) == 2 and all(day - first < pd.Timedelta(days=60) for first in first_days), first_days
