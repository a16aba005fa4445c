"""A one-layer, batch-first ``nn.LSTM`` run by a CPU kernel: the TFT's encoder and decoder.

oneDNN's LSTM layer (torch's CPU path) took about 18 ms forward + backward of the TFT encoder's (256, 20, 64) in a
training chunk on this project's CPU, most of it in its backward. ``csrc/lstm_layer.cpp`` (`cpu_kernels`) projects
every step's input in one matmul, runs each step as one small matmul and one vector pass over its gates, and
computes the backward's weight and input gradients as three matmuls over all steps; the backward writes its step
gradients over the gates the forward saved, so it runs once per forward (no ``retain_graph``). Same module, same
parameters (pickles load either way). Anywhere else (a GPU, another dtype, more layers, no compiler,
the kernels switched off) it is the module's own forward; both agree to float32 rounding
(tests/test_lstm_layer.py).
"""
from __future__ import annotations

import torch
from torch import nn

from vn30_qlib.models import cpu_kernels


def lstm_layer(lstm: nn.LSTM, x: torch.Tensor,
               state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``lstm(x, state)`` for a batch-first ``lstm``: x (rows, steps, inputs), state (h0, c0) each (1, rows, H)."""
    if not (kernel_runs(lstm, x) and state[0].dtype == torch.float32):
        return lstm(x, (state[0].contiguous(), state[1].contiguous()))
    h0, c0 = state
    out, h, c = _LSTMLayer.apply(x.contiguous(), h0[0].contiguous(), c0[0].contiguous(), lstm.weight_ih_l0,
                                     lstm.weight_hh_l0, lstm.bias_ih_l0, lstm.bias_hh_l0)
    return out, (h.unsqueeze(0), c.unsqueeze(0))


def kernel_runs(lstm: nn.LSTM, x: torch.Tensor) -> bool:
    """Does `lstm_layer` run ``lstm`` on ``x`` in the kernel (not ``lstm``'s own forward)?"""
    plain = (lstm.num_layers == 1 and lstm.batch_first and lstm.bias and not lstm.bidirectional
             and lstm.proj_size == 0)
    return plain and cpu_kernels.runs_on(x) and lstm.weight_ih_l0.dtype == torch.float32


class _LSTMLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh):
        out, h, c, gates, cells = cpu_kernels.build().lstm_layer_forward(x, h0, c0, w_ih, w_hh, b_ih + b_hh)
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, out, gates, cells)
        return out, h, c

    @staticmethod
    def backward(ctx, grad_out, grad_h, grad_c):
        if getattr(ctx, "gates_overwritten", False):
            raise RuntimeError("the LSTM kernel's backward overwrites the gates its forward saved, so it runs once per "
                               "forward: backward through it a second time (retain_graph=True) is not supported")
        ctx.gates_overwritten = True
        x, h0, c0, w_ih, w_hh, out, gates, cells = ctx.saved_tensors
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
        grad_h = torch.zeros_like(h0) if grad_h is None else grad_h.contiguous()
        grad_c = torch.zeros_like(c0) if grad_c is None else grad_c.contiguous()
        dx, dh0, dc0, dw_ih, dw_hh, db = cpu_kernels.build().lstm_layer_backward(
            grad_out, grad_h, grad_c, x, h0, c0, w_ih, w_hh, out, gates, cells)
        return dx, dh0, dc0, dw_ih, dw_hh, db, db
