"""The TFT's gate: a gated linear unit on a linear map's output, with that map's bias and the residual added
after it, as one CPU kernel: residual + (a + ca) * sigmoid(b + cb) for x = [a, b], bias = [ca, cb].

Torch's ``F.glu`` backward recomputes the sigmoid over the strided half b in a slow loop, and the bias and the
residual cost two more passes (addmm's copy of the bias into its output, the add): about 1.7 ms forward +
backward over a TFT chunk's (256, 21, 128) gate input on this project's CPU, three such gates a chunk.
``csrc/glu.cpp`` (`cpu_kernels`) reads each row's halves as vectors, takes a vector exp and adds the bias and the
residual on the way. Anywhere else (a GPU, another dtype, no compiler, the kernels switched off) the same sum
runs in torch's ops; both agree to float32 rounding (tests/test_glu.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vn30_qlib.models import cpu_kernels


def glu(x: torch.Tensor, bias: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """(..., 2D) -> (..., D): ``residual`` + the first half of ``x + bias`` times the sigmoid of its second half.

    ``bias`` (2D,) and ``residual`` (..., D) are optional (zero).
    """
    if not cpu_kernels.runs_on(x):
        out = F.glu(x if bias is None else x + bias, dim=-1)
        return out if residual is None else out + residual
    bias = x.new_zeros(x.shape[-1]) if bias is None else bias
    residual = x.new_zeros(*x.shape[:-1], x.shape[-1] // 2) if residual is None else residual
    return _GLU.apply(x.contiguous(), bias.contiguous(), residual.contiguous())


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, residual):
        ctx.save_for_backward(x, bias)
        return cpu_kernels.build().glu_forward(x, bias, residual)

    @staticmethod
    def backward(ctx, grad):
        x, bias = ctx.saved_tensors
        grad_x = cpu_kernels.build().glu_backward(grad.contiguous(), x, bias)
        grad_bias = grad_x.reshape(-1, x.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_bias, grad
