"""The TFT's numeric embedding, x[..., v] * weight[v] + bias[v], as one CPU kernel pass.

Torch's broadcasting ops take 4-6 passes over the (rows, 20 days, variables, width) output forward and backward,
about 6 ms of a 256-row TFT training chunk; ``csrc/numeric_embedding.cpp`` makes one, each (row, variable) one
8-float vector (`cpu_kernels`). Anywhere else (a GPU, another dtype, a width other than 8, no compiler,
the kernels switched off) the same sum runs in torch's ops; both give the same values and gradients to float32
rounding (tests/test_numeric_embedding.py).
"""
from __future__ import annotations

import torch

from vn30_qlib.models import cpu_kernels


def numeric_embedding(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(..., V) values, (V, D) weight and bias -> (..., V, D): each value times its variable's vector, plus a bias."""
    if not (weight.shape[-1] == cpu_kernels.VARIABLE_WIDTH and x.numel() > 0 and cpu_kernels.runs_on(x)):
        return x.unsqueeze(-1) * weight + bias
    out = _NumericEmbedding.apply(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias)
    return out.reshape(*x.shape, weight.shape[-1])


class _NumericEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return cpu_kernels.build().numeric_embedding_forward(x, weight.contiguous(), bias.contiguous())

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return tuple(cpu_kernels.build().numeric_embedding_backward(grad.contiguous(), x, weight.contiguous()))
