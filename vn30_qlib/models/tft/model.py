"""Temporal Fusion Transformer (Lim et al. 2021) for VN30 quantile return forecasts, as a Qlib ``Model``.

Inputs per (day t, instrument):
- static: instrument identity and sector (embedding indices, `tft_inputs.static_codes`);
- past, days t-L+1..t: the handler's features (processed on day t's information only), with ``market_context``
  each feature's mean over the day's names (`tft_inputs.day_means`), with ``sector_relative`` each feature
  less its sector's mean (`tft_inputs.relative_to_sector`), and the calendar facts of those days;
- known future, days t+1..t+H: calendar facts only (`tft_inputs.CALENDAR_FEATURES`; anything else is rejected),
  or none (the decoder then sees its positions alone).

Outputs: for each horizon h = 1..H (the return from close t+h to close t+h+1, the handler's LABEL{h-1}) the
``quantiles`` of that label as the handler's learn processors leave it (VN30TFT: the return z-scored across the
day's names), trained with the pinball loss. The score given to Qlib (``predict``) is the median of horizon 1:
the forecast of the handler's LABEL0, the return traded by the backtest.

The package: `sub_modules` (the paper's building blocks, each in its textbook form, with the faster forms behind
them), `network` (the assembled network), `model` (this Qlib ``Model``: fit, predict), `diagnostics` (quantile
coverage, selection and attention weights, plots). Every step is batched: variables go through one grouped linear
map (no loop over variables), only the LSTM steps through time, and attention computes queries for the H decoder
positions only.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from qlib.data import D
from qlib.data.dataset import DatasetH
from qlib.data.dataset.handler import DataHandlerLP
from qlib.log import get_module_logger

from vn30_qlib.models.kwargs_check import checked_kwargs
from vn30_qlib.models.tft import diagnostics
from vn30_qlib.models.tft.network import TemporalFusionNetwork, TFTBatch, TFTWeights
from vn30_qlib.models.tft.sub_modules import quantile_loss
from vn30_qlib.models.tft_inputs import (
    CALENDAR_FEATURES, calendar_features, day_means, extended_calendar, is_day_mean, relative_to_sector, static_codes,
    validate_known_future,
)
from vn30_qlib.models.training import LabelledRows, SequenceModel, daily_ic, require_cross_sections, segment_labels
from vn30_qlib.models.windows import SequenceWindows


class _Panel:
    """Batches for any (day, instrument) row of a handler's panel: windows of past features joined with the
    calendar facts of those days, the calendar facts of the next H days, and static codes."""

    def __init__(self, features: pd.DataFrame, calendar: pd.DataFrame, horizons: int, step_len: int):
        day = calendar.index.get_indexer(features.index.get_level_values("datetime"))
        if (day < 0).any():
            raise ValueError("the handler has days that are not in the provider's calendar")
        past_calendar = calendar.to_numpy()[day]
        panel = pd.DataFrame(np.hstack([features.to_numpy("float32"), past_calendar]), index=features.index,
                             columns=list(features.columns) + list(calendar.columns))
        self.windows = SequenceWindows(panel, step_len)
        self.calendar_index, self.calendar = calendar.index, calendar.to_numpy("float32")
        self.horizons = horizons

    def rows(self, index: pd.MultiIndex) -> "PanelRows":
        day = self.calendar_index.get_indexer(index.get_level_values("datetime"))
        future_days = day[:, None] + np.arange(1, self.horizons + 1)[None, :]
        if (day < 0).any() or future_days.max(initial=0) >= len(self.calendar_index):
            raise ValueError("rows outside the (extended) calendar")
        return PanelRows(index, self.windows.positions(index), future_days,
                         static_codes(index.get_level_values("instrument")))

    def batch(self, rows: "PanelRows", take: np.ndarray | slice, device: torch.device,
              past: np.ndarray | None = None) -> TFTBatch:
        """The inputs of ``rows[take]``; ``past``: the past windows of all ``rows`` to use instead of the panel's."""
        windows = self.windows.gather(rows.positions[take]) if past is None else past[take]
        return TFTBatch(
            torch.from_numpy(rows.static[take]).to(device),
            torch.from_numpy(windows).to(device),
            torch.from_numpy(self.calendar[rows.future_days[take]]).to(device),
        )


