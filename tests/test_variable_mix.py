"""The fused CPU kernel of the TFT's numeric variable selection gives what torch's ops give: the same mix and
the same gradients for every input and parameter, the embedding's included (dropout too, with the kernel's
mask), deterministic whatever the thread count, with a dropout mask of the asked rate that the seed fixes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import same_on_one_and_two_threads

from vn30_qlib.models import cpu_kernels
from vn30_qlib.models import variable_mix as vm
from vn30_qlib.models.dropout import LEVELS
from vn30_qlib.models.tft.network import TemporalFusionNetwork, TFTBatch
from vn30_qlib.models.tft.sub_modules import (
    GatedResidualNetwork, NumericEmbedding, VariableSelectionNetwork, quantile_loss)

pytestmark = pytest.mark.usefixtures("built_kernels")  # on Linux with a compiler, a failed build fails
WIDTH = cpu_kernels.VARIABLE_WIDTH


def per_variable_grn(n_vars: int, dropout: float) -> GatedResidualNetwork:
    torch.manual_seed(0)
    grn = GatedResidualNetwork(WIDTH, WIDTH, WIDTH, dropout=dropout, n_groups=n_vars)
    with torch.no_grad():  # a norm away from its (1, 0) start, so its gradients are checked too
        grn.norm.weight.uniform_(0.5, 1.5)
        grn.norm.bias.uniform_(-0.5, 0.5)
    return grn


def embed(values, embedding):
    """The numeric embedding in torch's ops."""
    return values.unsqueeze(-1) * embedding.weight + embedding.bias


def torch_mix(embedded, weights, grn, mask):
    """The mix in torch's ops, with a given dropout mask in place of the GLU's own."""
    hidden = grn.fc_hidden(F.elu(grn.fc_input(embedded))) * mask
    return (weights.unsqueeze(-1) * grn.norm(embedded + F.glu(grn.gate.linear(hidden), dim=-1))).sum(-2)


def inputs(rows: int, n_vars: int):
    """values (rows, V), their embedding, and mix weights (rows, V)."""
    torch.manual_seed(1)
    values = torch.randn(rows, n_vars, requires_grad=True)
    embedding = NumericEmbedding(n_vars, WIDTH)
    with torch.no_grad():
        embedding.bias.normal_()
    weights = torch.softmax(torch.randn(rows, n_vars), dim=-1).requires_grad_()
    return values, embedding, weights


@pytest.mark.parametrize("rows", [37, 1024])  # 37: a last tile of 5 rows in the kernel's tiles of 16
def test_mix_and_gradients_equal_torch_ops_with_the_kernels_dropout_mask(rows):
    grn = per_variable_grn(n_vars=5, dropout=0.3).train()
    values, embedding, weights = inputs(rows, 5)
    embedded = embed(values, embedding)
    torch.manual_seed(7)
    fused = vm.fused_variable_mix(values, weights, embedding, grn)
    torch.manual_seed(7)  # the kernel's seed is the first draw after this
    mask = vm.kernel_dropout_mask(rows, 5, int(torch.randint(0, 2**63 - 1, ())), 0.3)
    expected = torch_mix(embedded, weights, grn, mask)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)

    leaves = [values, weights, *embedding.parameters(), *grn.parameters()]
    grad_out = torch.randn(rows, WIDTH)
    for got, want, leaf in zip(torch.autograd.grad(fused, leaves, grad_out),
                               torch.autograd.grad(expected, leaves, grad_out), leaves):
        assert got.shape == leaf.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_evaluation_uses_no_dropout_and_equals_the_grn_module():
    grn = per_variable_grn(n_vars=7, dropout=0.3).eval()
    values, embedding, weights = inputs(100, 7)
    embedded = embed(values, embedding)
    expected = (weights.unsqueeze(-1) * grn(embedded)).sum(-2)
    torch.testing.assert_close(vm.fused_variable_mix(values, weights, embedding, grn), expected, rtol=1e-5,
                               atol=1e-5)


def test_dropout_mask_keeps_one_minus_p_scaled_and_is_fixed_by_its_seed():
    rows, n_vars, p = 4096, 28, 0.1
    mask = vm.kernel_dropout_mask(rows, n_vars, seed=5, p=p)
    kept = mask != 0
    sd = (p * (1 - p) / mask.numel()) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sd
    assert torch.all(mask[kept] == LEVELS / (LEVELS - round(p * LEVELS)))
    assert torch.equal(mask, vm.kernel_dropout_mask(rows, n_vars, seed=5, p=p))
    other = vm.kernel_dropout_mask(rows, n_vars, seed=6, p=p)
    assert (other != mask).float().mean().item() > 0.1  # another seed: another mask, not a shifted copy
    # neighbouring values are not correlated (a weak hash would show here)
    flat = kept.flatten().float()
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()) < 0.01
    assert torch.equal(vm.kernel_dropout_mask(rows, n_vars, seed=5, p=0.0), torch.ones(rows, n_vars, WIDTH))


