"""Every metric of `vn30_qlib.metrics` on cases computed by hand (issue 21, item 4), and the torch daily IC of
the training loop (its loss and early-stopping score) against the one definition here."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from vn30_qlib import metrics


def panel(rows: dict[str, dict[str, tuple[float, float]]]) -> tuple[pd.Series, pd.Series]:
    """(pred, label) from {day: {name: (pred, label)}}."""
    index = pd.MultiIndex.from_tuples([(pd.Timestamp(day), name) for day, names in rows.items() for name in names],
                                      names=["datetime", "instrument"])
    values = [value for names in rows.values() for value in names.values()]
    return (pd.Series([p for p, _ in values], index=index, name="score"),
            pd.Series([y for _, y in values], index=index, name="label"))


# day 1: IC = Rank IC = 0.5 (centred pred -1, 0, 1; label -1, 1, 0: covariance 1, variances 2 and 2)
# day 2: IC = 0.3 / sqrt(42/9 * 0.02) (pred 1, 2, 4 centred -4/3, -1/3, 5/3; label centred -0.1, 0, 0.1),
#        Rank IC = 1 (same order)
# day 3: constant prediction, day 4: one name: no IC
# day 5: reversed order: IC = Rank IC = -1
PRED, LABEL = panel({
    "2024-01-02": {"A": (1.0, 1.0), "B": (2.0, 3.0), "C": (3.0, 2.0)},
    "2024-01-03": {"A": (1.0, 0.1), "B": (2.0, 0.2), "C": (4.0, 0.3)},
    "2024-01-04": {"A": (5.0, 1.0), "B": (5.0, 2.0), "C": (5.0, 3.0)},
    "2024-01-05": {"A": (1.0, 1.0)},
    "2024-01-08": {"A": (1.0, 4.0), "B": (2.0, 3.0), "C": (3.0, 2.0), "D": (4.0, 1.0)},
})
DAY2_IC = 0.3 / math.sqrt(42 / 9 * 0.02)
DAYS = pd.DatetimeIndex(["2024-01-02", "2024-01-03", "2024-01-08"])


def test_daily_ic_and_rank_ic_leave_out_days_without_a_cross_section():
    ic = metrics.daily_ic(PRED, LABEL)
    assert list(ic.index) == list(DAYS)
    assert ic.to_numpy() == pytest.approx([0.5, DAY2_IC, -1.0])
    assert metrics.daily_rank_ic(PRED, LABEL).to_numpy() == pytest.approx([0.5, 1.0, -1.0])


def test_rank_ic_ranks_ties_at_their_average_rank():
    pred, label = panel({"2024-01-02": {"A": (1.0, 10.0), "B": (1.0, 20.0), "C": (2.0, 30.0)}})
    # ranks 1.5, 1.5, 3 against 1, 2, 3: centred -0.5, -0.5, 1 and -1, 0, 1: 1.5 / sqrt(1.5 * 2)
    assert metrics.daily_rank_ic(pred, label).iloc[0] == pytest.approx(1.5 / math.sqrt(3.0))


def test_information_ratio_and_standard_error():
    rank_ic = pd.Series([0.5, 1.0, -1.0])
    sd = math.sqrt(((1 / 3) ** 2 + (5 / 6) ** 2 + (7 / 6) ** 2) / 2)  # mean 1/6
    assert metrics.information_ratio(rank_ic) == pytest.approx((1 / 6) / sd)
    assert metrics.standard_error(rank_ic) == pytest.approx(sd / math.sqrt(3))
    assert metrics.information_ratio(pd.Series([0.2])) is None
    assert metrics.information_ratio(pd.Series([0.2, 0.2])) is None
    assert metrics.standard_error(pd.Series([0.2])) is None


def test_paired_difference_is_the_mean_daily_difference_over_its_standard_error():
    days = pd.bdate_range("2024-01-01", periods=4)
    first = pd.Series([0.5, 1.0, -1.0, 0.3], index=days)
    second = pd.Series([0.1, 0.5, -1.3], index=days[:3])  # the 4th day is not common
    result = metrics.paired_difference(first, second)  # differences 0.4, 0.5, 0.3: mean 0.4, sd 0.1
    assert result["days"] == 3 and result["mean"] == pytest.approx(0.4)
    assert result["t"] == pytest.approx(0.4 / (0.1 / math.sqrt(3)))
    assert metrics.paired_difference(first, first)["t"] is None  # no spread: no t-stat


def test_hit_rate_compares_signs_relative_to_the_day_s_medians():
    # day 1: pred - 2 = -1, 0, 1; label - 2 = -1, 1, 0: only A counts, a hit
    # day 2: pred - 2 = -1, 0, 2; label - 0.2 = -0.1, 0, 0.1: A and C count, both hits
    # days 3, 4: every prediction is the day's median; day 5: 4 rows, all misses
    assert metrics.hit_rate(PRED, LABEL) == pytest.approx(3 / 7)


def test_hit_rate_ignores_the_market_s_move():
    """Every return positive (a rising market), a prediction that ranks the names right: a hit on every row,
    where the sign of the raw return would score the below-median names as misses."""
    pred, label = panel({"2024-01-02": {"A": (-1.0, 0.01), "B": (0.0, 0.02), "C": (1.0, 0.03)},
                         "2024-01-03": {"A": (-2.0, 0.04), "B": (3.0, 0.06), "C": (0.0, 0.05)}})
    assert metrics.hit_rate(pred, label) == 1.0
    one_name = panel({"2024-01-02": {"A": (1.0, 0.01)}})
    assert metrics.hit_rate(*one_name) is None


def test_time_series_ic_mse_mae():
    days = pd.bdate_range("2024-01-01", periods=4)
    pred, label = pd.Series([1.0, 2.0, 3.0, 4.0], index=days), pd.Series([1.0, 3.0, 2.0, 4.0], index=days)
    # centred -1.5, -0.5, 0.5, 1.5 and -1.5, 0.5, -0.5, 1.5: covariance 4, variances 5 and 5
    assert metrics.time_series_ic(pred, label) == pytest.approx(0.8)
    assert metrics.time_series_ic(pred, label, method="spearman") == pytest.approx(0.8)
    assert metrics.time_series_ic(pd.Series(1.0, index=days), label) is None
    learnt = pd.Series([1.0, 1.0, 5.0, 4.0], index=days)  # errors 0, 1, -2, 0
    assert metrics.mse(pred, learnt) == pytest.approx(5 / 4)
    assert metrics.mae(pred, learnt) == pytest.approx(3 / 4)


def test_time_series_metrics_name_errors_in_the_learnt_units():
    days = pd.bdate_range("2024-01-01", periods=50)
    raw = pd.Series(np.random.default_rng(0).normal(scale=0.02, size=50), index=days)
    learnt = (raw - raw.mean()) / raw.std()
    skilled = metrics.time_series_metrics(learnt + 0.1, raw, learnt)
    assert skilled["mse_learnt"] == pytest.approx(0.01) and skilled["mae_learnt"] == pytest.approx(0.1)
    assert skilled["ic"] == pytest.approx(1.0), "correlations stay against the raw return"
    constant = metrics.time_series_metrics(pd.Series(0.0, index=days), raw, learnt)
    assert constant["degenerate"] is True and constant["ic"] is None and constant["rank_ic"] is None
    assert constant["mse_learnt"] > skilled["mse_learnt"], "in learnt units a constant no longer scores better"
    assert metrics.mse(pd.Series(0.0, index=days), raw) < metrics.mse(learnt + 0.1, raw), \
        "against the raw return (the old test_mse) it did"
    assert "mse" not in skilled and "mae" not in skilled


def test_cross_sectional_metrics_from_the_daily_series():
    result = metrics.cross_sectional_metrics(PRED, LABEL)
    assert result["cs_ic"] == pytest.approx((0.5 + DAY2_IC - 1.0) / 3)
    assert result["cs_rank_ic"] == pytest.approx(1 / 6)
    assert result["cs_rank_icir"] == pytest.approx(metrics.information_ratio(pd.Series([0.5, 1.0, -1.0])))
    assert result["hit_rate"] == pytest.approx(3 / 7) and result["cs_days"] == 3 and not result["degenerate"]
    flat = metrics.cross_sectional_metrics(PRED * 0 + 1.0, LABEL)
    assert flat["degenerate"] and flat["cs_rank_ic"] is None and flat["hit_rate"] is None


def test_the_training_loop_s_torch_daily_ic_is_the_same_daily_ic():
    """`training.daily_ic` (the IC loss and the `metric: ic` early-stopping score) is the mean of
    `metrics.daily_ic`: on the hand-computed panel and on a random one with a constant day."""
    torch = pytest.importorskip("torch")
    from vn30_qlib.models.training import daily_ic as torch_daily_ic

    rng = np.random.default_rng(0)
    index = pd.MultiIndex.from_product([pd.bdate_range("2024-01-01", periods=40), [f"S{i}" for i in range(30)]],
                                       names=["datetime", "instrument"])
    pred = pd.Series(rng.normal(size=len(index)), index=index)
    label = pd.Series(0.3 * pred.to_numpy() + rng.normal(size=len(index)), index=index)
    pred.loc[index[0][0]] = 0.7  # the first day constant: left out by both
    for p, y in ((PRED, LABEL), (pred, label)):
        days = torch.as_tensor(pd.factorize(p.index.get_level_values("datetime"))[0])
        ours = float(torch_daily_ic(torch.tensor(p.to_numpy()), torch.tensor(y.to_numpy()), days))
        assert ours == pytest.approx(metrics.daily_ic(p, y).mean(), abs=1e-12)
