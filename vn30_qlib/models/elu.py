"""ELU as a CPU kernel: torch's CPU ELU takes about 2 ns a value on this project's machine, ~2 ms forward +
backward of a 256-row TFT training chunk (the dense GRNs' hidden layers); ``csrc/elu.cpp`` (`cpu_kernels`) takes
the vector exp over flat runs of values and saves only the output for the backward. Anywhere else (a GPU, another
dtype, no compiler, the kernels switched off) it is ``F.elu``; both agree to float32 rounding
(tests/test_elu.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vn30_qlib.models import cpu_kernels


def elu(x: torch.Tensor) -> torch.Tensor:
    """x above 0, exp(x) - 1 below (alpha 1)."""
    if not cpu_kernels.runs_on(x):
        return F.elu(x)
    return _ELU.apply(x.contiguous())


class _ELU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out = cpu_kernels.build().elu_forward(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return cpu_kernels.build().elu_backward(grad.contiguous(), out)
