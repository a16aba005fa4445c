"""Prediction metrics per symbol (time series) and per day (cross-section), with degenerate models flagged."""
from __future__ import annotations

import numpy as np
import pandas as pd

# A prediction series whose spread is below this (relative to the label's) carries no ranking information.
DEGENERATE_RELATIVE_STD = 1e-6


def is_degenerate(pred: pd.Series, label: pd.Series) -> bool:
    """True when the predictions are (nearly) constant, so correlations with them are undefined."""
    spread = float(np.nanstd(pred.to_numpy(dtype="float64")))
    scale = float(np.nanstd(label.to_numpy(dtype="float64"))) or 1.0
    return pred.nunique(dropna=True) <= 1 or spread < DEGENERATE_RELATIVE_STD * scale


def _aligned(pred: pd.Series, label: pd.Series) -> pd.DataFrame:
    return pd.concat([pred.rename("pred"), label.rename("label")], axis=1, join="inner").dropna()


def time_series_metrics(pred: pd.Series, label: pd.Series, error_label: pd.Series | None = None) -> dict:
    """One symbol over time: MSE, MAE, IC, Rank IC and the hit rate of the sign of the raw label.

    MSE and MAE compare ``pred`` with ``error_label`` when given (the label in the units the model was trained
    on, e.g. z-scored), else with ``label``. A degenerate (constant) prediction gets ``degenerate: True`` and
    IC/Rank IC of None, never a silent NaN.
    """
    both = _aligned(pred, label)
    if both.empty:
        raise ValueError("no day has both a prediction and a label")
    errors = both if error_label is None else _aligned(pred, error_label)
    error = errors["pred"] - errors["label"]
    degenerate = is_degenerate(both["pred"], both["label"])
    nonzero = both["label"] != 0
    return {
        "days": int(len(both)),
        "mse": float((error**2).mean()),
        "mae": float(error.abs().mean()),
        "ic": None if degenerate else float(both["pred"].corr(both["label"])),
        "rank_ic": None if degenerate else float(both["pred"].corr(both["label"], method="spearman")),
        "hit_rate": float((np.sign(both.loc[nonzero, "pred"]) == np.sign(both.loc[nonzero, "label"])).mean()),
        "degenerate": degenerate,
    }


def cross_sectional_metrics(pred: pd.Series, label: pd.Series) -> dict:
    """Across symbols, day by day: mean daily IC and Rank IC and their information ratios (mean / std)."""
    both = _aligned(pred, label)
    daily = both.groupby(level="datetime")
    ic = daily.apply(lambda day: day["pred"].corr(day["label"])).dropna()
    rank_ic = daily.apply(lambda day: day["pred"].corr(day["label"], method="spearman")).dropna()
    if is_degenerate(both["pred"], both["label"]) or ic.empty or rank_ic.empty:
        return {"cs_ic": None, "cs_icir": None, "cs_rank_ic": None, "cs_rank_icir": None, "cs_days": 0,
                "degenerate": True}
    return {
        "cs_ic": float(ic.mean()), "cs_icir": float(ic.mean() / ic.std()),
        "cs_rank_ic": float(rank_ic.mean()), "cs_rank_icir": float(rank_ic.mean() / rank_ic.std()),
        "cs_days": int(len(ic)), "degenerate": False,
    }


def daily_ic(pred: pd.Series, label: pd.Series) -> pd.Series:
    """The cross-sectional Rank IC of each day (for cumulative-IC plots)."""
    both = _aligned(pred, label)
    return both.groupby(level="datetime").apply(lambda day: day["pred"].corr(day["label"], method="spearman"))
