"""The ELU kernel equals torch's F.elu, values and gradient, across both branches and a partial last vector."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vn30_qlib.models.elu import elu

pytestmark = pytest.mark.usefixtures("built_kernels")  # on Linux with a compiler, a failed build fails


@pytest.mark.parametrize("shape", [(300, 64), (7, 21, 5), (3,), (0, 4)])
def test_values_and_gradient_equal_torch_elu(shape):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 5).requires_grad_()  # deep into the exp branch too
    out, expected = elu(x), F.elu(x)
    assert out.grad_fn.name() == "_ELUBackward"
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(expected)
    (got,), (want,) = torch.autograd.grad(out, x, grad), torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_torch_elu_stands_in_where_the_kernels_do_not_run(monkeypatch):
    monkeypatch.setenv("VN30_CPU_KERNELS", "0")
    x = torch.randn(4, 6, requires_grad=True)
    assert elu(x).grad_fn.name() == "EluBackward0"
