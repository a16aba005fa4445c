"""The TFT variable selection's numeric embedding, per-variable GRNs and weighted mix, as one fused CPU kernel.

``variable_mix(embedded, weights, grn, values, embedding)`` is sum_v weights[..., v] * GRN_v(embedded[..., v, :]),
where ``embedded = embedding(values)``: over the past window's (rows, 20 days, 28 variables, width 8) inputs,
most of a TFT training step in torch's ops, which are memory-bound and vectorise poorly along a last dimension
of 8. On a CPU, at width 8, it runs ``csrc/variable_mix.cpp`` instead: it reads ``values`` and embeds them
itself (one number per row and variable instead of eight), takes rows 16 at a time as SIMD vectors, keeps every
intermediate in cache, recomputes the forward in the backward, and hashes the dropout mask from each value's
position and a seed drawn from torch's generator (never stored). It is compiled on first use (`cpu_kernels`;
needs a C++ compiler). Anywhere else (a GPU, another width, categorical inputs, no compiler) the
same sum runs in torch's ops on ``embedded``. Both give the same values to float32 rounding and use dropout
masks of the same rate (tests/test_variable_mix.py).
"""
from __future__ import annotations

import torch
from torch import nn

from vn30_qlib.models import cpu_kernels
from vn30_qlib.models.dropout import mask_seed, mask_threshold


def variable_mix(embedded: torch.Tensor, weights: torch.Tensor, grn: nn.Module, values: torch.Tensor | None = None,
                 embedding: nn.Module | None = None) -> torch.Tensor:
    """(..., V, D) embedded inputs and (..., V) weights -> (..., D): the weighted sum of the per-variable GRN outputs.

    ``grn``: the variable selection's `GatedResidualNetwork` with ``n_groups=V`` (identity skip, no context).
    ``values`` (..., V) and ``embedding`` (`NumericEmbedding`): where ``embedded = embedding(values)``, the kernel
    reads those instead; without them (categorical inputs) the mix runs in torch's ops.
    """
    if values is None or not fused_fits(values, embedding, grn):
        return (weights.unsqueeze(-1) * grn(embedded)).sum(-2)
    n_vars = values.shape[-1]
    dropout = grn.gate.dropout
    threshold = mask_threshold(dropout.p) if dropout.training else 0
    seed = mask_seed() if threshold else 0
    mixed = _FusedVariableMix.apply(
        values.reshape(-1, n_vars).contiguous(), weights.reshape(-1, n_vars).contiguous(), embedding.weight,
        embedding.bias, grn.fc_input.weight, grn.fc_input.bias, grn.fc_hidden.weight, grn.fc_hidden.bias,
        grn.gate.linear.weight, grn.gate.linear.bias, grn.norm.weight, grn.norm.bias, grn.norm.eps, seed, threshold)
    return mixed.reshape(*values.shape[:-1], cpu_kernels.VARIABLE_WIDTH)


def fused_fits(values: torch.Tensor, embedding: nn.Module, grn: nn.Module) -> bool:
    """Does the kernel compute this mix (CPU, float32, width 8, the kernels running), or torch's ops?"""
    width = cpu_kernels.VARIABLE_WIDTH
    return (embedding.weight.shape[-1] == width and grn.fc_input.weight.shape[-1] == width
            and isinstance(grn.skip, nn.Identity) and grn.fc_context is None and cpu_kernels.runs_on(values))


class _FusedVariableMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, weights, *params_and_settings):
        *params, eps, seed, threshold = params_and_settings
        ctx.save_for_backward(values, weights, *params)
        ctx.settings = eps, seed, threshold
        return cpu_kernels.get().variable_mix_forward(values, weights, *params, eps, seed, threshold)

    @staticmethod
    def backward(ctx, grad):
        gradients = cpu_kernels.get().variable_mix_backward(grad.contiguous(), *ctx.saved_tensors, *ctx.settings)
        return *gradients, None, None, None


def kernel_dropout_mask(rows: int, n_vars: int, seed: int, p: float) -> torch.Tensor:
    """The (rows, n_vars, 8) dropout mask the kernel applies for ``seed`` (1 / keep rate where kept): for tests."""
    return cpu_kernels.get().variable_mix_dropout_mask(rows, n_vars, cpu_kernels.VARIABLE_WIDTH, seed,
                                                       mask_threshold(p))
