"""The GLU kernel equals torch's F.glu, values and gradients, at widths that are and are not a multiple of 16."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vn30_qlib.models import cpu_kernels
from vn30_qlib.models.glu import glu

pytestmark = pytest.mark.skipif(cpu_kernels.build() is None,
                                reason="the CPU kernels did not build here (no C++ compiler?)")


@pytest.mark.parametrize("shape", [(300, 128), (7, 21, 56), (5, 2), (3, 0, 8)])
def test_values_and_gradient_equal_torch_glu(shape):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 4).requires_grad_()  # sigmoids far into both tails too
    out, expected = glu(x), F.glu(x, dim=-1)
    assert out.grad_fn.name() == "_GLUBackward"
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(expected)
    (got,), (want,) = torch.autograd.grad(out, x, grad), torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_an_odd_width_is_refused_and_torch_stands_in_where_the_kernels_do_not_run(monkeypatch):
    with pytest.raises(RuntimeError, match="last dimension must be even"):
        glu(torch.randn(4, 5))
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    x = torch.randn(4, 6, requires_grad=True)
    assert glu(x).grad_fn.name() == "GluBackward0"
    torch.testing.assert_close(glu(x), F.glu(x, dim=-1))
