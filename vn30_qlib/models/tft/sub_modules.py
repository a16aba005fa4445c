"""The TFT's building blocks (Lim et al. 2021, section 4), each as the paper writes it.

Where a block has a faster form, the forward names it in one line and a test shows it equals the textbook form
(tests/test_tft.py, tests/test_variable_mix.py): the GRN's two linear maps of its input as one matmul, the attention's
queries taken into the keys' space, and on a CPU the C++ kernels behind `glu`, `elu`, `numeric_embedding`,
`lstm_layer` and `fused_variable_mix` (`vn30_qlib.models.cpu_kernels`).

One deviation from the paper, for CPU speed: each variable is processed at ``variable_size`` and the selected mix
projected to ``hidden_size`` (`VariableSelectionNetwork`), like pytorch-forecasting's ``hidden_continuous_size``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vn30_qlib.models.dropout import Dropout
from vn30_qlib.models.elu import elu
from vn30_qlib.models.glu import glu
from vn30_qlib.models.lstm_layer import lstm_layer
from vn30_qlib.models.numeric_embedding import numeric_embedding
from vn30_qlib.models.variable_mix import fused_fits, fused_variable_mix


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
        """GLU(dropout(x)), plus ``residual`` when given (the skip connection every TFT gate feeds). `glu` is
        F.glu(map + bias) + residual; on a CPU one kernel adds the map's bias, gates and adds the residual."""
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
    """GRN(a, c) = LayerNorm(skip(a) + GLU(W1 ELU(W2 a + b2 + W3 c) + b1)): a nonlinearity the gate can bypass.

    ``context``: an optional static vector c added inside the nonlinearity. ``n_groups``: one independent GRN
    per variable over inputs shaped (..., n_groups, input_size). skip(a) is a linear map where the sizes differ.
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
        hidden, skip = self.input_and_skip(a)
        if context is not None:
            hidden = hidden + self.fc_context(context)
        return self.norm(self.gate(self.fc_hidden(elu(hidden)), skip))

    def input_and_skip(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W2 a + b2, skip(a)). A linear skip runs with W2 as one matmul: its backward is then one matmul, not two
        and a sum (a variable selection's weights GRN over (rows, 20 days, 28 x 8 inputs): 2-3 ms less a 256-row
        chunk on CPU)."""
        if not isinstance(self.skip, nn.Linear):
            return self.fc_input(a), self.skip(a)
        both = F.linear(a, torch.cat([self.fc_input.weight, self.skip.weight]),
                        torch.cat([self.fc_input.bias, self.skip.bias]))
        hidden, skip = both.split([self.fc_input.out_features, self.skip.out_features], dim=-1)
        return hidden, skip


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
    """v = softmax(GRN_v(Xi, c)) over the variables (per sample and step, given a context c), and the selected
    input sum_j v_j GRN_j(xi_j): the weights say how the model mixes its inputs. They are not an importance: an
    input can take weight without changing any forecast's rank (`diagnostics.permutation_importance` measures that).

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
        if self.embedding is not None and fused_fits(inputs, self.embedding, self.transform):
            mixed = fused_variable_mix(inputs, weights, self.embedding, self.transform)  # the same sum, one kernel
        else:
            mixed = (weights.unsqueeze(-1) * self.transform(embedded)).sum(-2)
        return self.project(mixed), weights


class DecoderPositions(nn.Module):
    """The decoder's input when no known-future variable is given: one learnt vector per decoder position (day
    t+1+i), the same for every row, in place of a variable selection over nothing. (B, H, 0) inputs ->
    (B, H, hidden_size) and empty weights (B, H, 0), the shapes `VariableSelectionNetwork` gives."""

    def __init__(self, horizons: int, hidden_size: int):
        super().__init__()
        self.position = nn.Parameter(torch.randn(horizons, hidden_size) * 0.1)

    def forward(self, inputs: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs.shape[1:] != (self.position.shape[0], 0):
            raise ValueError(f"DecoderPositions takes (batch, {self.position.shape[0]}, 0) inputs, "
                             f"got {tuple(inputs.shape)}")
        return self.position.expand(inputs.shape[0], -1, -1), inputs


class StaticContexts(NamedTuple):
    """The static covariate encoder's output: ``contexts`` (B, 4, hidden), for variable selection, the LSTM's
    initial hidden and cell state and static enrichment, in that order; ``weights`` (B, n_static) its selection."""

    contexts: torch.Tensor
    weights: torch.Tensor


class StaticCovariateEncoder(nn.Module):
    """Static categories -> one selected embedding -> the four contexts that condition the whole network:
    variable selection, the LSTM's initial hidden and cell state, and static enrichment (four GRNs, as one
    grouped GRN)."""

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
    attention matrix alone explains the output: A_h = softmax(Q W_q,h (K W_k,h)^T / sqrt(d)), masked where ``mask``
    (queries x keys, True = may attend) is False, out = W_o (mean_h A_h) V W_v. Since V W_v is shared,
    mean_h(A_h V W_v) = (mean_h A_h) V W_v: the heads are averaged before the product.

    The key projection has no bias: it would add q . b_k to all of a query's scores alike, which the softmax
    removes. `scores` takes each head's query into the keys' space instead of projecting the keys (the same
    scores from H decoder positions, not L + H keys).
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
        scores = self.scores(queries, keys) / math.sqrt(self.attention_size)
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).mean(dim=1)
        return self.out(self.dropout(weights) @ self.value(keys)), weights

    def scores(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """(batch, heads, queries, keys): (W_q,h x_q + b_q,h) . (W_k,h x_k), computed as (W_k,h^T q_h) . x_k."""
        batch, n_queries, n_keys = queries.shape[0], queries.shape[1], keys.shape[1]
        q = self.query(queries).view(batch, n_queries, self.num_heads, self.attention_size)
        key_weight = self.key.weight.view(self.num_heads, self.attention_size, -1)
        q_in_keys = torch.einsum("bqha,hai->bhqi", q, key_weight).reshape(batch, -1, keys.shape[-1])
        return (q_in_keys @ keys.transpose(1, 2)).view(batch, self.num_heads, n_queries, n_keys)

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
