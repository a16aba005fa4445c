"""Temporal Fusion Transformer (Lim et al. 2021) for VN30 quantile return forecasts, as a Qlib ``Model``.

Inputs per (day t, instrument):
- static: instrument identity and sector (embedding indices, `tft_inputs.static_codes`);
- past, days t-L+1..t: the handler's features (processed on day t's information only) and the calendar facts
  of those days;
- known future, days t+1..t+H: calendar facts only (`tft_inputs.CALENDAR_FEATURES`; anything else is rejected).

Outputs: for each horizon h = 1..H (the return from close t+h to close t+h+1, the handler's LABEL{h-1}) the
``quantiles`` of that label as the handler's learn processors leave it (VN30TFT: the return z-scored across the
day's names), trained with the pinball loss. The score given to Qlib (``predict``) is the median of horizon 1:
the forecast of the handler's LABEL0, the return traded by the backtest.

Every step is batched: variables go through one grouped linear map (no loop over variables), only nn.LSTM
steps through time, and attention computes queries for the H decoder positions only. One deviation from the
paper, for CPU speed: each variable is processed at ``variable_hidden_size`` and the selected mix projected to
``hidden_size`` (see `VariableSelectionNetwork`), like pytorch-forecasting's ``hidden_continuous_size``.
On a CPU the numeric variable selections' embedding, per-variable GRNs and weighted mix run as one fused C++
kernel (`vn30_qlib.models.variable_mix`), and the numeric embedding, the gates (GLU with its map's bias and the
residual), ELU, dropout and the LSTM layers as C++ kernels too (`vn30_qlib.models.cpu_kernels`); the modules here
define what they compute.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import NamedTuple, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from qlib.data import D  # noqa: E402
from qlib.data.dataset import DatasetH  # noqa: E402
from qlib.data.dataset.handler import DataHandlerLP  # noqa: E402
from qlib.log import get_module_logger  # noqa: E402
from qlib.model.base import Model  # noqa: E402
from torch import nn  # noqa: E402

from vn30_qlib.models.tft_inputs import (  # noqa: E402
    CALENDAR_FEATURES, STATIC_CARDINALITIES, STATIC_FEATURES, calendar_features, extended_calendar, static_codes,
    validate_known_future,
)
from vn30_qlib.cpu import cpu_threads  # noqa: E402
from vn30_qlib.models.dropout import Dropout  # noqa: E402
from vn30_qlib.models.elu import elu  # noqa: E402
from vn30_qlib.models.glu import glu  # noqa: E402
from vn30_qlib.models.kwargs_check import checked_kwargs  # noqa: E402
from vn30_qlib.models.lstm_layer import lstm_layer  # noqa: E402
from vn30_qlib.models.numeric_embedding import numeric_embedding  # noqa: E402
from vn30_qlib.models.variable_mix import variable_mix  # noqa: E402
from vn30_qlib.models.training import (  # noqa: E402
    CpuPickledModel, LoopConfig, adam, fit_epochs, pick_device, set_seed)
from vn30_qlib.models.windows import SequenceWindows  # noqa: E402


# ----------------------------------------------------------------------------------------------- building blocks
class GroupedLinear(nn.Module):
    """One independent linear map per variable, applied to (..., n_groups, in) with one einsum, not a loop."""

    def __init__(self, n_groups: int, in_features: int, out_features: int):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(n_groups, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n_groups, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...gi,gio->...go", x, self.weight) + self.bias


def _linear(in_features: int, out_features: int, n_groups: int | None) -> nn.Module:
    if n_groups is None:
        return nn.Linear(in_features, out_features)
    return GroupedLinear(n_groups, in_features, out_features)


class GatedLinearUnit(nn.Module):
    """GLU(x) = (W1 x + b1) * sigmoid(W2 x + b2): a gate that can shut a block off where it does not help."""

    def __init__(self, input_size: int, output_size: int, dropout: float = 0.0, n_groups: int | None = None):
        super().__init__()
        self.dropout = Dropout(dropout)
        self.linear = _linear(input_size, 2 * output_size, n_groups)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """GLU(x), plus ``residual`` when given (the skip connection every TFT gate feeds: the map's bias, the gate
        and that sum run as one CPU kernel, `glu`)."""
        x = self.dropout(x)
        if isinstance(self.linear, nn.Linear):
            return glu(F.linear(x, self.linear.weight), self.linear.bias, residual)
        return glu(self.linear(x), None, residual)


class GateAddNorm(nn.Module):
    """LayerNorm(residual + GLU(x)): the gated skip connection around a whole block of the TFT."""

    def __init__(self, input_size: int, output_size: int, dropout: float = 0.0):
        super().__init__()
        self.gate = GatedLinearUnit(input_size, output_size, dropout)
        self.norm = nn.LayerNorm(output_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.norm(self.gate(x, residual))


class GatedResidualNetwork(nn.Module):
    """GRN(a, c) = LayerNorm(skip(a) + GLU(W1 ELU(W2 a + W3 c))): a nonlinearity the gate can bypass.

    ``context``: an optional static vector added inside the nonlinearity. ``n_groups``: one independent GRN
    per variable over inputs shaped (..., n_groups, input_size).
    """

    def __init__(self, input_size: int, hidden_size: int, output_size: int, context_size: int | None = None,
                 dropout: float = 0.0, n_groups: int | None = None):
        super().__init__()
        self.skip = nn.Identity() if input_size == output_size else _linear(input_size, output_size, n_groups)
        self.fc_input = _linear(input_size, hidden_size, n_groups)
        self.fc_context = None if context_size is None else nn.Linear(context_size, hidden_size, bias=False)
        self.fc_hidden = _linear(hidden_size, hidden_size, n_groups)
        self.gate = GatedLinearUnit(hidden_size, output_size, dropout, n_groups)
        self.norm = nn.LayerNorm(output_size)

    def forward(self, a: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(self.skip, nn.Linear):
            # both linear maps of a as one matmul: its backward is then one matmul, not two and a sum (a variable
            # selection's weights GRN over (rows, 20 days, 28 x 8 inputs): 2-3 ms less a 256-row chunk on CPU)
            both = F.linear(a, torch.cat([self.fc_input.weight, self.skip.weight]),
                            torch.cat([self.fc_input.bias, self.skip.bias]))
            hidden, skip = both.split([self.fc_input.out_features, self.skip.out_features], dim=-1)
        else:
            hidden, skip = self.fc_input(a), self.skip(a)
        if context is not None:
            hidden = hidden + self.fc_context(context)
        hidden = self.fc_hidden(elu(hidden))
        return self.norm(self.gate(hidden, skip))


class NumericEmbedding(nn.Module):
    """Each real-valued variable j becomes x_j * w_j + b_j in R^size: (..., n_vars) -> (..., n_vars, size)."""

    def __init__(self, n_vars: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_vars, size))
        self.bias = nn.Parameter(torch.zeros(n_vars, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"NumericEmbedding takes (..., {self.weight.shape[0]}) values, got {tuple(x.shape)}")
        return numeric_embedding(x, self.weight, self.bias)


class VariableSelectionNetwork(nn.Module):
    """Softmax weights over the variables (per sample and step, given a context) mixing their GRN-processed
    embeddings: the weights say which inputs the model uses, and are its feature importance.

    Each variable is processed at ``variable_size`` (not ``hidden_size``) and the weighted mix is projected to
    ``hidden_size``: that equals per-variable GRNs ending in one shared linear map, and keeps the
    (batch, steps, variables, width) tensors, the bulk of the TFT's memory traffic, 8x smaller at 8 than at 64
    (a scalar input needs few dimensions).
    ``numeric``: the inputs are real values (..., n_vars), embedded here by a `NumericEmbedding`; else they come
    embedded (..., n_vars, variable_size), as the static categories do.
    -> (..., hidden_size) and weights (..., n_vars) that sum to 1.
    """

    def __init__(self, n_vars: int, variable_size: int, hidden_size: int, context_size: int | None = None,
                 dropout: float = 0.0, numeric: bool = True):
        super().__init__()
        self.embedding = NumericEmbedding(n_vars, variable_size) if numeric else None
        self.weights = GatedResidualNetwork(n_vars * variable_size, hidden_size, n_vars, context_size, dropout)
        self.transform = GatedResidualNetwork(variable_size, variable_size, variable_size, dropout=dropout,
                                              n_groups=n_vars)
        self.project = nn.Linear(variable_size, hidden_size)

    def forward(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = inputs if self.embedding is None else self.embedding(inputs)
        weights = torch.softmax(self.weights(embedded.flatten(-2), context), dim=-1)
        values = None if self.embedding is None else inputs
        return self.project(variable_mix(embedded, weights, self.transform, values, self.embedding)), weights


class StaticContexts(NamedTuple):
    """The static covariate encoder's output: ``contexts`` (B, 4, hidden), for variable selection, the LSTM's
    initial hidden and cell state and static enrichment, in that order; ``weights`` (B, n_static) its selection."""

    contexts: torch.Tensor
    weights: torch.Tensor


class StaticCovariateEncoder(nn.Module):
    """Static categories -> one selected embedding -> the four contexts that condition the whole network:
    variable selection, the LSTM's initial hidden and cell state, and static enrichment."""

    def __init__(self, cardinalities: Sequence[int], variable_size: int, hidden_size: int, dropout: float = 0.0):
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(n, variable_size) for n in cardinalities)
        self.selection = VariableSelectionNetwork(len(cardinalities), variable_size, hidden_size, dropout=dropout,
                                                  numeric=False)
        self.contexts = GatedResidualNetwork(hidden_size, hidden_size, hidden_size, dropout=dropout, n_groups=4)

    def forward(self, codes: torch.Tensor) -> StaticContexts:
        embedded = torch.stack([embedding(codes[:, i]) for i, embedding in enumerate(self.embeddings)], dim=1)
        static, weights = self.selection(embedded)
        return StaticContexts(self.contexts(static.unsqueeze(1).expand(-1, 4, -1)), weights)


