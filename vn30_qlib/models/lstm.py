"""LSTM over each stock's last ``step_len`` days of handler features (``module_path: vn30_qlib.models.lstm``).

Qlib's ``pytorch_lstm_ts.LSTM`` reads windows one item at a time through ``TSDatasetH``; this one gathers a
whole batch of windows with one indexing call from ``SequenceWindows``, so an epoch costs little more than
the network itself. Windows come from the handler's full-span infer features (processors fitted on train
only) and end at day t: no row after t enters the prediction for t.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from qlib.data.dataset import DatasetH
from qlib.data.dataset.handler import DataHandlerLP
from qlib.log import get_module_logger
from qlib.model.base import Model

from vn30_qlib.cpu import cpu_threads
from vn30_qlib.models.dropout import Dropout
from vn30_qlib.models.kwargs_check import checked_kwargs
from vn30_qlib.models.training import (
    CpuPickledModel, LoopConfig, adam, daily_ic, fit_epochs, native_bf16, pick_device, require_cross_sections,
    set_seed)
from vn30_qlib.models.windows import SequenceWindows

LOSSES = ("mse", "ic")
PRECISIONS = ("auto", "float32", "bfloat16")


class LSTMNet(torch.nn.Module):
    """Stacked LSTM layers with dropout between them, read at the last step, then a linear score.

    One ``nn.LSTM`` per layer, not ``nn.LSTM(num_layers=...)``: its built-in dropout between layers draws the mask
    with torch's slow CPU ``bernoulli_``; `Dropout` here is the same dropout, drawn faster. The layers run
    time-major, (steps, rows, width), oneDNN's own layout: batch-first layers transpose every layer's input and
    output (and their gradients), 5 % of a training step.
    """

    def __init__(self, d_feat: int, hidden_size: int, num_layers: int, dropout: float, bidirectional: bool,
                 bf16: bool = False):
        super().__init__()
        width = hidden_size * (2 if bidirectional else 1)
        # the features are zero-padded to a multiple of 8: oneDNN's bf16 LSTM takes a slow path at odd input widths
        # (23 features: 3.2 ms a forward over 128 x 20 rows, against 1.9 ms at 24); the padded inputs are 0, so
        # their weights never act and get no gradient
        self.pad = -d_feat % 8
        self.layers = torch.nn.ModuleList(
            torch.nn.LSTM(d_feat + self.pad if layer == 0 else width, hidden_size, bidirectional=bidirectional)
            for layer in range(num_layers))
        self.dropout = Dropout(dropout)
        self.out = torch.nn.Linear(width, 1)
        self.bf16 = bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, steps, features) windows -> (rows,) scores."""
        x = F.pad(x, (0, self.pad)).transpose(0, 1)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            for depth, layer in enumerate(self.layers):
                x = layer(self.dropout(x) if depth else x)[0]
            return self.out(x[-1]).squeeze(-1).float()


