"""The TFT numeric variable selection's embedding, per-variable GRNs and weighted mix, as one fused CPU kernel.

`fused_variable_mix(values, weights, embedding, grn)` is sum_v weights[..., v] * GRN_v(embedding(values)[..., v, :]),
what `vn30_qlib.models.tft.sub_modules.VariableSelectionNetwork` computes in torch's ops: over the past window's
(rows, 20 days, 28 variables, width 8) inputs, most of a TFT training step, in ops that are memory-bound and
vectorise poorly along a last dimension of 8. ``csrc/variable_mix.cpp`` reads ``values`` and embeds them itself (one
number per row and variable instead of eight), takes rows 16 at a time as SIMD vectors, keeps every intermediate in
cache, recomputes the forward in the backward, and hashes the dropout mask from each value's position and a seed
drawn from torch's generator (never stored; `dropout.hashed_mask` is the same mask in torch's ops). It runs on a CPU,
at width 8, with the kernels on (`cpu_kernels`; `fused_fits`). Both give the same values and gradients to float32
rounding (tests/test_variable_mix.py).
"""
from __future__ import annotations

import torch
from torch import nn

from vn30_qlib.models import cpu_kernels
from vn30_qlib.models.dropout import mask_seed, mask_threshold


def fused_variable_mix(values: torch.Tensor, weights: torch.Tensor, embedding: nn.Module,
                       grn: nn.Module) -> torch.Tensor:
    """(..., V) values and (..., V) weights -> (..., 8): the weighted sum of the per-variable GRN outputs.

    ``embedding``: the `NumericEmbedding` of ``values``; ``grn``: the variable selection's `GatedResidualNetwork`
    with ``n_groups=V`` (identity skip, no context). Only where `fused_fits`.
    """
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
        return cpu_kernels.build().variable_mix_forward(values, weights, *params, eps, seed, threshold)

    @staticmethod
    def backward(ctx, grad):
        gradients = cpu_kernels.build().variable_mix_backward(grad.contiguous(), *ctx.saved_tensors, *ctx.settings)
        return *gradients, None, None, None


def kernel_dropout_mask(rows: int, n_vars: int, seed: int, p: float) -> torch.Tensor:
    """The (rows, n_vars, 8) dropout mask the kernel applies for ``seed`` (1 / keep rate where kept): for tests."""
    return cpu_kernels.build().variable_mix_dropout_mask(rows, n_vars, cpu_kernels.VARIABLE_WIDTH, seed,
                                                       mask_threshold(p))
