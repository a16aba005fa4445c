"""The shared fit set-up and epoch loop: which weights the loop leaves in the module after early stopping, what
a fit leaves of process-wide state (nothing), and how many threads a fit takes."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from vn30_qlib import cpu
from vn30_qlib.cpu import fit_threads
from vn30_qlib.models import cpu_kernels
from vn30_qlib.models.training import LoopConfig, adam, fit_epochs, fit_session, native_bf16


class HalvedInput(NamedTuple):
    """A batch input made of several tensors (as the TFT's is), split column-wise."""

    left: torch.Tensor
    right: torch.Tensor


class HalvesLinear(torch.nn.Linear):
    def forward(self, x: HalvedInput) -> torch.Tensor:
        return super().forward(torch.cat([x.left, x.right], 1))


class SharedInput(NamedTuple):
    """An input with a part computed from the parameters once per batch (as the TFT's static contexts are)."""

    x: torch.Tensor
    shared: torch.Tensor | None = None


class LinearOnShared(torch.nn.Module):
    """y = w . x + v . tanh(x A): ``tanh(x A)`` is the part a loop may compute once per batch (`share`)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.inner = torch.nn.Parameter(torch.randn(4, 3) * 0.5)
        self.outer = torch.nn.Linear(3, 1, bias=False)

    def share(self, x: SharedInput) -> SharedInput:
        return x._replace(shared=torch.tanh(x.x @ self.inner))

    def forward(self, x: SharedInput) -> torch.Tensor:
        shared = x.shared if x.shared is not None else self.share(x).shared
        return self.linear(x.x) + self.outer(shared)


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the weights after every step, and the learning rate each step used."""

    def __init__(self, params, lr: float):
        super().__init__(params, lr=lr)
        self.steps: list[list[torch.Tensor]] = []
        self.lrs: list[float] = []

    def step(self, closure=None):
        self.lrs.append(self.param_groups[0]["lr"])
        result = super().step(closure)
        self.steps.append([p.detach().clone() for p in self.param_groups[0]["params"]])
        return result


class Interrupted(Exception):
    """A fit stopped from outside (`fit_linear`'s ``interrupt_after``)."""


def fit_linear(average_best: int, n_epochs: int = 8, names_per_day: int = 8, chunk_rows: int | None = None,
               halved_input: bool = False, interrupt_after: int | None = None,
               **loop_options) -> tuple[torch.nn.Linear, list[dict], dict[int, dict]]:
    """A noisy linear fit with a large learning rate, so the valid IC moves up and down across epochs.
    ``loop_options``: further `LoopConfig` fields; ``interrupt_after``: raise `Interrupted` once this epoch ends
    (a killed fit).

    Returns the module as the loop left it, the history and each epoch's weights (seen by ``on_epoch``); the
    module's ``optimizer`` is a `RecordingSGD`."""
    torch.manual_seed(0)
    x, valid_x = torch.randn(256, 4), torch.randn(64, 4)
    w = torch.tensor([1.0, -0.5, 0.0, 0.0])
    y, valid_y = x @ w + 2 * torch.randn(256), valid_x @ w + 2 * torch.randn(64)
    valid_days = torch.arange(64) // names_per_day
    module = HalvesLinear(4, 1) if halved_input else torch.nn.Linear(4, 1)
    optimizer = module.optimizer = RecordingSGD(module.parameters(), lr=0.3)
    weights: dict[int, dict] = {}

    def batches():
        order = torch.randperm(256)
        return [(HalvedInput(x[take, :2], x[take, 2:]) if halved_input else x[take], y[take],
                 torch.zeros(len(take), dtype=torch.long)) for take in order.split(32)]

    def keep(epoch: int, row: dict) -> None:
        weights[epoch] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        if epoch == interrupt_after:
            raise Interrupted

    config = LoopConfig(n_epochs=n_epochs, early_stop=n_epochs, metric="ic", average_best=average_best,
                        on_epoch=keep, chunk_rows=chunk_rows, **loop_options)
    valid_input = HalvedInput(valid_x[:, :2], valid_x[:, 2:]) if halved_input else valid_x
    history = fit_epochs(module, optimizer, batches, lambda: module(valid_input), valid_y, valid_days,
                         lambda out, label, days: ((out.reshape(-1) - label) ** 2).mean(), config)
    return module, history, weights


def ranked_epochs(history: list[dict]) -> list[int]:
    return [row["epoch"] for row in sorted(history, key=lambda row: -row["valid_ic"])]


def test_restores_the_best_epoch_by_default():
    module, history, weights = fit_linear(average_best=1)
    best = ranked_epochs(history)[0]
    assert best != history[-1]["epoch"], "the planted noise should make a middle epoch the best"
    for name, value in module.state_dict().items():
        torch.testing.assert_close(value, weights[best][name], rtol=0, atol=0)


def test_average_best_restores_the_mean_of_the_best_epochs_weights():
    module, history, weights = fit_linear(average_best=3)
    top = ranked_epochs(history)[:3]
    for name, value in module.state_dict().items():
        expected = sum(weights[epoch][name] for epoch in top) / 3
        torch.testing.assert_close(value, expected)
        assert not torch.equal(value, weights[top[0]][name])


def test_average_best_and_chunk_rows_must_be_positive():
    with pytest.raises(ValueError, match="average_best"):
        fit_linear(average_best=0)
    with pytest.raises(ValueError, match="chunk_rows"):
        fit_linear(average_best=1, chunk_rows=0)


def moving_average(steps: list[list[torch.Tensor]], decay: float) -> list[torch.Tensor]:
    """The bias-corrected exponential moving average of the weights after each of ``steps``, from its formula."""
    factors = [decay ** (len(steps) - 1 - s) for s in range(len(steps))]
    return [sum(f * step[i] for f, step in zip(factors, steps)) / sum(factors) for i in range(len(steps[0]))]


def test_weight_average_validates_and_restores_the_moving_average_of_the_steps():
    """With ema_decay the valid IC is that of the averaged weights, the restored weights are the average at the
    best epoch, and training goes on from the raw weights (which the average does not replace)."""
    decay, steps_per_epoch = 0.8, 8
    module, history, weights = fit_linear(average_best=1, ema_decay=decay)
    steps = module.optimizer.steps
    best = ranked_epochs(history)[0]
    expected = moving_average(steps[:(best + 1) * steps_per_epoch], decay)
    for value, wanted in zip(module.parameters(), expected):
        torch.testing.assert_close(value.detach(), wanted)
    last = history[-1]["epoch"]
    raw = [weights[last][name] for name, _ in module.named_parameters()]
    for value, step_value in zip(raw, steps[-1]):
        torch.testing.assert_close(value, step_value, rtol=0, atol=0)  # on_epoch saw the raw weights
    plain_module, plain_history, _ = fit_linear(average_best=1)
    assert [row["valid_ic"] for row in history] != [row["valid_ic"] for row in plain_history]
    assert history[0]["train_loss"] == plain_history[0]["train_loss"], "the first epoch trains the same weights"


def test_plateau_schedule_halves_the_rate_after_two_epochs_without_a_better_valid_metric():
    module, history, _ = fit_linear(average_best=1, n_epochs=12, lr_schedule="plateau")
    lr, best, stalled, expected = 0.3, -np.inf, 0, []
    for row in history:
        expected.extend([lr] * 8)
        if row["valid_ic"] > best:
            best, stalled = row["valid_ic"], 0
        else:
            stalled += 1
        if stalled > 2:
            lr, stalled = lr / 2, 0
    assert expected[-1] < 0.3, "the noisy fit should stall at least once"
    np.testing.assert_allclose(module.optimizer.lrs, expected)
    constant, _, _ = fit_linear(average_best=1, n_epochs=12)
    assert set(constant.optimizer.lrs) == {0.3}


def test_cosine_schedule_anneals_the_rate_over_n_epochs_by_a_half_cosine():
    module, history, _ = fit_linear(average_best=1, n_epochs=12, lr_schedule="cosine")
    assert len(history) == 12
    expected = [0.3 * (1 + np.cos(np.pi * epoch / 12)) / 2 for epoch in range(12) for _ in range(8)]
    np.testing.assert_allclose(module.optimizer.lrs, expected)


@pytest.mark.parametrize("schedule", ["plateau", "cosine"])
def test_a_fit_with_averaging_and_a_schedule_resumes_exactly(tmp_path, schedule):
    options = {"ema_decay": 0.8, "lr_schedule": schedule, "checkpoint_path": tmp_path / "fit.pt"}
    straight, straight_history, _ = fit_linear(average_best=2, n_epochs=10, **{**options, "checkpoint_path": None})
    with pytest.raises(Interrupted):
        fit_linear(average_best=2, n_epochs=10, interrupt_after=4, **options)
    resumed, history, _ = fit_linear(average_best=2, n_epochs=10, resume=True, **options)
    assert history == straight_history
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, straight.state_dict()[name], rtol=0, atol=0)


