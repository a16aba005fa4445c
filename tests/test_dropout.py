"""The sequence models' dropout: the keep rate and scale of torch's, masks fixed by torch's seed, gradients,
the same mask in bfloat16 and on any thread count, and the same mask in torch's ops where the kernels are off."""
from __future__ import annotations

import pytest
import torch
from conftest import same_on_one_and_two_threads

from vn30_qlib.models import cpu_kernels
from vn30_qlib.models.dropout import LEVELS, Dropout, hashed_mask_kernel_fits

kernel = pytest.mark.usefixtures("built_kernels")


def masked_ones(p: float, seed: int, shape=(1000, 1000)) -> torch.Tensor:
    torch.manual_seed(seed)
    return Dropout(p).train()(torch.ones(shape))


@pytest.mark.parametrize("kernels", ["auto", "off"])
@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_keeps_one_minus_p_of_the_values_and_scales_them_to_keep_the_mean(p, kernels):
    with cpu_kernels.use(kernels):
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


def test_neighbouring_values_are_not_correlated():
    kept = (masked_ones(0.5, seed=0) != 0).flatten().float()
    assert abs(torch.corrcoef(torch.stack([kept[:-1], kept[1:]]))[0, 1].item()) < 0.01
    rows = kept.view(1000, 1000)
    assert abs(torch.corrcoef(torch.stack([rows[:-1].flatten(), rows[1:].flatten()]))[0, 1].item()) < 0.01


def test_bfloat16_gets_the_float32_mask_and_keeps_its_dtype():
    x = torch.randn(300, 70)
    torch.manual_seed(2)
    out = Dropout(0.2).train()(x)
    torch.manual_seed(2)
    out_bf16 = Dropout(0.2).train()(x.bfloat16())
    assert out_bf16.dtype == torch.bfloat16
    assert torch.equal(out_bf16 != 0, out != 0)
    torch.testing.assert_close(out_bf16.float(), out, rtol=1e-2, atol=0)


@kernel
def test_same_mask_on_one_or_two_threads_and_for_a_transposed_input():
    x = torch.randn(500, 300)

    def masked():
        torch.manual_seed(4)
        return [Dropout(0.3).train()(x)]

    same_on_one_and_two_threads(masked)
    torch.manual_seed(4)
    transposed = Dropout(0.3).train()(x.t())  # not contiguous: masked in its own (row-major) order
    assert transposed.shape == (300, 500)
    torch.testing.assert_close(transposed[transposed != 0], (x.t()[transposed != 0] / 0.7), rtol=1e-4, atol=0)


@kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_ops_apply_the_kernels_mask_where_the_kernels_are_off(monkeypatch, dtype):
    """One seed, one mask, whether the C++ kernel or torch's ops apply it: outputs and gradients equal bit for bit
    (so a fit is the same model with the kernels on or off, and on a GPU)."""
    x = torch.randn(401, 33, dtype=dtype)

    def masked() -> tuple[torch.Tensor, torch.Tensor]:
        leaf = x.clone().requires_grad_()
        torch.manual_seed(5)
        out = Dropout(0.25).train()(leaf)
        (out.float() * torch.arange(out.numel()).view(out.shape)).sum().backward()
        return out.detach(), leaf.grad

    assert hashed_mask_kernel_fits(x)
    with_kernel = masked()
    monkeypatch.setenv("VN30_CPU_KERNELS", "0")
    assert not hashed_mask_kernel_fits(x)
    for got, want in zip(masked(), with_kernel):
        assert torch.equal(got, want)
