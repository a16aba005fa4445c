"""What the sequence models (LSTM, TFT) share: the fit set-up (`fit_session`: device, threads, seed, CPU kernels,
all undone when fit returns), their labelled rows (`LabelledRows`), the model base class (`SequenceModel`) and the
epoch loop (`fit_epochs`): early stopping, checkpoints, resume, recorder metrics.

A model supplies three things: ``train_batches()`` (one epoch of ``(x, y, days)`` batches, in its own shuffled
order), ``predict_valid()`` (the module's output for every valid row, in the order of ``valid_label``) and
``loss_fn(output, y, days)``. ``days`` are integer day codes of the rows, so a loss or metric can work per day
(cross-sectional IC); losses that do not need them ignore them. The loop owns everything else, so both
models stop, checkpoint, resume and log the same way. On a CPU it runs each batch ``chunk_rows`` rows at a time;
a model may name the part of a batch's input its chunks share (``shared_inputs``: the TFT's static contexts), which
then runs forward once before the chunks and backward once after them.
"""
from __future__ import annotations

import contextvars
import copy
import os
import random
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
from qlib.data.dataset import DatasetH
from qlib.data.dataset.handler import DataHandlerLP
from qlib.log import get_module_logger
from qlib.model.base import Model
from qlib.workflow import R
from tqdm import tqdm

from vn30_qlib.cpu import THREADS_AUTO, fit_threads
from vn30_qlib.models import cpu_kernels as kernels

Batch = tuple  # (x, y, days): x is whatever the module takes, y and days tensors of one row each
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_METRIC_PREFIX = contextvars.ContextVar("metric_prefix", default="")


@dataclass(frozen=True)
class FitSession:
    """What `fit_session` chose: the device, torch's CPU threads and whether the CPU kernels run."""

    device: torch.device
    threads: int
    cpu_kernels: bool