def test_adam_without_weight_decay_steps_exactly_as_plain_adam_and_with_it_shrinks_the_weights():
    def trained(optimizer_for) -> list[torch.Tensor]:
        torch.manual_seed(0)
        module = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        optimizer = optimizer_for(module)
        for _ in range(50):
            x = torch.randn(32, 6)
            optimizer.zero_grad()
            ((module(x) - x[:, :1]) ** 2).mean().backward()
            optimizer.step()
        return [p.detach() for p in module.parameters()]

    plain = trained(lambda m: torch.optim.Adam(m.parameters(), lr=0.01))
    ours = trained(lambda m: adam(m, 0.01))
    assert all(torch.equal(a, b) for a, b in zip(plain, ours))
    decayed = trained(lambda m: adam(m, 0.01, weight_decay=5.0))
    assert sum(p.norm() for p in decayed) < 0.8 * sum(p.norm() for p in ours)


@pytest.mark.parametrize("options, refused", [({"ema_decay": 1.0}, "ema_decay"), ({"ema_decay": True}, "ema_decay"),
                                              ({"lr_schedule": "linear"}, "lr_schedule"),
                                              ({"weight_decay": -0.1}, "weight_decay")])
def test_bad_averaging_or_schedule_is_refused_when_the_model_is_made(options, refused):
    from vn30_qlib.models.lstm import LSTM
    from vn30_qlib.models.tft.model import TFT

    for model in (LSTM, TFT):
        with pytest.raises(ValueError, match=refused):
            model(**options)


