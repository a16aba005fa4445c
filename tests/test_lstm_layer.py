"""The LSTM-layer kernel equals torch's nn.LSTM: outputs, final state and every gradient."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vn30_qlib.models.lstm_layer import kernel_runs, lstm_layer

pytestmark = pytest.mark.usefixtures("built_kernels")  # on Linux with a compiler, a failed build fails


def _inputs(rows: int, steps: int, inputs: int, hidden: int):
    torch.manual_seed(0)
    lstm = nn.LSTM(inputs, hidden, batch_first=True)
    x = (torch.randn(rows, steps, inputs) * 2).requires_grad_()
    h0 = torch.randn(1, rows, hidden).requires_grad_()
    c0 = torch.randn(1, rows, hidden).requires_grad_()
    return lstm, x, h0, c0


# the TFT encoder's shape, its one-step decoder, and a hidden size that is not a multiple of the vector width
@pytest.mark.parametrize("rows,steps,inputs,hidden", [(256, 20, 64, 64), (37, 1, 64, 64), (5, 3, 7, 20)])
def test_outputs_and_gradients_equal_torch_lstm(rows, steps, inputs, hidden):
    lstm, x, h0, c0 = _inputs(rows, steps, inputs, hidden)
    out, (h, c) = lstm_layer(lstm, x, (h0, c0))
    assert out.grad_fn.name() == "_LSTMLayerBackward"
    want, (want_h, want_c) = lstm(x, (h0, c0))
    for got, expected in ((out, want), (h, want_h), (c, want_c)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    weights = [torch.randn_like(t) for t in (out, h, c)]
    inputs_ = [x, h0, c0, *lstm.parameters()]
    got = torch.autograd.grad(sum((t * w).sum() for t, w in zip((out, h, c), weights)), inputs_)
    expected = torch.autograd.grad(sum((t * w).sum() for t, w in zip((want, want_h, want_c), weights)), inputs_)
    for name, g, e in zip(["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"], got, expected):
        # the weights' gradients are sums over every row and step: float32 rounding relative to their scale
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * float(e.abs().max()),
                                   msg=lambda m: f"gradient of {name}: {m}")


def test_a_loss_on_the_sequence_alone_leaves_the_final_state_without_gradient():
    """The TFT's encoder output feeds a gate and its final state the decoder; a loss of the output alone gives
    the backward no gradient of h and c, which it must read as zero."""
    lstm, x, h0, c0 = _inputs(9, 4, 6, 16)
    (got,) = torch.autograd.grad(lstm_layer(lstm, x, (h0, c0))[0].square().sum(), [x])
    (expected,) = torch.autograd.grad(lstm(x, (h0, c0))[0].square().sum(), [x])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_torch_lstm_stands_in_where_the_kernel_does_not_run(monkeypatch):
    lstm, x, h0, c0 = _inputs(4, 3, 5, 8)
    two_layers = nn.LSTM(5, 8, num_layers=2, batch_first=True)
    assert kernel_runs(lstm, x) and not kernel_runs(two_layers, x)
    assert not kernel_runs(nn.LSTM(5, 8), x)  # time-major
    monkeypatch.setenv("VN30_CPU_KERNELS", "0")
    assert not kernel_runs(lstm, x)
    # a state sliced out of a wider tensor, as the TFT's static contexts are
    strided_h0 = torch.stack([h0[0], h0[0]], dim=1)[:, 0].unsqueeze(0)
    assert not strided_h0.is_contiguous()
    out, _ = lstm_layer(lstm, x, (strided_h0, c0))
    assert out.grad_fn.name() != "_LSTMLayerBackward"
    torch.testing.assert_close(out, lstm(x, (h0, c0))[0])


def test_a_second_backward_is_refused_not_computed_from_overwritten_gates():
    lstm, x, h0, c0 = _inputs(6, 4, 5, 16)
    out, _ = lstm_layer(lstm, x, (h0, c0))
    loss = out.square().sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once per forward"):
        loss.backward()
