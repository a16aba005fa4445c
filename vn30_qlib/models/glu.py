"""The gated linear unit a * sigmoid(b), x = [a, b] along the last dimension, as a CPU kernel.

Torch's ``F.glu`` backward recomputes the sigmoid over the strided half b in a slow loop: 1.7 ms forward +
backward over a TFT chunk's (256, 21, 128) gate input on this project's CPU, three of them a chunk.
``csrc/glu.cpp`` (`cpu_kernels`) reads each row's halves as vectors and takes a vector exp. Anywhere else (a GPU,
another dtype, no compiler, ``cpu_kernels.ENABLED`` off) it is ``F.glu``; both agree to float32 rounding
(tests/test_glu.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vn30_qlib.models import cpu_kernels


def glu(x: torch.Tensor) -> torch.Tensor:
    """(..., 2D) -> (..., D): the first half times the sigmoid of the second."""
    kernels = cpu_kernels.get() if x.device.type == "cpu" and x.dtype == torch.float32 else None
    if kernels is None:
        return F.glu(x, dim=-1)
    return _GLU.apply(x.contiguous())


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return cpu_kernels.get().glu_forward(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return cpu_kernels.get().glu_backward(grad.contiguous(), x)
