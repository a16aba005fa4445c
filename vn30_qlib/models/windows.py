"""Sequence windows for the LSTM and TFT: for each (day t, instrument), that instrument's rows t-L+1 .. t.

Built in bulk from index arithmetic, not by per-item Python sampling: the panel is stored once as a float32
array sorted by (instrument, datetime), each wanted row becomes a vector of L positions into it, and a batch
gathers its windows with one fancy-indexing call. Memory is the panel plus an int32 index per wanted row,
never the full (rows x L x features) tensor. A window never crosses into another instrument and never
contains a row after t: positions before the instrument's first row repeat that first row.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


class SequenceWindows:
    """The panel ``features`` (index (datetime, instrument), every day of each instrument's span) as windows."""

    def __init__(self, features: pd.DataFrame, step_len: int):
        if step_len < 1:
            raise ValueError(f"step_len must be >= 1, got {step_len}")
        if list(features.index.names) != ["datetime", "instrument"]:
            raise ValueError(f"features must be indexed by (datetime, instrument), got {features.index.names}")
        ordered = features.sort_index(level=["instrument", "datetime"])
        self.step_len = step_len
        self.columns = list(features.columns)
        self.values = np.ascontiguousarray(ordered.to_numpy(dtype="float32"))
        instruments = ordered.index.get_level_values("instrument")
        self._position = pd.Series(np.arange(len(ordered)), index=ordered.index)
        codes, _ = pd.factorize(instruments)
        new_block = np.r_[True, codes[1:] != codes[:-1]]
        self._block_start = np.maximum.accumulate(np.where(new_block, np.arange(len(codes)), 0))

    def positions(self, index: pd.MultiIndex) -> np.ndarray:
        """int32 (len(index), step_len) rows of the stored panel: the window ending at each (datetime, instrument)."""
        ends = self._position.reindex(index).to_numpy()
        if np.isnan(ends.astype("float64")).any():
            missing = index[np.isnan(ends.astype("float64"))][:3].tolist()
            raise KeyError(f"rows not in the windowed panel, e.g. {missing}")
        ends = ends.astype("int64")
        offsets = np.arange(-self.step_len + 1, 1)
        positions = ends[:, None] + offsets[None, :]
        return np.maximum(positions, self._block_start[ends][:, None]).astype("int32")

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """float32 (batch, step_len, features) windows for rows of `positions`."""
        return self.values[positions]
