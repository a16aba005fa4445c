"""Dropout for the sequence models, with a mask hashed from each value's position instead of drawn.

On CPU, torch draws a dropout mask with ``bernoulli_`` at about 16 ns a value on this project's machine: 12 % of
a TFT training step and 15 % of an LSTM one. Here the value at flat (row-major) position i is kept when the top
16 bits of a hash of i and a seed are at least ``round(p * 65536)``, and kept values are scaled by the inverse of
that exact keep rate, so the output's expectation is the input. The seed is one draw from torch's generator, so
``torch.manual_seed`` (and a checkpoint's saved torch RNG state) fixes every mask; the backward remakes the mask
from the seed, so none is stored. On a CPU the C++ kernel ``csrc/dropout.cpp`` makes the mask on the fly; anywhere
else (a GPU, the kernels off) `hashed_mask` makes the same mask in torch's ops, so a seed gives one model whether the
kernels run or not.
"""
from __future__ import annotations

import numpy as np
import torch

from vn30_qlib.models import cpu_kernels

LEVELS = 1 << 16  # the mask's resolution: p is rounded to a multiple of 1 / 65536
_LOW_32_BITS = 0xFFFFFFFF


def mask_threshold(p: float) -> int:
    """A value is kept when its 16 hashed bits are at least this: ``p`` rounded to a multiple of 1 / 65536."""
    return round(p * LEVELS)


def mask_seed() -> int:
    """One draw from torch's generator seeding a mask, so ``torch.manual_seed`` fixes every mask."""
    return int(torch.randint(0, 2**63 - 1, ()))


def hashed_mask(shape: tuple[int, ...], seed: int, threshold: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The float32 mask (1 / keep rate where kept, else 0) for the row-major positions of ``shape``: what the C++
    kernels apply (``csrc/simd.h``'s ``DropoutMask``), in torch's ops on any device.

    Bits = hash32(hash32(i ^ low 32 bits of seed) + high 32 bits of seed) >> 16, with lowbias32 as hash32; the
    uint32 arithmetic runs in int64 with the high bits cut after each product and sum.
    """
    index = torch.arange(int(np.prod(shape, dtype=np.int64)), dtype=torch.int64, device=device)
    index ^= seed & _LOW_32_BITS
    bits = _hash32(_hash32(index).add_(seed >> 32).bitwise_and_(_LOW_32_BITS)) >> 16
    scale = float(np.float32(LEVELS) / np.float32(LEVELS - threshold))  # float32 division, as the kernel's
    return torch.where(bits >= threshold, scale, 0.0).to(torch.float32).view(shape)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Chris Wellons' integer hash) of uint32 values held in int64, in place."""
    x ^= x >> 16
    x.mul_(0x7FEB352D).bitwise_and_(_LOW_32_BITS)
    x ^= x >> 15
    x.mul_(0x846CA68B).bitwise_and_(_LOW_32_BITS)
    x ^= x >> 16
    return x


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
        seed, threshold = mask_seed(), mask_threshold(self.p)
        if hashed_mask_kernel_fits(x):
            return _HashedDropout.apply(x, seed, threshold)
        return (x * hashed_mask(x.shape, seed, threshold, x.device)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def hashed_mask_kernel_fits(x: torch.Tensor) -> bool:
    """Does the C++ kernel apply the mask here (a CPU float32 or bfloat16 tensor, the kernels running)?"""
    return cpu_kernels.runs_on(x, (torch.float32, torch.bfloat16))


class _HashedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seed, threshold):
        ctx.settings = seed, threshold
        return cpu_kernels.build().dropout(x.contiguous(), seed, threshold)

    @staticmethod
    def backward(ctx, grad):
        return cpu_kernels.build().dropout(grad.contiguous(), *ctx.settings), None, None
