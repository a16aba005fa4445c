"""LSTM over each stock's last ``step_len`` days of handler features (``module_path: vn30_qlib.models.lstm``).

Qlib's ``pytorch_lstm_ts.LSTM`` reads windows one item at a time through ``TSDatasetH``; this one gathers a
whole batch of windows with one indexing call from ``SequenceWindows``, so an epoch costs little more than
the network itself. Windows come from the handler's full-span infer features (processors fitted on train
only) and end at day t: no row after t enters the prediction for t.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from qlib.data.dataset import DatasetH
from qlib.data.dataset.handler import DataHandlerLP

from vn30_qlib.models.dropout import Dropout
from vn30_qlib.models.kwargs_check import checked_kwargs
from vn30_qlib.models.training import (
    LabelledRows, SequenceModel, daily_ic, native_bf16, require_cross_sections, segment_labels)
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


_BF16_LSTM_RUNS: dict[str, bool] = {}


def bf16_lstm_runs(device_type: str) -> bool:
    """Can torch run a bfloat16-autocast LSTM here? oneDNN refuses to build one on CPUs without AVX512-BF16 or
    AMX (e.g. AMD Zen 3), with an opaque RuntimeError: probed once per device type on a tiny network."""
    if device_type not in _BF16_LSTM_RUNS:
        try:
            LSTMNet(2, 2, 1, 0.0, False, bf16=True).to(device_type)(torch.zeros(1, 1, 2, device=device_type))
            _BF16_LSTM_RUNS[device_type] = True
        except RuntimeError:
            _BF16_LSTM_RUNS[device_type] = False
    return _BF16_LSTM_RUNS[device_type]


@checked_kwargs
class LSTM(SequenceModel):
    """LSTM on sequence windows of a ``DatasetH``; the number of features is read from the data.

    ``loss``: "mse" on the per-day z-scored label, or "ic" (minus the mean daily Pearson correlation within a
    batch; batches are then whole days). ``metric``: what early stopping watches on the valid segment, "loss"
    or "ic". ``loop_options``: ``early_stop``, ``grad_clip``, ``seed``, ``device``, ``checkpoint_dir``, ``resume``,
    ``n_threads`` ("auto": a share of the cores when other jobs keep them busy), ``cpu_kernels``, ``ema_decay``,
    ``lr_schedule``, ``weight_decay``: see `SequenceModel`. ``chunk_rows``: on a CPU, each
    batch's forward and backward run this many rows at a time (twice as many in bfloat16; the "mse" loss only),
    so the LSTM's activations stay in cache; the gradient is the batch's (only the dropout draws differ).
    ``precision``: "float32", "bfloat16" (autocast: bf16 matmuls, float32 weights and optimizer) or "auto"
    (bfloat16 on a CPU that multiplies it in hardware, see `native_bf16`); fit records its choice in ``bf16``.
    """

    checkpoint_name = "lstm.pt"

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
        metric: str = "loss",
        chunk_rows: int | None = 128,
        precision: str = "auto",
        **loop_options,
    ):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        super().__init__(lr=lr, batch_size=batch_size, n_epochs=n_epochs, metric=metric, chunk_rows=chunk_rows,
                         **loop_options)
        self.d_feat, self.hidden_size, self.num_layers, self.dropout = d_feat, hidden_size, num_layers, dropout
        self.bidirectional, self.step_len, self.loss, self.precision = bidirectional, step_len, loss, precision
        self.bf16 = False  # what fit chose from `precision` on its device; the pickle keeps it

    def fit(self, dataset: DatasetH, **kwargs) -> None:
        with self._fit_session() as session:
            device = session.device
            windows = self._windows(dataset)
            if self.d_feat is not None and self.d_feat != len(windows.columns):
                raise ValueError(f"d_feat={self.d_feat} but the handler gives {len(windows.columns)} features")
            self.d_feat = len(windows.columns)
            self.bf16 = self.precision == "bfloat16" or (self.precision == "auto" and native_bf16(device))
            if self.bf16 and not bf16_lstm_runs(device.type):
                raise ValueError(f"precision='bfloat16': this {device.type.upper()}'s oneDNN cannot run a bfloat16 "
                                 "LSTM (it needs AVX512-BF16 or AMX); use precision 'auto' or 'float32'")
            train = LabelledRows(segment_labels(dataset, "train").iloc[:, 0], device, "train")
            valid = LabelledRows(segment_labels(dataset, "valid").iloc[:, 0], device, "valid")
            if self.loss == "ic":
                require_cross_sections(train.days, "loss='ic'")
            train_positions, valid_positions = windows.positions(train.index), windows.positions(valid.index)
            self.module = self._build_module().to(device)
            self._train(train, valid, lambda rows: _to_tensor(windows.gather(train_positions[rows]), device),
                        lambda: self._forward(windows, valid_positions, device), self._loss,
                        by_day=self.loss == "ic", chunk_rows=self._chunk_rows())

    def predict(self, dataset: DatasetH, segment: str | slice = "test") -> pd.Series:
        if self.module is None:
            raise ValueError("the model is not fitted yet")
        index = dataset.prepare(segment, col_set="feature", data_key=DataHandlerLP.DK_I).index
        windows = self._windows(dataset)
        device = next(self.module.parameters()).device
        self.module.eval()
        with torch.no_grad(), self._predict_session():
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


def _to_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(array).to(device, non_blocking=True)
