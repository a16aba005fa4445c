"""Recorder records shared by the VN30 workflows (added to a YAML's ``task.record`` list)."""
from __future__ import annotations

from pathlib import Path
from tempfile import TemporaryDirectory

import pandas as pd
from matplotlib.figure import Figure
from qlib.config import C
from qlib.contrib.eva.alpha import calc_long_short_return
from qlib.data.dataset.handler import DataHandlerLP
from qlib.log import get_module_logger
from qlib.workflow.record_temp import PortAnaRecord, RecordTemp, SigAnaRecord, SignalRecord

from vn30_qlib.data.ingest import INDEX_SYMBOL
from vn30_qlib.data.provider import read_instruments
from vn30_qlib.metrics import daily_ic, daily_rank_ic, hit_rate, information_ratio, is_degenerate, mae, mse

# More than this share of test days with constant predictions: the run is reported as having learnt nothing.
DEGENERATE_DAY_SHARE = 0.5


def constant_day_share(pred: pd.Series, label: pd.Series) -> float:
    """The share of test days whose predictions are the same for every name (one name a day counts as constant),
    judged by `vn30_qlib.metrics.is_degenerate` on the day's names; 1.0 when no day has a prediction."""
    both = pd.concat([pred.rename("pred"), label.rename("label")], axis=1, join="inner").dropna(subset=["pred"])
    if both.empty:
        return 1.0
    constant = both.groupby(level="datetime").apply(lambda day: is_degenerate(day["pred"], day["label"]))
    return float(constant.mean())


class VN30SigAnaRecord(SigAnaRecord):
    """Qlib's `SigAnaRecord` (metrics IC, ICIR, Rank IC, Rank ICIR; artifacts ic.pkl, ric.pkl) computed by
    `vn30_qlib.metrics`, plus ``hit_rate`` (market-free: see `vn30_qlib.metrics.hit_rate`) and ``degenerate``:
    the share of test days on which the predictions are constant across names, with a warning when that is
    most days.

    On such days the daily IC is undefined, so the IC comes from the few other days (or is missing) and the
    backtest buys whatever sorts first; an over-regularised model or a provider with a handful of instruments
    does this without any error.
    """

    def _generate(self, label: pd.DataFrame | None = None, **kwargs):
        truth = self.load("label.pkl") if label is None else label
        if not isinstance(truth, pd.DataFrame) or truth.empty:  # Qlib's record warns "Empty label."
            return super()._generate(label=label, **kwargs)
        pred, raw = self.load("pred.pkl").iloc[:, 0], truth.iloc[:, self.label_col]
        share = constant_day_share(pred, raw)
        ic, rank_ic = daily_ic(pred, raw), daily_rank_ic(pred, raw)
        metrics = {"IC": ic.mean(), "ICIR": information_ratio(ic), "Rank IC": rank_ic.mean(),
                   "Rank ICIR": information_ratio(rank_ic), "hit_rate": hit_rate(pred, raw), "degenerate": share}
        objects = {"ic.pkl": ic, "ric.pkl": rank_ic}
        if self.ana_long_short:
            long_short, long_average = calc_long_short_return(pred, raw)
            metrics |= {"Long-Short Ann Return": long_short.mean() * self.ann_scaler,
                        "Long-Short Ann Sharpe": long_short.mean() / long_short.std() * self.ann_scaler**0.5,
                        "Long-Avg Ann Return": long_average.mean() * self.ann_scaler,
                        "Long-Avg Ann Sharpe": long_average.mean() / long_average.std() * self.ann_scaler**0.5}
            objects |= {"long_short_r.pkl": long_short, "long_avg_r.pkl": long_average}
        self.recorder.log_metrics(**{name: float(value) for name, value in metrics.items()
                                     if value is not None and pd.notna(value)})
        if share > DEGENERATE_DAY_SHARE:
            names = int(pred.groupby(level="datetime").size().max())
            get_module_logger("VN30SigAnaRecord").warning(
                f"predictions are constant on {share:.0%} of test days: the model learnt nothing (check its "
                f"regularisation and the number of instruments: at most {names} a day); IC and Rank IC mean nothing")
        return objects


class PredictionErrorRecord(RecordTemp):
    """Logs ``test_mse_learnt`` and ``test_mae_learnt``: the errors of the test predictions against the label the
    model learnt (the dataset's test label after the learn processors, e.g. the day's z-scored return).

    Against the raw return instead, a model that predicts a z-score would be out-scored by a constant; in the
    learnt units the errors compare models of one workflow (same label processing), not across label choices.
    """

    artifact_path = "prediction_error"
    depend_cls = SignalRecord

    def __init__(self, recorder, dataset):
        super().__init__(recorder=recorder)
        self.dataset = dataset

    def generate(self, **kwargs) -> dict:
        pred = self.load("pred.pkl").iloc[:, 0]
        learnt = self.dataset.prepare("test", col_set="label", data_key=DataHandlerLP.DK_L).iloc[:, 0]
        rows = len(pd.concat([pred, learnt], axis=1, join="inner").dropna())
        if not rows:
            raise ValueError("no test day has both a prediction and a learnt label: cannot compute MSE/MAE")
        metrics = {"test_mse_learnt": mse(pred, learnt), "test_mae_learnt": mae(pred, learnt),
                   "test_rows": float(rows)}
        self.recorder.log_metrics(**metrics)
        self.save(**{"metrics.pkl": pd.Series(metrics)})
        return metrics

    def list(self) -> list[str]:
        return [self.get_path("metrics.pkl")]