def test_same_result_bit_for_bit_with_one_or_two_threads():
    grn = per_variable_grn(n_vars=6, dropout=0.1).train()
    values, embedding, weights = inputs(500, 6)

    def mix_and_differentiate():
        torch.manual_seed(3)
        out = vm.fused_variable_mix(values, weights, embedding, grn)
        leaves = [values, weights, *embedding.parameters(), *grn.parameters()]
        return [out, *torch.autograd.grad(out.square().sum(), leaves)]

    same_on_one_and_two_threads(mix_and_differentiate)


def test_network_trains_the_same_through_the_kernel_or_torch_ops(monkeypatch):
    """The whole TFT in evaluation mode gives the same forecasts through either path, and its gradients agree."""
    torch.manual_seed(0)
    net = TemporalFusionNetwork(n_past=6, n_future=3, horizons=2, n_quantiles=3, hidden_size=16).eval()
    batch = TFTBatch(torch.randint(0, 2, (40, 2)), torch.randn(40, 5, 6), torch.randn(40, 2, 3))
    target, quantiles = torch.randn(40, 2), torch.tensor([0.1, 0.5, 0.9])

    def forecast_and_gradients():
        net.zero_grad()
        out = net(batch)
        quantile_loss(out, target, quantiles).backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    fused_out, fused_grads = forecast_and_gradients()
    monkeypatch.setenv("VN30_CPU_KERNELS", "0")
    torch_out, torch_grads = forecast_and_gradients()
    torch.testing.assert_close(fused_out, torch_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(fused_grads, torch_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_torch_ops_stand_in_where_the_kernel_does_not_apply():
    """Another width, or categorical inputs (no values): the variable selection still runs, in torch's ops."""
    torch.manual_seed(0)
    vsn = VariableSelectionNetwork(n_vars=3, variable_size=4, hidden_size=6).eval()
    values = torch.randn(10, 3)
    assert not vm.fused_fits(values, vsn.embedding, vsn.transform)
    selected, weights = vsn(values)
    expected = (weights.unsqueeze(-1) * vsn.transform(vsn.embedding(values))).sum(-2)
    torch.testing.assert_close(selected, vsn.project(expected))
    categorical = VariableSelectionNetwork(n_vars=3, variable_size=WIDTH, hidden_size=6, numeric=False).eval()
    embedded = torch.randn(10, 3, WIDTH)
    selected, weights = categorical(embedded)
    torch.testing.assert_close(selected, categorical.project((weights.unsqueeze(-1) * categorical.transform(embedded))
                                                             .sum(-2)))


def test_the_fused_kernel_equals_the_variable_selections_textbook_mix(monkeypatch):
    """The selection's output with the fused kernel (the default on a CPU) and in torch's ops (kernels off): the
    same values in eval mode, and in training the same dropout mask, so the same values too."""
    vsn = VariableSelectionNetwork(n_vars=5, variable_size=WIDTH, hidden_size=6, context_size=4, dropout=0.3)
    values, context = torch.randn(37, 3, 5), torch.randn(37, 1, 4)
    assert vm.fused_fits(values, vsn.embedding, vsn.transform)
    for train in (False, True):
        vsn.train(train)
        torch.manual_seed(3)
        fused = vsn(values, context)
        with cpu_kernels.use("off"):
            torch.manual_seed(3)
            textbook = vsn(values, context)
        for got, want in zip(fused, textbook):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_kernel_that_cannot_build_leaves_the_torch_ops(monkeypatch):
    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension 'vn30_cpu_kernels': c++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    cpu_kernels.build.cache_clear()
    try:
        assert cpu_kernels.build() is None
        assert "c++: command not found" in cpu_kernels.build_error()
        vsn = VariableSelectionNetwork(n_vars=3, variable_size=WIDTH, hidden_size=6).eval()
        values = torch.randn(10, 3)
        assert not vm.fused_fits(values, vsn.embedding, vsn.transform)
        selected, weights = vsn(values)
        torch.testing.assert_close(selected, vsn.project((weights.unsqueeze(-1) * vsn.transform(vsn.embedding(values)))
                                                         .sum(-2)))
    finally:
        cpu_kernels.build.cache_clear()