def test_daily_ic_stopping_refuses_days_of_one_name():
    """A one-symbol fit has no cross-section: its daily IC would be 0 every epoch, so stopping on it is refused."""
    with pytest.raises(ValueError, match="no day here has two or more names"):
        fit_linear(average_best=1, names_per_day=1)


@pytest.mark.parametrize("halved_input", [False, True])
def test_chunked_batches_train_exactly_as_whole_ones(halved_input):
    """chunk_rows=5 (not a divisor of the batch of 32) runs each batch as 7 chunks: the same steps, weights and
    losses as whole batches, for a tensor input and a NamedTuple of tensors."""
    whole, whole_history, _ = fit_linear(average_best=1, halved_input=halved_input)
    chunked, chunked_history, _ = fit_linear(average_best=1, chunk_rows=5, halved_input=halved_input)
    for name, value in chunked.state_dict().items():
        torch.testing.assert_close(value, whole.state_dict()[name])
    for chunked_row, whole_row in zip(chunked_history, whole_history, strict=True):
        assert chunked_row["train_loss"] == pytest.approx(whole_row["train_loss"], rel=1e-5)


@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_a_part_shared_by_the_chunks_trains_exactly_as_computed_in_each(chunk_rows):
    """``shared_inputs`` computes part of each batch's input once, before its chunks: the same weights and losses as
    a fit whose module computes that part itself in every chunk."""

    def fit(shared_inputs: bool) -> tuple[dict, list[dict]]:
        torch.manual_seed(0)
        x, valid_x = torch.randn(96, 4), torch.randn(32, 4)
        y, valid_y = x[:, 0] - torch.tanh(x[:, 1]) + torch.randn(96), torch.randn(32)
        module = LinearOnShared()
        initial.append(module.inner.detach().clone())
        config = LoopConfig(n_epochs=3, early_stop=3, metric="loss", chunk_rows=chunk_rows,
                            shared_inputs=module.share if shared_inputs else None)

        def batches():
            return [(SharedInput(x[take]), y[take], torch.zeros(len(take), dtype=torch.long))
                    for take in torch.randperm(96).split(32)]

        history = fit_epochs(module, torch.optim.SGD(module.parameters(), lr=0.1), batches,
                             lambda: module(SharedInput(valid_x)), valid_y, torch.arange(32) // 8,
                             lambda out, label, days: ((out.reshape(-1) - label) ** 2).mean(), config)
        return module.state_dict(), history

    initial: list[torch.Tensor] = []
    (shared_state, shared_history), (own_state, own_history) = fit(True), fit(False)
    assert not torch.allclose(shared_state["inner"], initial[0])  # the shared part's weights did train
    for name, value in shared_state.items():
        torch.testing.assert_close(value, own_state[name])
    for shared_row, own_row in zip(shared_history, own_history, strict=True):
        assert shared_row["train_loss"] == pytest.approx(own_row["train_loss"], rel=1e-5)


