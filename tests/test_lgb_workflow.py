"""`qrun workflows/lgb_vn30.yaml` end to end: what the recorder holds, planted signal found, noise not."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import FEW_FEATURES, run_qrun, write_workflow

pytestmark = pytest.mark.slow


def assert_complete_recorder(recorder, features: int = 158) -> dict:
    artifacts = {
        "pred.pkl", "label.pkl", "sig_analysis/ic.pkl", "sig_analysis/ric.pkl",
        "prediction_error/metrics.pkl", "feature_importance/importance.pkl",
        "portfolio_analysis/port_analysis_1day.pkl", "portfolio_analysis/report_normal_1day.pkl",
    }
    for name in sorted(artifacts):
        assert recorder.load_object(name) is not None, name
    listed = {a.path for a in recorder.client.list_artifacts(recorder.id, "feature_importance")}
    assert {"feature_importance/importance.csv", "feature_importance/importance.png"} <= listed
    metrics = recorder.list_metrics()
    for key in ("IC", "ICIR", "Rank IC", "Rank ICIR", "hit_rate", "test_mse_learnt", "test_mae_learnt",
                "1day.excess_return_with_cost.annualized_return", "1day.excess_return_with_cost.max_drawdown"):
        assert np.isfinite(metrics[key]), key
    assert metrics["degenerate"] == 0  # no test day with one score for every name
    assert "test_mse" not in metrics, "one MSE, named by its units"
    ic = recorder.load_object("sig_analysis/ric.pkl")
    assert metrics["Rank IC"] == pytest.approx(ic.mean()), "Rank IC is the mean of the stored daily series"
    importance = recorder.load_object("feature_importance/importance.pkl")
    assert len(importance) == features and importance.iloc[0] > 0
    pred = recorder.load_object("pred.pkl")
    dates = pred.index.get_level_values("datetime")
    assert dates.min().strftime("%Y-%m-%d") >= "2023-01-01" and dates.max().strftime("%Y-%m-%d") <= "2024-09-26"
    return metrics


def test_lgb_workflow_recovers_the_planted_signal(sim_provider, tmp_path):
    recorder = run_qrun("lgb_vn30.yaml", sim_provider(0.1), tmp_path, "lgb_planted")
    metrics = assert_complete_recorder(recorder)
    assert metrics["Rank IC"] > 0.05, metrics["Rank IC"]
    importance = recorder.load_object("feature_importance/importance.pkl")
    # the signal is planted in the close's place in the day's range: the K-bar features must lead
    assert set(importance.index[:5]) & {"KLOW", "KUP", "KSFT", "KMID", "KLOW2", "KUP2", "KSFT2", "KMID2"}


def test_lgb_workflow_finds_nothing_in_pure_noise(sim_provider, tmp_path):
    """Leakage canary: with signal 0 a look-ahead bug would show up as a Rank IC well away from 0."""
    workflow = write_workflow(tmp_path / "wf", "lgb_vn30.yaml", append=FEW_FEATURES)  # the K-bar ones among them
    metrics = assert_complete_recorder(run_qrun(workflow, sim_provider(0.0), tmp_path, "lgb_noise"), features=8)
    # ~430 test days x 30 names: the daily Rank IC's standard error is about 0.009
    assert abs(metrics["Rank IC"]) < 0.03, metrics["Rank IC"]


def test_lgb_workflow_on_real_vn30(real_provider, tmp_path):
    workflow = write_workflow(tmp_path / "wf", "lgb_vn30.yaml", append=FEW_FEATURES)  # all 158: the planted test
    recorder = run_qrun(workflow, real_provider, tmp_path, "lgb_real")
    assert_complete_recorder(recorder, features=8)
    report = recorder.load_object("portfolio_analysis/report_normal_1day.pkl")
    # the provider has the VN30 index, so the benchmark is the index's daily return, not an average of stocks
    from qlib.data import D

    index_change = D.features(["VN30"], ["$close / Ref($close, 1) - 1"], "2023-01-03", "2024-09-26").droplevel(0).iloc[:, 0]
    both = report["bench"].to_frame().join(index_change.rename("index"), how="inner")
    np.testing.assert_allclose(both["bench"], both["index"], atol=1e-6)
