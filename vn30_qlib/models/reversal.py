"""The one-day reversal factor as a Qlib model: the reference a learnt model has to clear on the VN30, where most
of the LightGBMs' rank skill is short-term reversal (BENCHMARKS.md)."""
from __future__ import annotations

import pandas as pd
from qlib.data.dataset import DatasetH
from qlib.data.dataset.handler import DataHandlerLP
from qlib.model.base import Model


class OneDayReversal(Model):
    """Score = minus the day's close-to-close return: yesterday's losers first. Nothing is fitted; the dataset's
    first feature must be that return (``workflows/reversal_vn30.yaml`` defines it)."""

    def fit(self, dataset: DatasetH, **kwargs) -> None:
        """Nothing to learn."""

    def predict(self, dataset: DatasetH, segment: str = "test") -> pd.Series:
        returns = dataset.prepare(segment, col_set="feature", data_key=DataHandlerLP.DK_I)
        return -returns.iloc[:, 0]