def test_a_fit_session_leaves_no_process_wide_state_behind(monkeypatch):
    """Seeding, deterministic algorithms, the thread count and the kernel switch hold inside a fit only: after it
    the flags, torch's threads and the Python, NumPy and torch random streams are as they were."""
    torch.use_deterministic_algorithms(False)
    threads = torch.get_num_threads()
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    with fit_session(seed=0, device="cpu", n_threads=1, cpu_kernels="off") as session:
        assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1
        assert session.threads == 1 and not session.cpu_kernels and not cpu_kernels.enabled()
        inside = torch.rand(()).item()
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected
    with fit_session(seed=0, device="cpu", n_threads=1):
        assert torch.rand(()).item() == inside  # the seed fixes the stream inside


def test_a_missing_private_torch_api_reads_as_no_amx(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert native_bf16(torch.device("cpu")) is False

    def broken():
        raise RuntimeError("cpuinfo failed")

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", broken, raising=False)
    assert native_bf16(torch.device("cpu")) is False


def test_thread_counts_given_auto_and_refused(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert fit_threads(3) == 3 and fit_threads(0) == 8
    monkeypatch.setattr(cpu, "other_busy_processes", lambda: 0)
    assert fit_threads("auto") == 8  # alone: every core
    monkeypatch.setattr(cpu, "other_busy_processes", lambda: 1)
    assert fit_threads("auto") == 4  # one other busy process: half the cores each
    monkeypatch.setattr(cpu, "other_busy_processes", lambda: 20)
    assert fit_threads("auto") == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a loop worker's share wins over the load
    assert fit_threads("auto") == 2
    for bad in (-1, "many", 1.5, True):
        with pytest.raises(ValueError, match="n_threads must be 'auto', 0 .every core. or a thread count >= 1"):
            fit_threads(bad)


def test_busy_processes_are_counted_from_the_kernels_runnable_count(monkeypatch, tmp_path):
    """/proc/stat's procs_running counts this process too: 3 runnable -> 2 others (median of the samples)."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3\nprocs_running 3\nprocs_blocked 0\n")
    monkeypatch.setattr(cpu, "Path", lambda path: stat if path == "/proc/stat" else Path(path))
    assert cpu.other_busy_processes(samples=3, interval_s=0.0) == 2
    stat.write_text("procs_running 1\n")
    assert cpu.other_busy_processes(samples=1) == 0
