"""What a fitted TFT says beyond its score: quantile band coverage and crossing, each past input's permutation
importance, the mean variable-selection weights and attention by lag, and their plots, as a run's metrics and
artifacts."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from vn30_qlib.metrics import daily_rank_ic, standard_error
from vn30_qlib.models.tft.network import TFTWeights
from vn30_qlib.models.tft_inputs import STATIC_FEATURES

ARTIFACT_NAMES = {"static": "static_selection", "past": "past_selection", "future": "future_selection",
                  "attention": "attention_by_lag", "permutation": "past_importance"}


def weights_summary(weights: list[TFTWeights], n: int, past_names: Sequence[str], future_names: Sequence[str],
                    step_len: int, horizons: int) -> dict[str, pd.Series | pd.DataFrame]:
    """Mean over ``n`` rows (``weights``: one `TFTWeights` per chunk of rows) of the variable-selection weights
    (static, past, future) and of the attention by lag (rows: lag in days before t, negative for the known-future
    days; columns: horizon). With no known-future inputs there is no ``future`` table."""

    def mean(name: str) -> np.ndarray:
        parts = [getattr(w, name) for w in weights]
        total = sum(p.reshape(p.shape[0], -1, p.shape[-1]).sum(dim=(0, 1)) if name != "attention"
                    else p.sum(dim=0) for p in parts)
        steps = 1 if name in ("static", "attention") else parts[0].shape[1]
        return (total / (n * steps)).cpu().numpy()

    lags = np.arange(step_len - 1, -horizons - 1, -1)  # key day = t - lag
    attention = pd.DataFrame(mean("attention").T, index=pd.Index(lags, name="lag"),
                             columns=[f"h{h}" for h in range(1, horizons + 1)])
    tables = {
        "static": pd.Series(mean("static"), index=list(STATIC_FEATURES), name="weight"),
        "past": pd.Series(mean("past"), index=list(past_names), name="weight"),
    }
    if future_names:
        tables["future"] = pd.Series(mean("future"), index=list(future_names), name="weight")
    tables["attention"] = attention
    return tables


def permutation_importance(forecast: Callable[[np.ndarray], torch.Tensor], past: np.ndarray, index: pd.MultiIndex,
                           label: pd.Series, names: Sequence[str], per_day: Sequence[bool], repeats: int,
                           seed: int = 0) -> pd.DataFrame:
    """Drop of the mean daily Rank IC of ``forecast(past)`` (one score per row of ``index``) against ``label`` when
    the windows of one input (``past[:, :, j]``) are shuffled, for each input ``names[j]``: mean over ``repeats``
    shuffles, with the standard error over days of the daily drop and its t. An input with
    ``per_day[j]`` (a fact of the day, the same for every name) is shuffled among days, any other among the names
    of each day. With one name a day, every input is shuffled among days and the Rank IC is taken over time."""
    rng = np.random.default_rng(seed)
    day_codes = pd.factorize(index.get_level_values("datetime"))[0]
    cross_sections = len(index) > day_codes.max(initial=-1) + 1

    def skill(windows: np.ndarray) -> pd.Series:
        score = pd.Series(forecast(windows).cpu().numpy().astype("float64"), index=index)
        if cross_sections:
            return daily_rank_ic(score, label)
        both = pd.concat([score, label], axis=1, join="inner").dropna()
        return pd.Series([both.iloc[:, 0].corr(both.iloc[:, 1], method="spearman")])

    base = skill(past)
    by_day = np.lexsort((np.arange(len(index)), day_codes))  # rows grouped by day, in their order
    first_row_of_day = np.unique(day_codes, return_index=True)[1]
    rows = []
    for j, name in enumerate(names):
        drops = []
        for _ in range(repeats):
            if per_day[j] or not cross_sections:
                source = first_row_of_day[rng.permutation(len(first_row_of_day))][day_codes]
            else:  # the same grouping with the rows of each day in a random order
                source = np.empty(len(index), dtype=np.int64)
                source[by_day] = np.lexsort((rng.random(len(index)), day_codes))
            shuffled = past.copy()
            shuffled[:, :, j] = past[source, :, j]
            drops.append(base - skill(shuffled))
        drop = (sum(drops) / len(drops)).dropna()
        se = standard_error(drop) or float("nan")
        rows.append((name, float(drop.mean()), se, float(drop.mean()) / se))
    return pd.DataFrame.from_records(rows, columns=["input", "rank_ic_drop", "se", "t"]).set_index("input")


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
    ``weights`` tables (`weights_summary`, and ``permutation``: a `permutation_importance`) as pickled frames,
    CSV and PNG under ``tft/``; return the metrics."""
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
    if name == "permutation":
        ordered = values.sort_values("rank_ic_drop")
        ax.barh(ordered.index, ordered["rank_ic_drop"].to_numpy(), xerr=ordered["se"].fillna(0.0).to_numpy())
        ax.set_xlabel("drop of the mean daily Rank IC when shuffled (bars: +- 1 standard error)")
    elif name == "attention":
        for column in values.columns:
            ax.plot(-values.index, values[column], marker="o", label=column)
        ax.set_xlabel("day relative to t (t+1 .. t+H are the known-future steps)")
        ax.set_ylabel("mean attention weight")
        ax.legend()
    else:
        ordered = values.sort_values()
        ax.barh(ordered.index, ordered.to_numpy())
        ax.set_xlabel("mean variable-selection weight (how inputs are mixed, not their importance)")
    ax.set_title(f"TFT {name}, {'valid' if name == 'permutation' else 'test'} segment")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
