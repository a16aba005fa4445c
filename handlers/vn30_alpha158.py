"""Alpha158 on VN30: Qlib's 158 price/volume factors, a t+1 -> t+2 close-to-close label, train-fitted processors.

VN-specific adaptations:
- ``VWAP0`` (``$vwap / $close``) reads the provider's ``$vwap``, which VN exports cannot give: it is the typical
  price (high + low + close) / 3 (see README, "Derived fields"), so VWAP0 is a proxy, not a traded-value VWAP.
- Days without trades are missing bars (NaN), never zero-volume bars, so the volume factors (VMA, VSTD, WVMA,
  VSUMP, ...) are computed over days that really traded.
"""
from __future__ import annotations

from typing import Sequence

from qlib.contrib.data.handler import check_transform_proc
from qlib.contrib.data.loader import Alpha158DL
from qlib.data.dataset.handler import DataHandlerLP

LABEL = (["Ref($close, -2) / Ref($close, -1) - 1"], ["LABEL0"])

# Learn: drop rows without a label, z-score the label per day (30 names, so the model learns cross-sectional
# ranking, not the market's level). Infer: inf -> NaN, robust z-score fitted on the train segment only, clipped at +-3,
# then NaN -> 0 so that neural networks can read every row (LightGBM is unaffected by either step's order).
DEFAULT_LEARN_PROCESSORS = [
    {"class": "DropnaLabel"},
    {"class": "CrossSectionalZScore", "module_path": "handlers.processors", "kwargs": {"fields_group": "label"}},
]
DEFAULT_INFER_PROCESSORS = [
    {"class": "InfToNan", "module_path": "handlers.processors", "kwargs": {"fields_group": "feature"}},
    {"class": "RobustZScoreNorm", "kwargs": {"fields_group": "feature", "clip_outlier": True}},
    {"class": "Fillna", "kwargs": {"fields_group": "feature"}},
]


def alpha158_feature_config(features: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """Alpha158's (expressions, names), restricted to ``features`` (names, in the order given) when set."""
    fields, names = Alpha158DL.get_feature_config(
        {"kbar": {}, "price": {"windows": [0], "feature": ["OPEN", "HIGH", "LOW", "VWAP"]}, "rolling": {}}
    )
    if features is None:
        return fields, names
    by_name = dict(zip(names, fields))
    unknown = [name for name in features if name not in by_name]
    if unknown:
        raise KeyError(f"unknown Alpha158 feature name(s) {unknown}; valid names are e.g. {names[:8]} ... (158 in all)")
    return [by_name[name] for name in features], list(features)


class VN30Alpha158(DataHandlerLP):
    """Alpha158 features for the VN30 universe with the label "signal at t, trade at the t+1 close".

    ``features``: a subset of the Alpha158 names (None = all 158), so sequence models can reuse the handler.
    Processors whose kwargs take ``fit_start_time``/``fit_end_time`` are fitted on that (train) window only.
    """

    def __init__(
        self,
        instruments: str | list = "vn30",
        start_time=None,
        end_time=None,
        fit_start_time=None,
        fit_end_time=None,
        features: Sequence[str] | None = None,
        label: tuple[list[str], list[str]] = LABEL,
        infer_processors: list = DEFAULT_INFER_PROCESSORS,
        learn_processors: list = DEFAULT_LEARN_PROCESSORS,
        process_type: str = DataHandlerLP.PTYPE_A,
        **kwargs,
    ):
        data_loader = {
            "class": "QlibDataLoader",
            "kwargs": {"config": {"feature": alpha158_feature_config(features), "label": list(label)}, "freq": "day"},
        }
        super().__init__(
            instruments=instruments,
            start_time=start_time,
            end_time=end_time,
            data_loader=data_loader,
            infer_processors=check_transform_proc(infer_processors, fit_start_time, fit_end_time),
            learn_processors=check_transform_proc(learn_processors, fit_start_time, fit_end_time),
            process_type=process_type,
            **kwargs,
        )