@checked_kwargs
class LSTM(CpuPickledModel, Model):
    """LSTM on sequence windows of a ``DatasetH``; the number of features is read from the data.

    ``loss``: "mse" on the per-day z-scored label, or "ic" (minus the mean daily Pearson correlation within a
    batch; batches are then whole days). ``metric``: what early stopping watches on the valid segment, "loss"
    or "ic". ``checkpoint_dir``: where the per-epoch checkpoint goes (None: a temporary folder, removed after
    fit); ``resume=True`` continues from the checkpoint there. ``n_threads``: torch's CPU threads (0 = every core
    this process may use; 1 is much faster on a CPU shared with other jobs). ``chunk_rows``: on a CPU, each
    batch's forward and backward run this many rows at a time (twice as many in bfloat16; the "mse" loss only),
    so the LSTM's activations stay in cache; the gradient is the batch's (only the dropout draws differ).
    ``precision``: "float32", "bfloat16" (autocast: bf16 matmuls, float32 weights and optimizer) or "auto"
    (bfloat16 on a CPU that multiplies it in hardware, see `native_bf16`); fit records its choice in ``bf16``.
    """

    def __init__(
        self,
        d_feat: int | None = None,
        hidden_size: int = 64,
        num_layers: int = 2,
        dropout: float = 0.2,
        lr: float = 0.001,
        batch_size: int = 2048,
        n_epochs: int = 100,
        bidirectional: bool = False,
        step_len: int = 20,
        loss: str = "mse",
        early_stop: int = 10,
        metric: str = "loss",
        grad_clip: float | None = 3.0,
        seed: int = 0,
        device: str = "auto",
        checkpoint_dir: str | None = None,
        resume: bool = False,
        n_threads: int = 0,
        chunk_rows: int | None = 128,
        precision: str = "auto",
    ):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs a checkpoint_dir to resume from")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.d_feat, self.hidden_size, self.num_layers, self.dropout = d_feat, hidden_size, num_layers, dropout
        self.lr, self.batch_size, self.n_epochs, self.bidirectional = lr, batch_size, n_epochs, bidirectional
        self.step_len, self.loss, self.early_stop, self.metric = step_len, loss, early_stop, metric
        self.grad_clip, self.seed, self.device, self.resume = grad_clip, seed, device, resume
        self.checkpoint_dir, self.n_threads, self.chunk_rows = checkpoint_dir, n_threads, chunk_rows
        self.precision = precision
        self.bf16 = False  # what fit chose from `precision` on its device; the pickle keeps it
        self.module: LSTMNet | None = None
        self.history: list[dict] = []
        self.epoch_callback = None  # set by `vn30-qlib tune` to prune by epoch; not a YAML key, never pickled

    def fit(self, dataset: DatasetH, **kwargs) -> None:
        set_seed(self.seed)
        device = pick_device(self.device)
        torch.set_num_threads(self.n_threads or cpu_threads())   # torch may count the host's cores, not ours
        windows = self._windows(dataset)
        if self.d_feat is not None and self.d_feat != len(windows.columns):
            raise ValueError(f"d_feat={self.d_feat} but the handler gives {len(windows.columns)} features")
        self.d_feat = len(windows.columns)
        self.bf16 = self.precision == "bfloat16" or (self.precision == "auto" and native_bf16(device))
        train = _Rows(dataset, "train", windows, device)
        valid = _Rows(dataset, "valid", windows, device)
        if self.loss == "ic":
            require_cross_sections(train.days, "loss='ic'")
        self.module = self._build_module().to(device)
        optimizer = adam(self.module, self.lr)

        def train_batches():
            for rows in train.batches(self.batch_size, by_day=self.loss == "ic"):
                yield _to_tensor(windows.gather(train.positions[rows]), device), train.label[rows], train.days[rows]

        def predict_valid() -> torch.Tensor:
            return self._forward(windows, valid.positions, device)

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(self.checkpoint_dir).expanduser() if self.checkpoint_dir is not None else Path(tmp)
            config = LoopConfig(n_epochs=self.n_epochs, early_stop=self.early_stop, metric=self.metric,
                                grad_clip=self.grad_clip, checkpoint_path=folder / "lstm.pt", resume=self.resume,
                                on_epoch=self.epoch_callback, chunk_rows=self._chunk_rows())
            self.history = fit_epochs(self.module, optimizer, train_batches, predict_valid, valid.label, valid.days,
                                      self._loss, config)

    def predict(self, dataset: DatasetH, segment: str | slice = "test") -> pd.Series:
        if self.module is None:
            raise ValueError("the model is not fitted yet")
        index = dataset.prepare(segment, col_set="feature", data_key=DataHandlerLP.DK_I).index
        windows = self._windows(dataset)
        device = next(self.module.parameters()).device
        self.module.eval()
        with torch.no_grad():
            pred = self._forward(windows, windows.positions(index), device)
        return pd.Series(pred.cpu().numpy().astype("float64"), index=index, name="score")

    def _windows(self, dataset: DatasetH) -> SequenceWindows:
        features = dataset.handler.fetch(col_set="feature", data_key=DataHandlerLP.DK_I)
        return SequenceWindows(features, self.step_len)

    def _forward(self, windows: SequenceWindows, positions: np.ndarray, device: torch.device) -> torch.Tensor:
        """Scores for all ``positions`` in chunks (inference needs no gradients, so chunks can be large)."""
        chunk = max(self.batch_size, 8192)
        parts = [self.module(_to_tensor(windows.gather(positions[start:start + chunk]), device))
                 for start in range(0, len(positions), chunk)]
        return torch.cat(parts) if parts else torch.zeros(0, device=device)

    def _loss(self, output: torch.Tensor, label: torch.Tensor, days: torch.Tensor) -> torch.Tensor:
        if self.loss == "ic":
            return -daily_ic(output, label, days)
        return torch.mean((output - label) ** 2)

    def _chunk_rows(self) -> int | None:
        """Rows per forward/backward chunk: ``chunk_rows`` in float32, twice that in bfloat16 (the same bytes of
        activations: 256 bf16 rows ran 1.3x faster than 128, while 256 float32 rows ran 1.3x slower than 128)."""
        if self.chunk_rows is None or self.loss != "mse":
            return None
        return self.chunk_rows * (2 if self.bf16 else 1)

    def _build_module(self) -> LSTMNet:
        return LSTMNet(self.d_feat, self.hidden_size, self.num_layers, self.dropout, self.bidirectional, self.bf16)


class _Rows:
    """One segment's labelled rows: window positions, label and day code, ready for batching."""

    def __init__(self, dataset: DatasetH, segment: str, windows: SequenceWindows, device: torch.device):
        frame = dataset.prepare(segment, col_set=["feature", "label"], data_key=DataHandlerLP.DK_L)
        label = frame["label"].iloc[:, 0]
        label = label[np.isfinite(label.to_numpy())]
        if label.empty:
            raise ValueError(f"segment {segment!r} has no labelled rows")
        self.positions = windows.positions(label.index)
        self.label = torch.as_tensor(label.to_numpy(dtype="float32"), device=device)
        codes, _ = pd.factorize(label.index.get_level_values("datetime"), sort=True)
        self.days = torch.as_tensor(codes, device=device)
        get_module_logger("LSTM").info(f"{segment}: {len(label)} rows, {codes.max() + 1} days")

    def batches(self, batch_size: int, by_day: bool) -> list[np.ndarray]:
        """A fresh random split of the rows into batches (NumPy's global RNG, which checkpoints restore).

        ``by_day``: batches are whole days (about ``batch_size`` rows each), for losses computed per day.
        """
        if not by_day:
            order = np.random.permutation(len(self.positions))
            return np.array_split(order, max(1, int(np.ceil(len(order) / batch_size))))
        days = self.days.cpu().numpy()
        day_rank = np.random.permutation(days.max() + 1)[days]
        order = np.argsort(day_rank, kind="stable")
        per_day = np.bincount(day_rank)
        ends = np.cumsum(per_day)
        batch_of_day = (ends - 1) // batch_size
        cuts = ends[np.r_[batch_of_day[1:] != batch_of_day[:-1], False]]
        return np.split(order, cuts)


def _to_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(array).to(device, non_blocking=True)