@contextmanager
def fit_session(seed: int, device: str = "auto", n_threads: int | str = THREADS_AUTO,
                cpu_kernels: str = "auto") -> Iterator[FitSession]:
    """The set-up of a sequence model's fit, undone when it returns, so a fit changes no process-wide state.

    Within it: Python, NumPy and torch seeded with ``seed`` and torch asked for deterministic kernels (one seed, one
    CPU model), ``device`` picked (`pick_device`), torch on `fit_threads(n_threads)` threads, the CPU kernels as
    ``cpu_kernels`` resolves (`vn30_qlib.models.cpu_kernels.use`); the threads and kernels chosen go to the running
    recorder's params (``n_threads_used``, ``cpu_kernels_used``). After it: the random states, deterministic-
    algorithm flags and thread count as they were before.
    """
    chosen_device = pick_device(device)
    threads = fit_threads(n_threads)
    saved_threads = torch.get_num_threads()
    saved_flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                   torch.utils.deterministic.fill_uninitialized_memory)
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())), kernels.use(cpu_kernels) as kernels_run:
            torch.set_num_threads(threads)
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            torch.use_deterministic_algorithms(True, warn_only=True)
            # deterministic mode would also NaN-fill every new tensor (a debugging aid): 3.5x slower TFT steps on CPU
            torch.utils.deterministic.fill_uninitialized_memory = False
            _log_params(n_threads_used=threads, cpu_kernels_used="on" if kernels_run else "off")
            yield FitSession(chosen_device, threads, kernels_run)
    finally:
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_flags[0], warn_only=saved_flags[1])
        torch.utils.deterministic.fill_uninitialized_memory = saved_flags[2]
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def pick_device(device: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; ``"cpu"``/``"cuda"`` as named (CUDA must then exist)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device")
    return torch.device(device)


def native_bf16(device: torch.device) -> bool:
    """Is ``device`` a CPU with AMX tiles, which multiply bfloat16 matrices in hardware? There bf16 autocast made
    the LSTM's training step 1.4x faster (BENCHMARKS.md); a CPU without them would emulate bf16, slower. GPUs
    answer no: bf16 was never measured on one here (``precision: bfloat16`` asks for it explicitly)."""
    if device.type != "cpu":
        return False
    is_supported = getattr(torch.cpu, "_is_amx_tile_supported", None)  # a private API: absent in some versions
    try:
        return bool(is_supported()) if is_supported is not None else False
    except RuntimeError:
        return False


def adam(module: torch.nn.Module, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """Adam with decoupled weight decay (AdamW; with ``weight_decay`` 0 it is Adam, step for step) in torch's
    fused kernel (CPU and CUDA): one pass over every parameter instead of ~10 ops per tensor (the TFT's 123
    tensors: a step 0.9 ms instead of 4.3 ms on this project's CPU)."""
    return torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay, fused=True)


def daily_ic(pred: torch.Tensor, label: torch.Tensor, days: torch.Tensor) -> torch.Tensor:
    """Mean over days of the cross-sectional Pearson correlation of ``pred`` and ``label`` (1-d, same rows).

    Differentiable, so ``-daily_ic`` is a loss. Days with fewer than two rows or no spread are left out.
    """
    days = days.to(pred.device)
    _, days = torch.unique(days, return_inverse=True)
    n_days = int(days.max()) + 1 if len(days) else 0
    count = torch.zeros(n_days, dtype=pred.dtype, device=pred.device).index_add_(0, days, torch.ones_like(pred))

    def demean(values: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(n_days, dtype=values.dtype, device=values.device).index_add_(0, days, values)
        return values - (total / count)[days]

    p, y = demean(pred), demean(label)

    def per_day(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(n_days, dtype=values.dtype, device=values.device).index_add_(0, days, values)

    cov, var_p, var_y = per_day(p * y), per_day(p * p), per_day(y * y)
    valid = (count >= 2) & (var_p > 1e-12) & (var_y > 1e-12)
    if not valid.any():
        return pred.sum() * 0.0
    return (cov[valid] / torch.sqrt(var_p[valid] * var_y[valid])).mean()


def require_cross_sections(days: torch.Tensor, what: str) -> None:
    """The daily IC ranks names within a day: refuse rows where no day has two names (a one-symbol fit)."""
    counts = torch.unique(days, return_counts=True)[1]
    if not (counts >= 2).any():
        raise ValueError(f"{what} is a cross-sectional daily IC, but no day here has two or more names (a "
                         "one-symbol fit?): use metric='loss' / loss='mse'")


class CpuPickledModel:
    """Mixin for the Qlib models that hold a torch ``module``: what the recorder pickles loads anywhere.

    The weights are pickled as CPU tensors, so a model trained on a GPU loads on a machine without one, and
    rebuilt on load by the model's ``_build_module()``; the search's ``epoch_callback`` is never pickled.
    """

    def __getstate__(self) -> dict:
        state = {**self.__dict__, "epoch_callback": None}
        if self.module is not None:
            state["module"] = _cpu_state(self.module)
        return state

    def __setstate__(self, state: dict) -> None:
        weights = state.pop("module")
        self.__dict__.update(state)
        self.module = None
        if weights is not None:
            self._restore_module(weights)

    def _module_weights(self) -> dict[str, torch.Tensor]:
        """The fitted network's weights as CPU tensors (what the model store saves)."""
        if self.module is None:
            raise ValueError("the model is not fitted yet")
        return _cpu_state(self.module)

    def _restore_module(self, weights: dict[str, torch.Tensor]) -> None:
        """Rebuild ``module`` from CPU ``weights``, on the GPU when the model's ``device`` allows one."""
        module = self._build_module()
        module.load_state_dict(weights)
        device = torch.device("cuda" if self.device != "cpu" and torch.cuda.is_available() else "cpu")
        self.module = module.to(device).eval()


def segment_labels(dataset: DatasetH, segment: str) -> pd.DataFrame:
    """The learnt label (DK_L) of ``segment``'s rows whose every label column is finite; an error where none is."""
    label = dataset.prepare(segment, col_set="label", data_key=DataHandlerLP.DK_L)
    label = label[np.isfinite(label.to_numpy()).all(axis=1)]
    if label.empty:
        raise ValueError(f"segment {segment!r} has no labelled rows")
    return label


class LabelledRows:
    """One segment's labelled rows, ready for batching: their ``index``, the ``label`` tensor (the shape of
    ``label``'s values: (rows,) for a Series, (rows, columns) for a frame) and integer ``days`` codes."""

    def __init__(self, label: pd.Series | pd.DataFrame, device: torch.device, segment: str):
        self.index = label.index
        self.label = torch.tensor(label.to_numpy(dtype="float32"), device=device)
        codes, _ = pd.factorize(label.index.get_level_values("datetime"), sort=True)
        self.days = torch.as_tensor(codes, device=device)
        get_module_logger("fit").info(f"{segment}: {len(label)} rows, {codes.max() + 1} days")

    def __len__(self) -> int:
        return len(self.index)

    def batches(self, batch_size: int, by_day: bool = False) -> list[np.ndarray]:
        """A fresh random split of the rows into batches (NumPy's global RNG, which checkpoints restore).

        ``by_day``: batches are whole days (about ``batch_size`` rows each), for losses computed per day.
        """
        if not by_day:
            order = np.random.permutation(len(self))
            return np.array_split(order, max(1, int(np.ceil(len(order) / batch_size))))
        days = self.days.cpu().numpy()
        day_rank = np.random.permutation(days.max() + 1)[days]
        order = np.argsort(day_rank, kind="stable")
        per_day = np.bincount(day_rank)
        ends = np.cumsum(per_day)
        batch_of_day = (ends - 1) // batch_size
        cuts = ends[np.r_[batch_of_day[1:] != batch_of_day[:-1], False]]
        return np.split(order, cuts)


class SequenceModel(CpuPickledModel, Model):
    """The Qlib model side the LSTM and the TFT share: their training kwargs, the fit set-up and the training loop.

    A subclass's ``__init__`` takes its own kwargs and those whose defaults are its own (``lr``, ``batch_size``,
    ``n_epochs``, ``metric``, ``chunk_rows``) and passes them, with the rest (``**loop_options``), to this one; its
    ``fit`` runs inside `_fit_session`, builds ``module`` and calls `_train`; its ``predict`` runs inside
    `_predict_session`.

    ``early_stop``: epochs without a better valid ``metric`` before stopping; ``grad_clip``: the largest gradient
    norm (None: no clipping); ``seed``: one seed, one model (on one device kind); ``device``: "auto" (CUDA when
    there is one), "cpu" or "cuda"; ``checkpoint_dir``: where the per-epoch checkpoint goes (None: a temporary
    folder, removed after fit), ``resume=True`` continues from the checkpoint there; ``n_threads``: torch's CPU
    threads for the fit ("auto": `vn30_qlib.cpu.fit_threads`, a share of the cores when other processes keep them
    busy; 0 = every core; or a count); ``cpu_kernels``: "auto", "on" or "off" (`vn30_qlib.models.cpu_kernels`;
    ``VN30_CPU_KERNELS=0/1`` beats it): speed only, the same model either way. ``ema_decay``: validate, keep and
    restore the exponential moving average of the weights over training steps instead of the weights themselves
    (None: off); ``lr_schedule``: "plateau" halves the learning rate after 2 epochs without a better valid
    ``metric``, "cosine" anneals it to 0 over ``n_epochs`` by a half cosine, stepped per epoch (None: constant);
    ``weight_decay``: AdamW's decoupled decay of the weights per step (0: Adam).
    """

    checkpoint_name = "model.pt"

    def __init__(self, *, lr: float, batch_size: int, n_epochs: int, metric: str, chunk_rows: int | None,
                 early_stop: int = 10, grad_clip: float | None = 3.0, seed: int = 0, device: str = "auto",
                 checkpoint_dir: str | None = None, resume: bool = False, n_threads: int | str = THREADS_AUTO,
                 cpu_kernels: str = "auto", ema_decay: float | None = None, lr_schedule: str | None = None,
                 weight_decay: float = 0.0) -> None:
        LoopConfig(ema_decay=ema_decay, lr_schedule=lr_schedule)  # a bad value fails now, not after the data loaded
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs a checkpoint_dir to resume from")
        if cpu_kernels not in kernels.SETTINGS:
            raise ValueError(f"cpu_kernels must be one of {kernels.SETTINGS}, got {cpu_kernels!r}")
        if n_threads != THREADS_AUTO:
            fit_threads(n_threads)  # a bad count fails now, not after the data has loaded
        self.lr, self.batch_size, self.n_epochs, self.early_stop = lr, batch_size, n_epochs, early_stop
        self.metric, self.grad_clip, self.seed, self.device = metric, grad_clip, seed, device
        self.checkpoint_dir, self.resume = checkpoint_dir, resume
        self.n_threads, self.chunk_rows, self.cpu_kernels = n_threads, chunk_rows, cpu_kernels
        self.ema_decay, self.lr_schedule, self.weight_decay = ema_decay, lr_schedule, float(weight_decay)
        self.module: torch.nn.Module | None = None
        self.history: list[dict] = []
        self.epoch_callback = None  # set by `vn30-qlib tune` to prune by epoch; not a YAML key, never pickled

    def _fit_session(self):
        return fit_session(self.seed, self.device, self.n_threads, self.cpu_kernels)

    def _predict_session(self):
        return kernels.use(self.cpu_kernels)

    def _train(self, train: LabelledRows, valid: LabelledRows, batch_input: Callable[[np.ndarray], Any],
               predict_valid: Callable[[], torch.Tensor], loss_fn: LossFn, by_day: bool = False,
               point: Callable[[torch.Tensor], torch.Tensor] = lambda output: output.reshape(-1),
               point_label: Callable[[torch.Tensor], torch.Tensor] = lambda label: label.reshape(-1),
               **loop_options) -> None:
        """Fit ``module`` with `fit_epochs` on batches of ``train`` (``batch_input(rows)``: the module's input for
        those rows) and set ``history``; ``loop_options``: further `LoopConfig` fields. The checkpoint goes to
        ``checkpoint_dir`` (None: a temporary folder, removed after)."""
        optimizer = adam(self.module, self.lr, self.weight_decay)

        def train_batches():
            for rows in train.batches(self.batch_size, by_day):
                yield batch_input(rows), train.label[rows], train.days[rows]

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(self.checkpoint_dir).expanduser() if self.checkpoint_dir is not None else Path(tmp)
            config = LoopConfig(n_epochs=self.n_epochs, early_stop=self.early_stop, metric=self.metric,
                                grad_clip=self.grad_clip, checkpoint_path=folder / self.checkpoint_name,
                                resume=self.resume, on_epoch=self.epoch_callback, ema_decay=self.ema_decay,
                                lr_schedule=self.lr_schedule, **loop_options)
            self.history = fit_epochs(self.module, optimizer, train_batches, predict_valid, valid.label, valid.days,
                                      loss_fn, config, point, point_label)


@dataclass
class LoopConfig:
    """The loop's settings; a model fills them from its constructor kwargs."""

    n_epochs: int = 100
    early_stop: int = 10            # epochs without improvement of the valid metric before stopping
    metric: str = "loss"            # "loss": lower valid loss is better; "ic": higher mean daily valid IC
    grad_clip: float | None = 3.0   # max gradient norm; None = no clipping
    average_best: int = 1           # restore the mean of the weights of this many best epochs (1: the best one's)
    chunk_rows: int | None = None   # on CPU, forward/backward a batch this many rows at a time, for a loss that is
                                    # a mean over rows: the same gradient, from activations that stay in cache
    shared_inputs: Callable[[Any], Any] | None = None  # x -> x with what every chunk of the batch shares computed
                                    # once (the TFT's static contexts); its backward runs once, after the chunks'
    checkpoint_path: str | Path | None = None   # None = no checkpoint (and no resume)
    resume: bool = False            # continue from checkpoint_path if it exists
    on_epoch: Callable[[int, dict], None] | None = None   # called with each history row (a search prunes here)
    ema_decay: float | None = None  # validate and keep the steps' exponential moving average of the weights
    lr_schedule: str | None = None  # "plateau": halve the learning rate after 2 epochs without a better valid metric;
                                    # "cosine": anneal it to 0 over n_epochs by a half cosine, per epoch

    def __post_init__(self) -> None:
        decay = self.ema_decay
        if decay is not None and (isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1):
            raise ValueError(f"ema_decay must be None or a number inside (0, 1), got {self.ema_decay!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")


LR_SCHEDULES = (None, "plateau", "cosine")


class WeightAverage:
    """The exponential moving average of a module's floating-point weights over optimizer steps, bias-corrected
    as Adam's moments are (so the first steps are not pulled toward the initial weights): after step t its
    weights are ``sum_s decay^(t-s) w_s / sum_s decay^(t-s)``."""

    def __init__(self, module: torch.nn.Module, decay: float, state: dict | None = None):
        self.module, self.decay = module, decay
        self.names = [name for name, value in module.state_dict().items() if value.is_floating_point()]
        if state is None:
            self.sums = {name: torch.zeros_like(module.state_dict()[name]) for name in self.names}
            self.steps = 0
        else:
            self.sums = {name: state["sums"][name].to(module.state_dict()[name].device) for name in self.names}
            self.steps = int(state["steps"])

    def update(self) -> None:
        """Fold in the module's weights after an optimizer step."""
        weights = self.module.state_dict()
        with torch.no_grad():
            for name in self.names:
                self.sums[name].lerp_(weights[name], 1.0 - self.decay)
        self.steps += 1

    def weights(self) -> dict:
        """The averaged weights as a CPU state dict (other entries from the module)."""
        correction = 1.0 - self.decay ** self.steps
        return {name: (self.sums[name] / correction).cpu() if name in self.sums else value
                for name, value in _cpu_state(self.module).items()}

    def state(self) -> dict:
        return {"sums": {name: value.detach().cpu() for name, value in self.sums.items()}, "steps": self.steps}


def fit_epochs(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_batches: Callable[[], Iterable[Batch]],
    predict_valid: Callable[[], torch.Tensor],
    valid_label: torch.Tensor,
    valid_days: torch.Tensor,
    loss_fn: LossFn,
    config: LoopConfig,
    point: Callable[[torch.Tensor], torch.Tensor] = lambda output: output.reshape(-1),
    point_label: Callable[[torch.Tensor], torch.Tensor] = lambda label: label.reshape(-1),
) -> list[dict]:
    """Train ``module`` in place and leave it in its best epoch's state (or the mean of the weights of the
    ``config.average_best`` best epochs); return the per-epoch history.

    Each epoch: one pass over ``train_batches()``, then ``predict_valid()`` under ``no_grad`` in eval mode, the
    valid loss ``loss_fn(output, valid_label, valid_days)`` and the valid IC of ``point(output)`` (the point
    forecast; a quantile model passes its median) against ``point_label(valid_label)`` (a multi-horizon
    label passes its first horizon). History rows: ``epoch, train_loss, valid_loss, valid_ic``,
    also logged to the active Qlib recorder with ``step=epoch``. With ``checkpoint_path`` the state after every
    epoch (and the best state so far) is saved there, so ``resume=True`` continues an interrupted fit exactly.
    With ``config.ema_decay`` the weights validated, kept among the best and restored are the `WeightAverage`
    of the steps so far (training goes on from the raw weights); with ``config.lr_schedule`` "plateau" the
    learning rate halves after 2 epochs without a better valid metric, with "cosine" epoch e (from 0) trains at
    lr (1 + cos(pi e / n_epochs)) / 2.
    """
    if config.metric not in ("loss", "ic"):
        raise ValueError(f"metric must be 'loss' or 'ic', got {config.metric!r}")
    if config.average_best < 1:
        raise ValueError(f"average_best must be >= 1, got {config.average_best}")
    if config.chunk_rows is not None and config.chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1 or None, got {config.chunk_rows}")
    if config.metric == "ic":
        require_cross_sections(valid_days, "metric='ic'")
    logger = get_module_logger("fit_epochs")
    path = Path(config.checkpoint_path) if config.checkpoint_path is not None else None
    # best_states: (score, epoch, weights) of the average_best best epochs so far, best first; the first one
    # (the earliest on a tie) is the best epoch, which early stopping counts from
    scheduler = _lr_scheduler(optimizer, config)
    state = {"epoch": -1, "best_states": [], "history": [], "average": None, "scheduler": None}
    if config.resume and path is not None and path.is_file():
        state = {"average": None, "scheduler": None, **_load_checkpoint(path, module, optimizer)}
        logger.info(f"resumed from {path} after epoch {state['epoch']}")
    average = WeightAverage(module, config.ema_decay, state["average"]) if config.ema_decay is not None else None
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    best = state["best_states"]
    # a GPU wants whole batches and has no such cache: chunks only on CPU
    chunk_rows = config.chunk_rows if next(module.parameters()).device.type == "cpu" else None

    bar = tqdm(range(state["epoch"] + 1, config.n_epochs), desc="epoch", disable=not sys.stderr.isatty())
    for epoch in bar:
        if best and epoch - best[0][1] > config.early_stop:
            logger.info(f"early stop: no better valid {config.metric} for {config.early_stop} epochs")
            break
        train_loss = _train_one_epoch(module, optimizer, train_batches(), loss_fn, config.grad_clip, chunk_rows,
                                      config.shared_inputs, None if average is None else average.update)
        raw = None
        if average is not None:
            raw = copy.deepcopy(_cpu_state(module))
            module.load_state_dict(average.weights())
        module.eval()
        with torch.no_grad():
            output = predict_valid()
            valid_loss = float(loss_fn(output, valid_label, valid_days))
            valid_ic = float(daily_ic(point(output).double(), point_label(valid_label).double(), valid_days))
        row = {"epoch": epoch, "train_loss": train_loss, "valid_loss": valid_loss, "valid_ic": valid_ic}
        state["history"].append(row)
        _log_metrics(epoch, row)
        score = -valid_loss if config.metric == "loss" else valid_ic
        if np.isfinite(score) and (len(best) < config.average_best or score > best[-1][0]):
            best.append((score, epoch, copy.deepcopy(_cpu_state(module))))
            best.sort(key=lambda kept: -kept[0])  # stable: an equal later score never goes first
            del best[config.average_best:]
        if raw is not None:
            module.load_state_dict(raw)
        if config.lr_schedule == "plateau" and np.isfinite(score):
            scheduler.step(score)
        elif config.lr_schedule == "cosine":
            scheduler.step()
        improved = bool(best) and best[0][1] == epoch
        state["epoch"] = epoch
        state["average"] = None if average is None else average.state()
        state["scheduler"] = None if scheduler is None else scheduler.state_dict()
        bar.set_postfix(train=f"{train_loss:.4f}", valid=f"{valid_loss:.4f}", ic=f"{valid_ic:.4f}")
        logger.info(f"epoch {epoch}: train loss {train_loss:.5f}, valid loss {valid_loss:.5f}, valid IC {valid_ic:.4f}"
                    + (" (best)" if improved else "")
                    + (f", lr {optimizer.param_groups[0]['lr']:.2g}" if scheduler is not None else ""))
        if path is not None:
            _save_checkpoint(path, module, optimizer, state)
        if config.on_epoch is not None:
            config.on_epoch(epoch, row)

    if best:
        module.load_state_dict(_mean_state([weights for _, _, weights in best]))
        epochs = [epoch for _, epoch, _ in best]
        logger.info(f"restored {'the mean of epochs ' if len(epochs) > 1 else 'epoch '}"
                    f"{', '.join(map(str, epochs))} (best valid {config.metric})")
    module.eval()
    return state["history"]


def _lr_scheduler(optimizer: torch.optim.Optimizer, config: LoopConfig):
    """The torch scheduler of ``config.lr_schedule`` (None: a constant rate)."""
    if config.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2, threshold=0.0)
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.n_epochs)
    return None


def _train_one_epoch(module, optimizer, batches: Iterable[Batch], loss_fn: LossFn, grad_clip: float | None,
                     chunk_rows: int | None, shared_inputs: Callable[[Any], Any] | None,
                     after_step: Callable[[], None] | None = None) -> float:
    module.train()
    total, rows = 0.0, 0
    for x, y, days in batches:
        optimizer.zero_grad()
        shared: list[tuple[torch.Tensor, torch.Tensor]] = []
        if shared_inputs is not None:
            x = _cut_graph(shared_inputs(x), shared)
        batch_loss = 0.0
        for part in _chunks(len(y), chunk_rows):
            loss = loss_fn(module(_take_rows(x, part)), y[part], days[part]) * ((part.stop - part.start) / len(y))
            loss.backward()
            batch_loss += loss.item()
        reached = [(tensor, leaf.grad) for tensor, leaf in shared if leaf.grad is not None]
        if reached:
            torch.autograd.backward([tensor for tensor, _ in reached], [grad for _, grad in reached])
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step()
        total += batch_loss * len(y)
        rows += len(y)
    return total / max(rows, 1)


def _chunks(rows: int, chunk_rows: int | None) -> list[slice]:
    """``rows`` cut into consecutive slices of at most ``chunk_rows`` (one slice when None)."""
    step = chunk_rows or max(rows, 1)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _take_rows(x, part: slice):
    """The rows ``part`` of a batch input: a tensor, or a NamedTuple of tensors, NamedTuples or None (the TFT's
    `TFTBatch`)."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x[part]
    return type(x)(*(_take_rows(item, part) for item in x))


def _cut_graph(x, shared: list[tuple[torch.Tensor, torch.Tensor]]):
    """``x`` (as `_take_rows` takes it) with every tensor that carries a gradient replaced by a detached leaf, so
    the chunks' backwards stop there and sum into the leaves' ``grad``; ``shared`` collects (tensor, leaf)."""
    if x is None or (isinstance(x, torch.Tensor) and not x.requires_grad):
        return x
    if isinstance(x, torch.Tensor):
        leaf = x.detach().requires_grad_()
        shared.append((x, leaf))
        return leaf
    return type(x)(*(_cut_graph(item, shared) for item in x))


def _mean_state(states: list[dict]) -> dict:
    """Element-wise mean of floating-point weights; other entries (counters) are taken from the first state."""
    return {name: sum(state[name] for state in states) / len(states) if value.is_floating_point() else value
            for name, value in states[0].items()}


def _cpu_state(module: torch.nn.Module) -> dict:
    return {name: tensor.detach().cpu() for name, tensor in module.state_dict().items()}


@contextmanager
def metric_prefix(prefix: str):
    """Within it, the epoch metrics go to the recorder as ``{prefix}valid_ic`` etc. (the members of an ensemble
    fitted in one run)."""
    token = _METRIC_PREFIX.set(prefix)
    try:
        yield
    finally:
        _METRIC_PREFIX.reset(token)


def _recording() -> bool:
    """Is a Qlib experiment's recorder running (qrun)? A model fitted outside one logs nowhere."""
    exp_manager = getattr(R, "exp_manager", None)  # AttributeError (-> None) before qlib.init
    experiment = exp_manager.active_experiment if exp_manager is not None else None
    return experiment is not None and experiment.active_recorder is not None


def _log_metrics(epoch: int, row: dict) -> None:
    if _recording():
        prefix = _METRIC_PREFIX.get()
        R.log_metrics(step=epoch, **{prefix + key: value for key, value in row.items() if key != "epoch"})


def _log_params(**params) -> None:
    if _recording():
        prefix = _METRIC_PREFIX.get()
        R.log_params(**{prefix + key: value for key, value in params.items()})


def _save_checkpoint(path: Path, module, optimizer, state: dict) -> None:
    """Written beside the target and renamed, so an interruption mid-write leaves the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        **state,
        "module": _cpu_state(module),
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(), "python": random.getstate()},
    }
    partial = path.with_suffix(path.suffix + ".partial")
    torch.save(payload, partial)
    os.replace(partial, path)


def _load_checkpoint(path: Path, module, optimizer) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(payload.pop("module"))
    optimizer.load_state_dict(payload.pop("optimizer"))
    rng = payload.pop("rng")
    torch.set_rng_state(rng["torch"])
    name, key, position, has_gauss, cached_gaussian = rng["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    random.setstate(rng["python"])
    return payload


def _numpy_rng_state() -> tuple:
    """NumPy's global RNG state with its key as a tensor, so the checkpoint loads with ``weights_only=True``."""
    name, key, position, has_gauss, cached_gaussian = np.random.get_state()
    return name, torch.from_numpy(key.astype(np.int64)), int(position), int(has_gauss), float(cached_gaussian)
