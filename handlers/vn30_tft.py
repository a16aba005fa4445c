"""The TFT's handler: a subset of VN30 Alpha158 as observed past inputs and one label per forecast horizon.

Known-future (calendar) and static (instrument, sector) inputs are not Qlib expressions; the model builds them
with `vn30_qlib.models.tft_inputs` from the provider's calendar and the VN30 sector table.
"""
from __future__ import annotations

from typing import Sequence

from handlers.vn30_alpha158 import LABEL, VN30Alpha158

# The K-bar shape of the day (where the close sits in the range) plus momentum, volatility, trend quality,
# price-volume correlation and volume dynamics at short and month-long windows.
TFT_FEATURES: tuple[str, ...] = (
    "KMID", "KLEN", "KUP", "KLOW", "KSFT", "KMID2", "KUP2", "KLOW2", "KSFT2",
    "ROC5", "ROC20", "MA5", "STD5", "STD20", "CORR20", "CORD5", "RSQR10", "RESI5", "VSTD5", "WVMA5",
)


def horizon_labels(horizons: int) -> tuple[list[str], list[str]]:
    """LABEL{h-1}: the return from close t+h to close t+h+1, h = 1..horizons (LABEL0 is VN30Alpha158's label)."""
    if horizons < 1:
        raise ValueError(f"horizons must be >= 1, got {horizons}")
    fields = [LABEL[0][0]] + [f"Ref($close, -{h + 1}) / Ref($close, -{h}) - 1" for h in range(2, horizons + 1)]
    return fields, [f"LABEL{h}" for h in range(horizons)]


class VN30TFT(VN30Alpha158):
    """VN30 Alpha158 inputs (``features``: `TFT_FEATURES` by default, None = all 158) with ``horizons`` labels.

    Processors are VN30Alpha158's: features robust-z-scored with train-segment statistics; each horizon's label
    z-scored across the day's names, as for LightGBM and the LSTM. The pinball loss on the raw return is
    dominated by the market's common move, which no per-stock input predicts (walk-forward harness on train +
    valid: Rank IC 0.0297 with the raw return against 0.0454 with this label; BENCHMARKS.md). To learn
    raw-return quantiles anyway pass ``learn_processors=[{"class": "DropnaLabel"}]``.
    """

    def __init__(
        self,
        features: Sequence[str] | None = TFT_FEATURES,
        horizons: int = 1,
        **kwargs,
    ):
        """``kwargs``: VN30Alpha158's (instruments, times, infer processors, ...), with its defaults."""
        super().__init__(features=None if features is None else list(features), label=horizon_labels(horizons),
                         **kwargs)