class LSTMEncoderDecoder(nn.Module):
    """Local processing: an LSTM over the past window whose final state starts an LSTM over the known future,
    both started from static contexts, with a gated skip back to the selected inputs."""

    def __init__(self, hidden_size: int, dropout: float = 0.0):
        super().__init__()
        self.encoder = nn.LSTM(hidden_size, hidden_size, batch_first=True)
        self.decoder = nn.LSTM(hidden_size, hidden_size, batch_first=True)
        self.gate = GateAddNorm(hidden_size, hidden_size, dropout)

    def forward(self, past: torch.Tensor, future: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
        encoded, state = lstm_layer(self.encoder, past, (h0.unsqueeze(0), c0.unsqueeze(0)))
        decoded, _ = lstm_layer(self.decoder, future, state)
        return self.gate(torch.cat([encoded, decoded], dim=1), torch.cat([past, future], dim=1))


class InterpretableMultiHeadAttention(nn.Module):
    """Multi-head attention whose heads share one value projection and are averaged, so the head-averaged
    attention matrix alone explains the output. ``mask`` (queries x keys, True = may attend) keeps it causal.

    Since V is shared, mean_h(A_h V) = (mean_h A_h) V: the heads are averaged before the product. The key
    projection has no bias: it would add q . b_k to all of a query's scores alike, which the softmax removes.
    The keys are never projected: q . (W_k x) = (W_k^T q) . x, so each head's query is taken into the keys' space
    instead (H decoder positions, not L + H keys; the same scores).
    """

    def __init__(self, hidden_size: int, num_heads: int, attention_size: int, dropout: float = 0.0):
        super().__init__()
        self.num_heads, self.attention_size = num_heads, attention_size
        self.query = nn.Linear(hidden_size, num_heads * attention_size)
        self.key = nn.Linear(hidden_size, num_heads * attention_size, bias=False)
        self.value = nn.Linear(hidden_size, attention_size)
        self.out = nn.Linear(attention_size, hidden_size)
        self.dropout = Dropout(dropout)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, n_queries, n_keys = queries.shape[0], queries.shape[1], keys.shape[1]
        q = self.query(queries).view(batch, n_queries, self.num_heads, self.attention_size)
        key_weight = self.key.weight.view(self.num_heads, self.attention_size, -1)
        q_in_keys = torch.einsum("bqha,hai->bhqi", q, key_weight).reshape(batch, -1, keys.shape[-1])
        scores = (q_in_keys @ keys.transpose(1, 2)).view(batch, self.num_heads, n_queries, n_keys)
        scores = scores / math.sqrt(self.attention_size)
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).mean(dim=1)
        return self.out(self.dropout(weights) @ self.value(keys)), weights

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # TFTs recorded before the key bias was dropped: it never changed an output, so it is left out
        state_dict.pop(prefix + "key.bias", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class QuantileOutput(nn.Module):
    """One linear read-out per quantile at each decoder position: (batch, H, hidden) -> (batch, H, quantiles)."""

    def __init__(self, hidden_size: int, n_quantiles: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, n_quantiles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def quantile_loss(pred: torch.Tensor, target: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """Pinball loss max(q e, (q - 1) e), e = target - pred, averaged over rows, horizons and quantiles.

    ``pred`` (rows, H, Q), ``target`` (rows, H), ``quantiles`` (Q,).
    """
    error = target.unsqueeze(-1) - pred
    return torch.maximum(quantiles * error, (quantiles - 1) * error).mean()


# ----------------------------------------------------------------------------------------------- the network
class TFTBatch(NamedTuple):
    """static (B, n_static) int64 codes; past (B, L, n_past) floats; future (B, H, n_future) floats;
    static_contexts: the codes encoded (`TemporalFusionNetwork.encode_static`), or None to encode them in the
    forward."""

    static: torch.Tensor
    past: torch.Tensor
    future: torch.Tensor
    static_contexts: StaticContexts | None = None


class TFTWeights(NamedTuple):
    """Interpretation: static (B, S), past (B, L, n_past), future (B, H, n_future), attention (B, H, L + H)."""

    static: torch.Tensor
    past: torch.Tensor
    future: torch.Tensor
    attention: torch.Tensor


class TemporalFusionNetwork(nn.Module):
    """The TFT: static contexts, variable selection, LSTM encoder-decoder, static enrichment, causal
    interpretable attention, position-wise GRN and quantile outputs for each of the H decoder positions."""

    def __init__(self, n_past: int, n_future: int, horizons: int, n_quantiles: int, hidden_size: int = 64,
                 variable_hidden_size: int = 8, attention_hidden_size: int = 32, num_heads: int = 4,
                 dropout: float = 0.1, static_cardinalities: Sequence[int] = STATIC_CARDINALITIES):
        super().__init__()
        self.horizons = horizons
        self.static_encoder = StaticCovariateEncoder(static_cardinalities, variable_hidden_size, hidden_size, dropout)
        self.past_selection = VariableSelectionNetwork(n_past, variable_hidden_size, hidden_size, hidden_size, dropout)
        self.future_selection = VariableSelectionNetwork(n_future, variable_hidden_size, hidden_size, hidden_size,
                                                         dropout)
        self.lstm = LSTMEncoderDecoder(hidden_size, dropout)
        self.enrichment = GatedResidualNetwork(hidden_size, hidden_size, hidden_size, hidden_size, dropout)
        self.attention = InterpretableMultiHeadAttention(hidden_size, num_heads, attention_hidden_size, dropout)
        self.attention_gate = GateAddNorm(hidden_size, hidden_size, dropout)
        self.feed_forward = GatedResidualNetwork(hidden_size, hidden_size, hidden_size, dropout=dropout)
        self.output_gate = GateAddNorm(hidden_size, hidden_size)
        self.output = QuantileOutput(hidden_size, n_quantiles)

    def forward(self, x: TFTBatch) -> torch.Tensor:
        """Quantile forecasts (B, H, Q)."""
        return self.interpret(x)[0]

    def encode_static(self, x: TFTBatch) -> TFTBatch:
        """``x`` with its static contexts encoded. The training loop calls this once per batch (``shared_inputs``),
        so a batch's chunks share one run of the static covariate encoder: its ~130 small ops cost about 6 ms a
        256-row chunk on a CPU, half of it whatever the rows."""
        return x._replace(static_contexts=self.static_encoder(x.static))

    def interpret(self, x: TFTBatch) -> tuple[torch.Tensor, TFTWeights]:
        """Quantile forecasts (B, H, Q) and the weights that explain them."""
        contexts, static_weights = x.static_contexts if x.static_contexts is not None else self.static_encoder(x.static)
        select, h0, c0, enrich = contexts.unbind(dim=1)
        past, past_weights = self.past_selection(x.past, select.unsqueeze(1))
        future, future_weights = self.future_selection(x.future, select.unsqueeze(1))
        temporal = self.lstm(past, future, h0, c0)
        enriched = self.enrichment(temporal, enrich.unsqueeze(1))
        n_past, horizons = past.shape[1], self.horizons
        # decoder position i (day t+1+i) may see every day up to and including itself
        mask = torch.ones(horizons, n_past + horizons, dtype=torch.bool, device=past.device).tril(diagonal=n_past)
        attended, attention = self.attention(enriched[:, n_past:], enriched, mask)
        decoded = self.feed_forward(self.attention_gate(attended, enriched[:, n_past:]))
        output = self.output(self.output_gate(decoded, temporal[:, n_past:]))
        return output, TFTWeights(static_weights, past_weights, future_weights, attention)


# ----------------------------------------------------------------------------------------------- the Qlib model
class _Panel:
    """Batches for any (day, instrument) row of a handler's panel: windows of past features joined with the
    calendar facts of those days, the calendar facts of the next H days, and static codes."""

    def __init__(self, features: pd.DataFrame, calendar: pd.DataFrame, horizons: int, step_len: int):
        days = features.index.get_level_values("datetime")
        past_calendar = calendar.reindex(days).to_numpy()
        if np.isnan(past_calendar).any():
            raise ValueError("the handler has days that are not in the provider's calendar")
        panel = pd.DataFrame(np.hstack([features.to_numpy("float32"), past_calendar]), index=features.index,
                             columns=list(features.columns) + list(calendar.columns))
        self.windows = SequenceWindows(panel, step_len)
        self.calendar_index, self.calendar = calendar.index, calendar.to_numpy("float32")
        self.horizons = horizons

    def rows(self, index: pd.MultiIndex) -> "_Rows":
        day = self.calendar_index.get_indexer(index.get_level_values("datetime"))
        future_days = day[:, None] + np.arange(1, self.horizons + 1)[None, :]
        if (day < 0).any() or future_days.max(initial=0) >= len(self.calendar_index):
            raise ValueError("rows outside the (extended) calendar")
        return _Rows(index, self.windows.positions(index), future_days,
                     static_codes(index.get_level_values("instrument")))

    def batch(self, rows: "_Rows", take: np.ndarray | slice, device: torch.device) -> TFTBatch:
        return TFTBatch(
            torch.from_numpy(rows.static[take]).to(device),
            torch.from_numpy(self.windows.gather(rows.positions[take])).to(device),
            torch.from_numpy(self.calendar[rows.future_days[take]]).to(device),
        )


class _Rows(NamedTuple):
    index: pd.MultiIndex
    positions: np.ndarray
    future_days: np.ndarray
    static: np.ndarray


@checked_kwargs
class TFT(CpuPickledModel, Model):
    """Temporal Fusion Transformer quantile forecasts of the next ``horizons`` daily returns (see module doc).

    ``predict`` returns the median forecast of horizon 1 (the handler's LABEL0), the score Qlib's records and
    backtest use; ``predict_quantiles`` returns every quantile of every horizon. ``known_future``: the calendar
    facts fed for days t+1..t+H (validated: only `CALENDAR_FEATURES`). The label is the handler's learnt one
    (DK_L; a raw return if its learn processors only drop NaN), scaled for training by its train-segment sd per
    horizon; calendar inputs are standardised with train-segment statistics.
    ``checkpoint_dir``/``resume``/``early_stop``/``metric``/``average_best``/``grad_clip``/``seed``/``device`` go
    to the shared loop (`vn30_qlib.models.training`); ``average_best``: the fitted weights are the mean of those
    of the ``average_best`` best epochs by the valid metric; on the real split, 5 gave a higher and steadier
    test Rank IC over seeds than the single best epoch (BENCHMARKS.md). ``n_threads``: torch's CPU threads
    (0 = every core this process may use); the TFT runs many small kernels, so on a CPU shared with other jobs
    1 thread can be several times faster than 2 (see BENCHMARKS.md). ``chunk_rows``: on a CPU, each batch's
    forward and backward run this many rows at a time, the same gradient from activations that stay in cache
    (256: a step 1.2x faster than whole batches of 1,024).
    """

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
        early_stop: int = 10,
        metric: str = "ic",
        average_best: int = 5,
        grad_clip: float | None = 3.0,
        seed: int = 0,
        device: str = "auto",
        checkpoint_dir: str | None = None,
        resume: bool = False,
        n_threads: int = 0,
        chunk_rows: int | None = 256,
    ):
        quantiles = [float(q) for q in quantiles]
        if 0.5 not in quantiles or sorted(quantiles) != quantiles or not all(0 < q < 1 for q in quantiles):
            raise ValueError(f"quantiles must be increasing, inside (0, 1) and include 0.5, got {quantiles}")
        if horizons < 1:
            raise ValueError(f"horizons must be >= 1, got {horizons}")
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs a checkpoint_dir to resume from")
        self.hidden_size, self.variable_hidden_size = hidden_size, variable_hidden_size
        self.attention_hidden_size, self.num_heads, self.dropout = attention_hidden_size, num_heads, dropout
        self.lr, self.batch_size, self.n_epochs, self.quantiles = lr, batch_size, n_epochs, quantiles
        self.horizons, self.step_len, self.known_future = horizons, step_len, validate_known_future(known_future)
        self.early_stop, self.metric, self.grad_clip, self.seed = early_stop, metric, grad_clip, seed
        self.average_best = average_best
        self.device, self.checkpoint_dir, self.resume, self.n_threads = device, checkpoint_dir, resume, n_threads
        self.chunk_rows = chunk_rows
        self.module: TemporalFusionNetwork | None = None
        self.past_names: list[str] = []
        self.calendar_mean: pd.Series | None = None
        self.calendar_std: pd.Series | None = None
        self.label_scale: np.ndarray | None = None
        self.importance: dict[str, pd.Series] = {}
        self.history: list[dict] = []
        self.epoch_callback = None  # set by `vn30-qlib tune` to prune by epoch; not a YAML key, never pickled

    # ------------------------------------------------------------------ fit / predict
    def fit(self, dataset: DatasetH, **kwargs) -> None:
        set_seed(self.seed)
        device = pick_device(self.device)
        torch.set_num_threads(self.n_threads or cpu_threads())
        train_frame = self._labels(dataset, "train")
        train_days = train_frame.index.get_level_values("datetime")
        calendar = self._raw_calendar()
        in_train = calendar.loc[train_days.min():train_days.max()]
        self.calendar_mean, self.calendar_std = in_train.mean(), in_train.std().replace(0.0, 1.0)
        self.label_scale = train_frame.std().to_numpy("float32")
        panel = self._panel(dataset)
        self.past_names = list(panel.windows.columns)
        train, train_y, train_days_code = self._segment(panel, train_frame, device)
        valid, valid_y, valid_days_code = self._segment(panel, self._labels(dataset, "valid"), device)

        self.module = self._build_module().to(device)
        optimizer = adam(self.module, self.lr)
        quantiles = torch.tensor(self.quantiles, device=device)

        def train_batches():
            order = np.random.permutation(len(train.index))
            for take in np.array_split(order, max(1, int(np.ceil(len(order) / self.batch_size)))):
                yield panel.batch(train, take, device), train_y[take], train_days_code[take]

        def loss(output: torch.Tensor, label: torch.Tensor, days: torch.Tensor) -> torch.Tensor:
            return quantile_loss(output, label, quantiles)

        median = self.quantiles.index(0.5)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(self.checkpoint_dir).expanduser() if self.checkpoint_dir is not None else Path(tmp)
            config = LoopConfig(n_epochs=self.n_epochs, early_stop=self.early_stop, metric=self.metric,
                                average_best=self.average_best, grad_clip=self.grad_clip,
                                checkpoint_path=folder / "tft.pt", resume=self.resume, on_epoch=self.epoch_callback,
                                chunk_rows=self.chunk_rows, shared_inputs=self.module.encode_static)
            self.history = fit_epochs(
                self.module, optimizer, train_batches, lambda: self._forward(panel, valid, device)[0], valid_y,
                valid_days_code, loss, config, point=lambda output: output[:, 0, median],
                point_label=lambda label: label[:, 0],
            )
        self.importance = self._weights_summary(self._forward(panel, valid, device)[1], len(valid.index))

    def predict(self, dataset: DatasetH, segment: str | slice = "test") -> pd.Series:
        """The median forecast of horizon 1 (the return from close t+1 to close t+2), in the learnt label's units."""
        quantiles = self.predict_quantiles(dataset, segment)
        return quantiles[f"h1_q{0.5:g}"].rename("score")

    def predict_quantiles(self, dataset: DatasetH, segment: str | slice = "test") -> pd.DataFrame:
        """Every quantile of every horizon, columns ``h{h}_q{q}``, in the learnt label's units."""
        panel, rows, device = self._rows_to_predict(dataset, segment)
        return self._quantile_frame(self._forward(panel, rows, device)[0], rows.index)

    def _quantile_frame(self, output: torch.Tensor, index: pd.MultiIndex) -> pd.DataFrame:
        values = output.cpu().numpy() * self.label_scale[None, :, None]
        columns = [f"h{h}_q{q:g}" for h in range(1, self.horizons + 1) for q in self.quantiles]
        return pd.DataFrame(values.reshape(len(index), -1).astype("float64"), index=index, columns=columns)

    def get_feature_importance(self, importance_type: str = "vsn") -> pd.Series:
        """Mean past-input variable-selection weight per feature (valid segment, after fit); sums to 1.

        ``importance_type`` is accepted for the shared FeatureImportanceRecord and ignored: the TFT has one kind.
        """
        if not self.importance:
            raise ValueError("the model is not fitted yet")
        return self.importance["past"].sort_values(ascending=False)

    # ------------------------------------------------------------------ diagnostics
    def record_diagnostics(self, dataset: DatasetH, recorder) -> dict:
        """Test-segment quantiles, 10-90 % coverage and crossing rate, variable-selection and attention weights."""
        panel, rows, device = self._rows_to_predict(dataset, "test")
        output, weights = self._forward(panel, rows, device)
        quantiles = self._quantile_frame(output, rows.index)
        label = dataset.prepare("test", col_set="label", data_key=DataHandlerLP.DK_L)
        metrics = quantile_metrics(quantiles, label, self.quantiles, self.horizons)
        weights = self._weights_summary(weights, len(rows.index))
        names = {"static": "static_importance", "past": "past_importance", "future": "future_importance",
                 "attention": "attention_by_lag"}
        recorder.log_metrics(**metrics)
        recorder.save_objects(artifact_path="tft", **{"quantiles.pkl": quantiles, "metrics.pkl": pd.Series(metrics),
                                                      **{f"{names[k]}.pkl": v for k, v in weights.items()}})
        with tempfile.TemporaryDirectory() as tmp:
            for key, values in weights.items():
                path = Path(tmp) / names[key]
                values.to_csv(path.with_suffix(".csv"))
                _plot(values, key, path.with_suffix(".png"))
                recorder.log_artifact(str(path.with_suffix(".csv")), artifact_path="tft")
                recorder.log_artifact(str(path.with_suffix(".png")), artifact_path="tft")
        get_module_logger("TFT").info(f"test diagnostics: {metrics}")
        return metrics

    # ------------------------------------------------------------------ helpers
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
        return _Panel(features, calendar.astype("float32"), self.horizons, self.step_len)

    def _labels(self, dataset: DatasetH, segment: str) -> pd.DataFrame:
        label = dataset.prepare(segment, col_set="label", data_key=DataHandlerLP.DK_L)
        if label.shape[1] != self.horizons:
            raise ValueError(f"horizons={self.horizons} but the handler gives {label.shape[1]} label columns")
        label = label[np.isfinite(label.to_numpy()).all(axis=1)]
        if label.empty:
            raise ValueError(f"segment {segment!r} has no labelled rows")
        return label

    def _segment(self, panel: _Panel, label: pd.DataFrame, device: torch.device):
        rows = panel.rows(label.index)
        y = torch.from_numpy(label.to_numpy("float32") / self.label_scale).to(device)
        days, _ = pd.factorize(label.index.get_level_values("datetime"), sort=True)
        return rows, y, torch.from_numpy(days).to(device)

    def _rows_to_predict(self, dataset: DatasetH, segment: str | slice):
        if self.module is None:
            raise ValueError("the model is not fitted yet")
        panel = self._panel(dataset)
        if list(panel.windows.columns) != self.past_names:
            raise ValueError("the handler's features differ from those the model was fitted on")
        index = dataset.prepare(segment, col_set="feature", data_key=DataHandlerLP.DK_I).index
        return panel, panel.rows(index), next(self.module.parameters()).device

    def _forward(self, panel: _Panel, rows: _Rows, device: torch.device) -> tuple[torch.Tensor, list[TFTWeights]]:
        """Forecasts (rows, H, Q) in label-sd units for all ``rows``, a training batch at a time; weights per
        chunk. (In 8,192-row chunks each (rows, steps, variables, width) activation is ~200 MB: the pooled
        VN30 fit then peaked at 2.1 GiB instead of 1.5.)"""
        chunk = self.batch_size
        self.module.eval()
        outputs, weights = [], []
        with torch.no_grad():
            for start in range(0, len(rows.index), chunk):
                output, weight = self.module.interpret(panel.batch(rows, slice(start, start + chunk), device))
                outputs.append(output)
                weights.append(weight)
        return torch.cat(outputs), weights

    def _weights_summary(self, weights: list[TFTWeights], n: int) -> dict[str, pd.Series | pd.DataFrame]:
        """Mean over ``n`` rows of the variable-selection weights (static, past, future) and of the attention
        by lag (rows: lag in days before t, negative for the known-future days; columns: horizon)."""

        def mean(name: str) -> np.ndarray:
            parts = [getattr(w, name) for w in weights]
            total = sum(p.reshape(p.shape[0], -1, p.shape[-1]).sum(dim=(0, 1)) if name != "attention"
                        else p.sum(dim=0) for p in parts)
            steps = 1 if name in ("static", "attention") else parts[0].shape[1]
            return (total / (n * steps)).cpu().numpy()

        lags = np.arange(self.step_len - 1, -self.horizons - 1, -1)  # key day = t - lag
        attention = pd.DataFrame(mean("attention").T, index=pd.Index(lags, name="lag"),
                                 columns=[f"h{h}" for h in range(1, self.horizons + 1)])
        return {
            "static": pd.Series(mean("static"), index=list(STATIC_FEATURES), name="weight"),
            "past": pd.Series(mean("past"), index=self.past_names, name="weight"),
            "future": pd.Series(mean("future"), index=self.known_future, name="weight"),
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


def _plot(values: pd.Series | pd.DataFrame, name: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
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
    plt.close(fig)