class PanelRows(NamedTuple):
    """Where the inputs of each row of ``index`` lie in a `_Panel`: window positions, future days, static codes."""

    index: pd.MultiIndex
    positions: np.ndarray
    future_days: np.ndarray
    static: np.ndarray


@checked_kwargs
class TFT(SequenceModel):
    """Temporal Fusion Transformer quantile forecasts of the next ``horizons`` daily returns (see module doc).

    ``predict`` returns the median forecast of horizon 1 (the handler's LABEL0), the score Qlib's records and
    backtest use; ``predict_quantiles`` returns every quantile of every horizon. ``known_future``: the calendar
    facts fed for days t+1..t+H and as past inputs (validated: only `CALENDAR_FEATURES`; ``[]``: none, and the
    decoder is fed its positions alone, `DecoderPositions`). The label is the handler's learnt one
    (DK_L; a raw return if its learn processors only drop NaN), scaled for training by its train-segment sd per
    horizon; calendar inputs are standardised with train-segment statistics.
    ``metric``, ``average_best`` and ``loop_options`` (``early_stop``, ``grad_clip``, ``seed``, ``device``,
    ``checkpoint_dir``, ``resume``, ``n_threads``, ``cpu_kernels``, ``ema_decay``, ``lr_schedule``,
    ``weight_decay``: see `SequenceModel`) go to the shared loop
    (`vn30_qlib.models.training`); ``average_best``: the fitted weights are the mean of those of the
    ``average_best`` best epochs by the valid metric; on the real split, 5 gave a higher and steadier test Rank IC
    over seeds than the single best epoch (BENCHMARKS.md). The TFT runs many small kernels, so on a CPU shared with
    other jobs 1 thread can be several times faster than 2 (``n_threads: auto`` then takes a share of the cores).
    ``chunk_rows``: on a CPU, each batch's forward and backward run this many rows at a time, the same gradient
    from activations that stay in cache (256: a step 1.2x faster than whole batches of 1,024).
    ``importance_repeats``: shuffles per past input for the permutation importance computed at the end of fit on
    the valid segment (`get_feature_importance`, and `record_diagnostics`'s ``tft/past_importance``); each costs a
    forward pass over the valid segment per input (0: none).
    ``ic_loss_weight``: above 0, the training loss is the pinball loss minus this weight times the mean daily IC
    (`daily_ic`, within each batch's days) of the horizon-1 median: a ranking term for the score Qlib uses, beside
    the quantiles; batches are then whole days, run unchunked (0: the pinball loss alone).
    ``market_context``: also feed each feature's mean over the day's names as a past input (`day_means`),
    the market's state beside the name's own. ``sector_relative``: also feed each feature less its mean over the
    day's names of the same sector (`relative_to_sector`).
    """

    checkpoint_name = "tft.pt"

    def __init__(
        self,
        hidden_size: int = 64,
        variable_hidden_size: int = 8,
        attention_hidden_size: int = 32,
        num_heads: int = 4,
        dropout: float = 0.1,
        lr: float = 0.001,
        batch_size: int = 1024,
        n_epochs: int = 50,
        quantiles: Sequence[float] = (0.1, 0.5, 0.9),
        horizons: int = 1,
        step_len: int = 20,
        known_future: Sequence[str] = CALENDAR_FEATURES,
        metric: str = "ic",
        average_best: int = 5,
        chunk_rows: int | None = 256,
        importance_repeats: int = 1,
        ic_loss_weight: float = 0.0,
        market_context: bool = False,
        sector_relative: bool = False,
        **loop_options,
    ):
        quantiles = [float(q) for q in quantiles]
        if 0.5 not in quantiles or sorted(quantiles) != quantiles or not all(0 < q < 1 for q in quantiles):
            raise ValueError(f"quantiles must be increasing, inside (0, 1) and include 0.5, got {quantiles}")
        if horizons < 1:
            raise ValueError(f"horizons must be >= 1, got {horizons}")
        if isinstance(importance_repeats, bool) or not isinstance(importance_repeats, int) or importance_repeats < 0:
            raise ValueError(f"importance_repeats must be an integer >= 0, got {importance_repeats!r}")
        if isinstance(ic_loss_weight, bool) or not isinstance(ic_loss_weight, (int, float)) or ic_loss_weight < 0:
            raise ValueError(f"ic_loss_weight must be a number >= 0, got {ic_loss_weight!r}")
        super().__init__(lr=lr, batch_size=batch_size, n_epochs=n_epochs, metric=metric, chunk_rows=chunk_rows,
                         **loop_options)
        self.hidden_size, self.variable_hidden_size = hidden_size, variable_hidden_size
        self.attention_hidden_size, self.num_heads, self.dropout = attention_hidden_size, num_heads, dropout
        self.quantiles, self.average_best, self.importance_repeats = quantiles, average_best, importance_repeats
        self.ic_loss_weight, self.market_context = float(ic_loss_weight), bool(market_context)
        self.sector_relative = bool(sector_relative)
        self.horizons, self.step_len, self.known_future = horizons, step_len, validate_known_future(known_future)
        self.past_names: list[str] = []
        self.calendar_mean: pd.Series | None = None
        self.calendar_std: pd.Series | None = None
        self.label_scale: np.ndarray | None = None
        self.importance: dict[str, pd.Series] = {}

    # ------------------------------------------------------------------ fit / predict
    def fit(self, dataset: DatasetH, **kwargs) -> None:
        with self._fit_session() as session:
            device = session.device
            train_label = self._labels(dataset, "train")
            train_days = train_label.index.get_level_values("datetime")
            calendar = self._raw_calendar()
            in_train = calendar.loc[train_days.min():train_days.max()]
            self.calendar_mean, self.calendar_std = in_train.mean(), in_train.std().replace(0.0, 1.0)
            self.label_scale = train_label.std().to_numpy("float32")
            panel = self._panel(dataset)
            self.past_names = list(panel.windows.columns)
            train = LabelledRows(train_label / self.label_scale, device, "train")
            valid = LabelledRows(self._labels(dataset, "valid") / self.label_scale, device, "valid")
            train_inputs, valid_inputs = panel.rows(train.index), panel.rows(valid.index)
            self.module = self._build_module().to(device)
            quantiles = torch.tensor(self.quantiles, device=device)
            median = self.quantiles.index(0.5)
            by_day = self.ic_loss_weight > 0
            if by_day:
                require_cross_sections(train.days, "ic_loss_weight > 0")

            def loss(output: torch.Tensor, label: torch.Tensor, days: torch.Tensor) -> torch.Tensor:
                pinball = quantile_loss(output, label, quantiles)
                if not by_day:
                    return pinball
                return pinball - self.ic_loss_weight * daily_ic(output[:, 0, median], label[:, 0], days)

            self._train(train, valid, lambda rows: panel.batch(train_inputs, rows, device),
                        lambda: self._forward(panel, valid_inputs, device)[0], loss, by_day=by_day,
                        point=lambda output: output[:, 0, median], point_label=lambda label: label[:, 0],
                        average_best=self.average_best, chunk_rows=None if by_day else self.chunk_rows,
                        shared_inputs=self.module.encode_static)
            self.importance = self._weights_summary(self._forward(panel, valid_inputs, device)[1], len(valid))
            if self.importance_repeats:
                self.importance["permutation"] = self._permutation_importance(panel, valid_inputs, device, dataset,
                                                                              "valid", self.importance_repeats)

    def predict(self, dataset: DatasetH, segment: str | slice = "test") -> pd.Series:
        """The median forecast of horizon 1 (the return from close t+1 to close t+2), in the learnt label's units."""
        quantiles = self.predict_quantiles(dataset, segment)
        return quantiles[f"h1_q{0.5:g}"].rename("score")

    def predict_quantiles(self, dataset: DatasetH, segment: str | slice = "test") -> pd.DataFrame:
        """Every quantile of every horizon, columns ``h{h}_q{q}``, in the learnt label's units."""
        panel, rows, device = self._rows_to_predict(dataset, segment)
        with self._predict_session():
            return self._quantile_frame(self._forward(panel, rows, device)[0], rows.index)

    def _quantile_frame(self, output: torch.Tensor, index: pd.MultiIndex) -> pd.DataFrame:
        values = output.cpu().numpy() * self.label_scale[None, :, None]
        columns = [f"h{h}_q{q:g}" for h in range(1, self.horizons + 1) for q in self.quantiles]
        return pd.DataFrame(values.reshape(len(index), -1).astype("float64"), index=index, columns=columns)

    def get_feature_importance(self, importance_type: str = "permutation") -> pd.Series:
        """Each past input's permutation importance on the valid segment (`permutation_importance`, computed at
        the end of fit unless ``importance_repeats`` is 0): the drop of the mean daily Rank IC when the input is
        shuffled, largest first.

        ``importance_type`` is accepted for the shared FeatureImportanceRecord and ignored: the selection weights
        are not an importance (see `permutation_importance`) and are logged by `record_diagnostics` instead.
        """
        if "permutation" not in self.importance:
            raise ValueError("no permutation importance: the model is not fitted yet, or was with importance_repeats=0")
        return self.importance["permutation"]["rank_ic_drop"].sort_values(ascending=False)

    def permutation_importance(self, dataset: DatasetH, segment: str | slice = "valid",
                               repeats: int | None = None) -> pd.DataFrame:
        """How much each past input adds to the ranking skill of the forecasts on ``segment``: the drop of the
        mean daily Rank IC of the median forecast (h1, against the learnt label) when that input's windows are
        shuffled, averaged over ``repeats`` shuffles (default ``importance_repeats``, at least 1); columns
        ``rank_ic_drop``, ``se`` (its standard error over days) and ``t``.

        A per-name input is shuffled among the names of each day; a calendar input, the same for every name of a
        day, among days (all rows of a day take another day's window). With one name a day (a per-symbol fit)
        every input is shuffled among days and the Rank IC is taken over time (no ``se``). The mean selection
        weights of `record_diagnostics` are not this: an input can take selection weight without changing any
        ranking (on the simulated market, whose signal is in the bar's shape, the calendar inputs did).
        """
        panel, rows, device = self._rows_to_predict(dataset, segment)
        with self._predict_session():
            return self._permutation_importance(panel, rows, device, dataset, segment,
                                                repeats or max(self.importance_repeats, 1))

    def record_diagnostics(self, dataset: DatasetH, recorder) -> dict:
        """Test-segment quantiles, 10-90 % coverage and crossing rate, variable-selection and attention weights,
        and the past inputs' permutation importance of the fit (valid segment; none with ``importance_repeats``
        0), logged to ``recorder`` (`diagnostics.record`); returns the metrics. (The test segment's permutation
        importance costs a forward pass per input: `permutation_importance(dataset, "test")`.)"""
        panel, rows, device = self._rows_to_predict(dataset, "test")
        with self._predict_session():
            output, weights = self._forward(panel, rows, device)
        tables = self._weights_summary(weights, len(rows.index))
        if "permutation" in self.importance:
            tables["permutation"] = self.importance["permutation"]
        label = dataset.prepare("test", col_set="label", data_key=DataHandlerLP.DK_L)
        metrics = diagnostics.record(recorder, self._quantile_frame(output, rows.index), label, self.quantiles,
                                     self.horizons, tables)
        get_module_logger("TFT").info(f"test diagnostics: {metrics}")
        return metrics

    # ------------------------------------------------------------------ helpers
    def _permutation_importance(self, panel: _Panel, rows: PanelRows, device: torch.device, dataset: DatasetH,
                                segment: str | slice, repeats: int) -> pd.DataFrame:
        label = dataset.prepare(segment, col_set="label", data_key=DataHandlerLP.DK_L).iloc[:, 0]
        past = panel.windows.gather(rows.positions)
        per_day = [name in self.known_future or is_day_mean(name) for name in self.past_names]
        return diagnostics.permutation_importance(
            lambda windows: self._forward(panel, rows, device, windows)[0][:, 0, self.quantiles.index(0.5)],
            past, rows.index, label, self.past_names, per_day, repeats, seed=self.seed or 0)

    def _build_module(self) -> TemporalFusionNetwork:
        return TemporalFusionNetwork(
            len(self.past_names), len(self.known_future), self.horizons, len(self.quantiles), self.hidden_size,
            self.variable_hidden_size, self.attention_hidden_size, self.num_heads, self.dropout,
        )

    def _raw_calendar(self) -> pd.DataFrame:
        return calendar_features(extended_calendar(D.calendar(freq="day")), self.known_future)

    def _panel(self, dataset: DatasetH) -> _Panel:
        calendar = (self._raw_calendar() - self.calendar_mean) / self.calendar_std
        features = dataset.handler.fetch(col_set="feature", data_key=DataHandlerLP.DK_I)
        added = ([day_means(features)] if self.market_context else []) + \
            ([relative_to_sector(features)] if self.sector_relative else [])
        if added:
            features = pd.concat([features, *added], axis=1)
        return _Panel(features, calendar.astype("float32"), self.horizons, self.step_len)

    def _labels(self, dataset: DatasetH, segment: str) -> pd.DataFrame:
        label = segment_labels(dataset, segment)
        if label.shape[1] != self.horizons:
            raise ValueError(f"horizons={self.horizons} but the handler gives {label.shape[1]} label columns")
        return label

    def _rows_to_predict(self, dataset: DatasetH, segment: str | slice):
        if self.module is None:
            raise ValueError("the model is not fitted yet")
        panel = self._panel(dataset)
        if list(panel.windows.columns) != self.past_names:
            raise ValueError("the handler's features differ from those the model was fitted on")
        index = dataset.prepare(segment, col_set="feature", data_key=DataHandlerLP.DK_I).index
        return panel, panel.rows(index), next(self.module.parameters()).device

    def _forward(self, panel: _Panel, rows: PanelRows, device: torch.device,
                 past: np.ndarray | None = None) -> tuple[torch.Tensor, list[TFTWeights]]:
        """Forecasts (rows, H, Q) in label-sd units for all ``rows``, a training batch at a time; weights per
        chunk; ``past``: other past windows for the rows (`_Panel.batch`). (In 8,192-row chunks each (rows, steps,
        variables, width) activation is ~200 MB: the pooled VN30 fit then peaked at 2.1 GiB instead of 1.5.)"""
        chunk = self.batch_size
        self.module.eval()
        outputs, weights = [], []
        with torch.no_grad():
            for start in range(0, len(rows.index), chunk):
                output, weight = self.module.interpret(panel.batch(rows, slice(start, start + chunk), device, past))
                outputs.append(output)
                weights.append(weight)
        return torch.cat(outputs), weights

    def _weights_summary(self, weights: list[TFTWeights], n: int) -> dict[str, pd.Series | pd.DataFrame]:
        return diagnostics.weights_summary(weights, n, self.past_names, self.known_future, self.step_len,
                                           self.horizons)
