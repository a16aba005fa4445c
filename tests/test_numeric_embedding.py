"""The TFT's numeric embedding kernel equals torch's broadcasting ops, values and gradients, on any thread count;
torch's ops stand in at other widths and where the kernels do not run."""
from __future__ import annotations

import pytest
import torch
from conftest import same_on_one_and_two_threads

from vn30_qlib.models.numeric_embedding import numeric_embedding

pytestmark = pytest.mark.usefixtures("built_kernels")  # on Linux with a compiler, a failed build fails


def leaves(shape, n_vars=7, width=8):
    torch.manual_seed(0)
    return (torch.randn(*shape, n_vars, requires_grad=True), torch.randn(n_vars, width, requires_grad=True),
            torch.randn(n_vars, width, requires_grad=True))


@pytest.mark.parametrize("shape", [(37,), (3, 300)])  # 900 rows: four blocks of 256, the last one partial
def test_values_and_gradients_equal_torch_ops(shape):
    x, weight, bias = leaves(shape)
    out = numeric_embedding(x, weight, bias)
    expected = x.unsqueeze(-1) * weight + bias
    assert out.shape == (*shape, 7, 8)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn_like(expected)
    for got, want in zip(torch.autograd.grad(out, [x, weight, bias], grad_out),
                         torch.autograd.grad(expected, [x, weight, bias], grad_out)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_same_gradients_bit_for_bit_with_one_or_two_threads():
    x, weight, bias = leaves((2000,))

    def embed_and_differentiate():
        out = numeric_embedding(x, weight, bias)
        return [out, *torch.autograd.grad(out.square().sum(), [x, weight, bias])]

    same_on_one_and_two_threads(embed_and_differentiate)


def test_torch_ops_stand_in_where_the_kernels_do_not_run(monkeypatch):
    x, weight, bias = leaves((50,), width=5)  # another width
    out = numeric_embedding(x, weight, bias)
    assert out.grad_fn.name() == "AddBackward0"
    torch.testing.assert_close(out, x.unsqueeze(-1) * weight + bias)
    x, weight, bias = leaves((50,))
    monkeypatch.setenv("VN30_CPU_KERNELS", "0")
    out = numeric_embedding(x, weight, bias)
    assert out.grad_fn.name() == "AddBackward0"
    torch.testing.assert_close(out, x.unsqueeze(-1) * weight + bias)
