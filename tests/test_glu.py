"""The gate kernel (residual + GLU(x + bias)) equals torch's ops, values and gradients, at widths that are and are
not a multiple of 16."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vn30_qlib.models.glu import glu

pytestmark = pytest.mark.usefixtures("built_kernels")  # on Linux with a compiler, a failed build fails


@pytest.mark.parametrize("shape", [(300, 128), (7, 21, 56), (5, 2), (3, 0, 8)])
def test_values_and_gradients_equal_torch_ops(shape):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 4).requires_grad_()  # sigmoids far into both tails too
    bias = torch.randn(shape[-1], requires_grad=True)
    residual = torch.randn(*shape[:-1], shape[-1] // 2, requires_grad=True)
    out, expected = glu(x, bias, residual), F.glu(x + bias, dim=-1) + residual
    assert out.grad_fn.name() == "_GLUBackward"
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(expected)
    for got, want in zip(torch.autograd.grad(out, [x, bias, residual], grad),
                         torch.autograd.grad(expected, [x, bias, residual], grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(glu(x), F.glu(x, dim=-1), rtol=1e-6, atol=1e-6)  # no bias, no residual


def test_an_odd_width_is_refused_and_torch_stands_in_where_the_kernels_do_not_run(monkeypatch):
    with pytest.raises(RuntimeError, match="last dimension must be even"):
        glu(torch.randn(4, 5))
    monkeypatch.setenv("VN30_CPU_KERNELS", "0")
    x, bias, residual = torch.randn(4, 6, requires_grad=True), torch.randn(6), torch.randn(4, 3)
    assert glu(x).grad_fn.name() == "GluBackward0"
    torch.testing.assert_close(glu(x, bias, residual), F.glu(x + bias, dim=-1) + residual)