class FeatureImportanceRecord(RecordTemp):
    """Saves the model's feature importance (LightGBM: total gain; the TFT: the permutation importance) as a table
    and a bar plot of the top features.

    It sits in the shared record list, so for a model without ``get_feature_importance`` it logs that there is
    none and saves nothing.
    """

    artifact_path = "feature_importance"

    def __init__(self, recorder, model, dataset, importance_type: str = "gain", top: int = 30):
        super().__init__(recorder=recorder)
        self.model, self.dataset, self.importance_type, self.top = model, dataset, importance_type, top

    def generate(self, **kwargs) -> pd.Series | None:
        if not hasattr(self.model, "get_feature_importance"):
            get_module_logger("FeatureImportanceRecord").info(f"{type(self.model).__name__} reports no importance")
            return None
        try:
            importance = self.model.get_feature_importance(importance_type=self.importance_type)
        except ValueError as error:  # e.g. a TFT fitted with importance_repeats=0
            get_module_logger("FeatureImportanceRecord").info(f"{type(self.model).__name__}: {error}")
            return None
        # a model may name its own kind (the TFT: rank_ic_drop, a permutation importance)
        kind = importance.name or f"importance_{self.importance_type}"
        # Qlib's LGBModel trains on bare arrays, so LightGBM names the features Column_0, Column_1, ...
        names = self.dataset.handler.get_cols(col_set="feature")
        importance.index = [names[int(c.split("_")[1])] if str(c).startswith("Column_") else c for c in importance.index]
        importance = importance.sort_values(ascending=False).rename(kind)
        self.save(**{"importance.pkl": importance})
        with TemporaryDirectory() as tmp:
            csv_path = Path(tmp) / "importance.csv"
            importance.to_csv(csv_path, header=True, index_label="feature")
            png_path = Path(tmp) / "importance.png"
            top = importance.head(self.top)[::-1]
            fig = Figure(figsize=(7, 0.22 * len(top) + 1.2))  # no pyplot: no process-wide backend chosen
            ax = fig.subplots()
            ax.barh(top.index, top.to_numpy())
            ax.set_xlabel(kind)
            ax.set_title(f"Top {len(top)} features")
            fig.tight_layout()
            fig.savefig(png_path, dpi=110)
            self.recorder.log_artifact(str(csv_path), artifact_path=self.artifact_path)
            self.recorder.log_artifact(str(png_path), artifact_path=self.artifact_path)
        return importance

    def list(self) -> list[str]:
        return [self.get_path("importance.pkl"), self.get_path("importance.csv"), self.get_path("importance.png")]


class ModelDiagnosticsRecord(RecordTemp):
    """Lets a model save its own diagnostics: calls ``model.record_diagnostics(dataset, recorder)`` if defined.

    It sits in the shared record list so that model-specific outputs (e.g. the TFT's quantiles, attention and
    variable-selection weights) need no copy of the whole record list in the model's YAML.
    """

    def __init__(self, recorder, model, dataset):
        super().__init__(recorder=recorder)
        self.model, self.dataset = model, dataset

    def generate(self, **kwargs) -> None:
        if hasattr(self.model, "record_diagnostics"):
            self.model.record_diagnostics(self.dataset, self.recorder)
        else:
            get_module_logger("ModelDiagnosticsRecord").info(f"{type(self.model).__name__} has no diagnostics")


def resolve_benchmark(provider_dir: str | Path, market: str = "vn30") -> str | list[str]:
    """The VN30 index when the provider has it, else the market's symbols (Qlib averages their daily returns)."""
    root = Path(provider_dir).expanduser()
    if (root / "features" / INDEX_SYMBOL.lower() / "close.day.bin").is_file():
        return INDEX_SYMBOL
    return read_instruments(root, market)["symbol"].tolist()


class VN30PortAnaRecord(PortAnaRecord):
    """`PortAnaRecord` whose ``benchmark: auto`` becomes the VN30 index, or an equal-weight VN30 without one."""

    def __init__(self, recorder, config: dict, market: str = "vn30", **kwargs):
        backtest = dict(config["backtest"])
        if backtest.get("benchmark") == "auto":
            backtest["benchmark"] = resolve_benchmark(C.dpm.get_data_uri("day"), market)
        super().__init__(recorder=recorder, config={**config, "backtest": backtest}, **kwargs)
