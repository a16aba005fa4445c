"""The assembled Temporal Fusion Transformer network (Lim et al. 2021, figure 2) from the blocks of `sub_modules`."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from vn30_qlib.models.tft.sub_modules import (
    DecoderPositions, GateAddNorm, GatedResidualNetwork, InterpretableMultiHeadAttention, LSTMEncoderDecoder,
    QuantileOutput, StaticContexts, StaticCovariateEncoder, VariableSelectionNetwork,
)
from vn30_qlib.models.tft_inputs import STATIC_CARDINALITIES


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
        # with no known-future input (``n_future`` 0) the decoder is fed its positions alone
        self.future_selection = (
            VariableSelectionNetwork(n_future, variable_hidden_size, hidden_size, hidden_size, dropout) if n_future
            else DecoderPositions(horizons, hidden_size))
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
