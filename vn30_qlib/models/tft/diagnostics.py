"""What a fitted TFT says beyond its score: quantile band coverage and crossing, the mean variable-selection weights
and attention by lag, and their plots, as a run's metrics and artifacts."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from vn30_qlib.models.tft.network import TFTWeights
from vn30_qlib.models.tft_inputs import STATIC_FEATURES

ARTIFACT_NAMES = {"static": "static_importance", "past": "past_importance", "future": "future_importance",
                  "attention": "attention_by_lag"}


def weights_summary(weights: list[TFTWeights], n: int, past_names: Sequence[str], future_names: Sequence[str],
                    step_len: int, horizons: int) -> dict[str, pd.Series | pd.DataFrame]:
    """Mean over ``n`` rows (``weights``: one `TFTWeights` per chunk of rows) of the variable-selection weights
    (static, past, future) and of the attention by lag (rows: lag in days before t, negative for the known-future
    days; columns: horizon)."""

    def mean(name: str) -> np.ndarray:
        parts = [getattr(w, name) for w in weights]
        total = sum(p.reshape(p.shape[0], -1, p.shape[-1]).sum(dim=(0, 1)) if name != "attention"
                    else p.sum(dim=0) for p in parts)
        steps = 1 if name in ("static", "attention") else parts[0].shape[1]
        return (total / (n * steps)).cpu().numpy()

    lags = np.arange(step_len - 1, -horizons - 1, -1)  # key day = t - lag
    attention = pd.DataFrame(mean("attention").T, index=pd.Index(lags, name="lag"),
                             columns=[f"h{h}" for h in range(1, horizons + 1)])
    return {
        "static": pd.Series(mean("static"), index=list(STATIC_FEATURES), name="weight"),
        "past": pd.Series(mean("past"), index=list(past_names), name="weight"),
        "future": pd.Series(mean("future"), index=list(future_names), name="weight"),
        "attention": attention,
    }


def quantile_metrics(quantiles: pd.DataFrame, label: pd.DataFrame, levels: Sequence[float], horizons: int) -> dict:
    """Share of realised (learnt) labels inside the outermost band (h1) and share of (row, horizon) forecasts whose
    quantiles are not in increasing order."""
    lowest, highest = f"h1_q{min(levels):g}", f"h1_q{max(levels):g}"
    both = quantiles.join(label.iloc[:, 0].rename("label"), how="inner").dropna()
    inside = (both[lowest] <= both["label"]) & (both["label"] <= both[highest])
    values = quantiles.to_numpy().reshape(len(quantiles), horizons, len(levels))
    crossing = (np.diff(values, axis=-1) < 0).any(axis=-1).mean()
    band = f"{round(min(levels) * 100)}_{round(max(levels) * 100)}"
    return {f"tft_coverage_{band}": float(inside.mean()), "tft_quantile_crossing": float(crossing),
            "tft_coverage_rows": float(len(both))}


def record(recorder, quantiles: pd.DataFrame, label: pd.DataFrame, levels: Sequence[float], horizons: int,
           weights: dict[str, pd.Series | pd.DataFrame]) -> dict:
    """Log the test segment's `quantile_metrics` to ``recorder`` and save the quantiles, the metrics and the
    `weights_summary` tables (pickled frames, CSV and PNG under ``tft/``); return the metrics."""
    metrics = quantile_metrics(quantiles, label, levels, horizons)
    recorder.log_metrics(**metrics)
    recorder.save_objects(artifact_path="tft", **{"quantiles.pkl": quantiles, "metrics.pkl": pd.Series(metrics),
                                                  **{f"{ARTIFACT_NAMES[k]}.pkl": v for k, v in weights.items()}})
    with tempfile.TemporaryDirectory() as tmp:
        for key, values in weights.items():
            path = Path(tmp) / ARTIFACT_NAMES[key]
            values.to_csv(path.with_suffix(".csv"))
            plot_weights(values, key, path.with_suffix(".png"))
            recorder.log_artifact(str(path.with_suffix(".csv")), artifact_path="tft")
            recorder.log_artifact(str(path.with_suffix(".png")), artifact_path="tft")
    return metrics


def plot_weights(values: pd.Series | pd.DataFrame, name: str, path: Path) -> None:
    """A PNG of one `weights_summary` table: bars of the mean selection weights, or attention by day and horizon.
    Drawn on its own `Figure` (no pyplot), so no process-wide matplotlib backend is chosen."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    if name == "attention":
        for column in values.columns:
            ax.plot(-values.index, values[column], marker="o", label=column)
        ax.set_xlabel("day relative to t (t+1 .. t+H are the known-future steps)")
        ax.set_ylabel("mean attention weight")
        ax.legend()
    else:
        ordered = values.sort_values()
        ax.barh(ordered.index, ordered.to_numpy())
        ax.set_xlabel("mean variable-selection weight")
    ax.set_title(f"TFT {name}, test segment")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
