"""Dropout for the sequence models, with a CPU mask hashed from each value's position instead of drawn.

On CPU, torch draws a dropout mask with ``bernoulli_`` at about 16 ns a value on this project's machine: 12 % of
a TFT training step and 15 % of an LSTM one. Here the C++ kernel ``csrc/dropout.cpp`` keeps the value at flat
position i when the top 16 bits of a hash of i and a seed are at least ``round(p * 65536)``, and scales kept
values by the inverse of that exact keep rate, so the output's expectation is the input. The seed is one draw
from torch's generator, so ``torch.manual_seed`` (and a checkpoint's saved torch RNG state) fixes every mask; the
backward remakes the mask from the seed, so none is stored. On other devices, other dtypes than float32 and
bfloat16, or where the kernels do not run (`cpu_kernels.get`), it is ``torch.nn.functional.dropout``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vn30_qlib.models import cpu_kernels

LEVELS = 1 << 16  # the mask's resolution: p is rounded to a multiple of 1 / 65536


def mask_threshold(p: float) -> int:
    """A value is kept when its 16 hashed bits are at least this: ``p`` rounded to a multiple of 1 / 65536."""
    return round(p * LEVELS)


def mask_seed() -> int:
    """One draw from torch's generator seeding a mask, so ``torch.manual_seed`` fixes every mask."""
    return int(torch.randint(0, 2**63 - 1, ()))


class Dropout(torch.nn.Module):
    """``torch.nn.Dropout(p)``: zero each value with probability ``p`` in training, scale the rest by 1 / (1 - p)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not hashed_mask_fits(x):
            return F.dropout(x, self.p, training=True)
        return _HashedDropout.apply(x, mask_seed(), mask_threshold(self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def hashed_mask_fits(x: torch.Tensor) -> bool:
    """Does the hashed-mask kernel apply here (a CPU float32 or bfloat16 tensor, the kernels built)?"""
    return cpu_kernels.runs_on(x, (torch.float32, torch.bfloat16))


class _HashedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seed, threshold):
        ctx.settings = seed, threshold
        return cpu_kernels.get().dropout(x.contiguous(), seed, threshold)

    @staticmethod
    def backward(ctx, grad):
        return cpu_kernels.get().dropout(grad.contiguous(), *ctx.settings), None, None
