"""The one implementation of every prediction metric the package reports (records, CV, the loop, the report).

Cross-sectional metrics are computed day by day across the day's names: daily IC (Pearson), daily Rank IC
(Spearman: the Pearson correlation of the day's average ranks), their information ratio (mean / standard
deviation), and the hit rate: the share of (day, name) rows on which prediction minus the day's median prediction
has the sign of return minus the day's median return, which leaves out the market's common move. A day with
fewer than two names, or without spread in either series, has no IC and is left out (the torch ``daily_ic`` of
`vn30_qlib.models.training`, the differentiable loss and early-stopping score, follows the same definition;
tests/test_metrics.py checks that the two agree). Time-series metrics are one symbol's correlations over time.
MSE and MAE compare a prediction with the label the model learnt (e.g. the day's z-scored return), never with a
label in other units.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

# A prediction series whose spread is below this (relative to the label's) carries no ranking information.
DEGENERATE_RELATIVE_STD = 1e-6
# A day whose sum of squared deviations from the day's mean is at most this has no spread (as in training.daily_ic).
NO_SPREAD = 1e-12


def is_degenerate(pred: pd.Series, label: pd.Series) -> bool:
    """True when the predictions are (nearly) constant, so correlations with them are undefined."""
    spread = float(np.nanstd(pred.to_numpy(dtype="float64")))
    scale = float(np.nanstd(label.to_numpy(dtype="float64"))) or 1.0
    return pred.nunique(dropna=True) <= 1 or spread < DEGENERATE_RELATIVE_STD * scale


def _aligned(pred: pd.Series, label: pd.Series) -> pd.DataFrame:
    return pd.concat([pred.rename("pred"), label.rename("label")], axis=1, join="inner").dropna()


def _daily_pearson(both: pd.DataFrame) -> pd.Series:
    """Per day (index level ``datetime``) the Pearson correlation of columns ``pred`` and ``label``; days with
    fewer than two rows or no spread are left out."""
    days = both.groupby(level="datetime")
    centred = both - days.transform("mean")
    sums = pd.DataFrame({"cov": centred["pred"] * centred["label"], "var_pred": centred["pred"] ** 2,
                         "var_label": centred["label"] ** 2}).groupby(level="datetime").sum()
    count = days.size()
    valid = (count >= 2) & (sums["var_pred"] > NO_SPREAD) & (sums["var_label"] > NO_SPREAD)
    sums = sums[valid]
    return (sums["cov"] / np.sqrt(sums["var_pred"] * sums["var_label"])).rename("ic")


def daily_ic(pred: pd.Series, label: pd.Series) -> pd.Series:
    """The cross-sectional Pearson IC of each day (indexed by day)."""
    return _daily_pearson(_aligned(pred, label))


def daily_rank_ic(pred: pd.Series, label: pd.Series) -> pd.Series:
    """The cross-sectional Rank IC (Spearman, ties at their average rank) of each day (indexed by day)."""
    both = _aligned(pred, label)
    return _daily_pearson(both.groupby(level="datetime").rank()).rename("rank_ic")


def information_ratio(series: pd.Series) -> float | None:
    """Mean over standard deviation (ddof 1) of a daily metric; None with fewer than two values or no spread."""
    values = series.dropna()
    if len(values) < 2 or not values.std() > 0:
        return None
    return float(values.mean() / values.std())


def standard_error(series: pd.Series) -> float | None:
    """The standard error of the mean of a daily metric: std (ddof 1) / sqrt(days); None under two days."""
    values = series.dropna()
    return float(values.std() / math.sqrt(len(values))) if len(values) >= 2 else None


def paired_difference(first: pd.Series, second: pd.Series) -> dict:
    """The daily differences ``first - second`` of two daily metric series on their common days: mean, t-stat
    (mean / its standard error; None without spread) and days."""
    difference = (first - second).dropna()
    error = standard_error(difference)
    mean = float(difference.mean()) if len(difference) else None
    return {"mean": mean, "t": mean / error if error else None, "days": int(len(difference))}


def hit_rate(pred: pd.Series, label: pd.Series) -> float | None:
    """The share of (day, name) rows on which ``pred`` minus the day's median prediction has the sign of
    ``label`` minus the day's median label; rows where either is exactly the median are left out. None when no
    row is left (e.g. one name a day, or constant predictions)."""
    both = _aligned(pred, label)
    relative = both - both.groupby(level="datetime").transform("median")
    signs = np.sign(relative)
    counted = (signs["pred"] != 0) & (signs["label"] != 0)
    return float((signs.loc[counted, "pred"] == signs.loc[counted, "label"]).mean()) if counted.any() else None


def time_series_ic(pred: pd.Series, label: pd.Series, method: str = "pearson") -> float | None:
    """One symbol's correlation of prediction and label over time (``method``: pearson or spearman); None when
    either has no spread."""
    both = _aligned(pred, label)
    if len(both) < 2 or is_degenerate(both["pred"], both["label"]) or both["label"].nunique() <= 1:
        return None
    return float(both["pred"].corr(both["label"], method=method))


def mse(pred: pd.Series, label: pd.Series) -> float:
    """Mean squared error on the rows both have (``label`` in the units the model learnt)."""
    both = _aligned(pred, label)
    return float(((both["pred"] - both["label"]) ** 2).mean())


def mae(pred: pd.Series, label: pd.Series) -> float:
    """Mean absolute error on the rows both have (``label`` in the units the model learnt)."""
    both = _aligned(pred, label)
    return float((both["pred"] - both["label"]).abs().mean())


def time_series_metrics(pred: pd.Series, label: pd.Series, learnt_label: pd.Series) -> dict:
    """One symbol over time: IC and Rank IC against the raw return ``label``, MSE and MAE against
    ``learnt_label`` (the label after the workflow's learn processors: what the model predicts). A degenerate
    (constant) prediction gets ``degenerate: True`` and IC/Rank IC of None, never a silent NaN."""
    both = _aligned(pred, label)
    if both.empty:
        raise ValueError("no day has both a prediction and a label")
    return {
        "days": int(len(both)),
        "mse_learnt": mse(pred, learnt_label),
        "mae_learnt": mae(pred, learnt_label),
        "ic": time_series_ic(pred, label),
        "rank_ic": time_series_ic(pred, label, method="spearman"),
        "degenerate": is_degenerate(both["pred"], both["label"]),
    }


def cross_sectional_metrics(pred: pd.Series, label: pd.Series) -> dict:
    """Across names, day by day: mean daily IC and Rank IC, their information ratios and the hit rate; all None
    and ``degenerate: True`` when the predictions are constant or no day has an IC."""
    both = _aligned(pred, label)
    ic, rank_ic = daily_ic(both["pred"], both["label"]), daily_rank_ic(both["pred"], both["label"])
    if is_degenerate(both["pred"], both["label"]) or ic.empty or rank_ic.empty:
        return {"cs_ic": None, "cs_icir": None, "cs_rank_ic": None, "cs_rank_icir": None, "hit_rate": None,
                "cs_days": 0, "degenerate": True}
    return {
        "cs_ic": float(ic.mean()), "cs_icir": information_ratio(ic),
        "cs_rank_ic": float(rank_ic.mean()), "cs_rank_icir": information_ratio(rank_ic),
        "hit_rate": hit_rate(both["pred"], both["label"]), "cs_days": int(len(rank_ic)), "degenerate": False,
    }
