"""The sequence models' dropout: the keep rate and scale of torch's, masks fixed by torch's seed, gradients."""
from __future__ import annotations

import pytest
import torch

from vn30_qlib.models.dropout import LEVELS, Dropout


def masked_ones(p: float, seed: int, shape=(1000, 1000)) -> torch.Tensor:
    torch.manual_seed(seed)
    return Dropout(p).train()(torch.ones(shape))


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_keeps_one_minus_p_of_the_values_and_scales_them_to_keep_the_mean(p):
    out = masked_ones(p, seed=0)
    kept = out != 0
    sd = (p * (1 - p) / out.numel()) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sd
    scale = LEVELS / (LEVELS - round(p * LEVELS))
    assert torch.all(out[kept] == torch.tensor(scale))
    assert scale == pytest.approx(1 / (1 - p), rel=1e-4)


def test_torch_seed_fixes_the_mask():
    assert torch.equal(masked_ones(0.2, seed=3), masked_ones(0.2, seed=3))
    assert not torch.equal(masked_ones(0.2, seed=3), masked_ones(0.2, seed=4))


def test_masks_differ_between_calls_and_positions():
    torch.manual_seed(0)
    dropout = Dropout(0.5).train()
    first, second = dropout(torch.ones(64, 64)), dropout(torch.ones(64, 64))
    assert not torch.equal(first, second)
    assert not torch.equal(first[0], first[1])


def test_gradient_passes_through_kept_values_only():
    torch.manual_seed(0)
    x = torch.randn(200, 50, requires_grad=True)
    out = Dropout(0.3).train()(x)
    out.sum().backward()
    torch.testing.assert_close(x.grad * x.detach(), out.detach())


def test_identity_in_eval_mode_and_at_zero():
    x = torch.randn(10, 10)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)
