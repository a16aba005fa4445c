"""A handler's fitted processors as plain numbers, and a handler rebuilt from them without refitting.

A stored model's processors were fitted on its train years (e.g. the robust z-score's medians). Kept as numbers in
the version's metadata, they let ``vn30-qlib predict`` compute features for the last few weeks only instead of
for every day since the train start (the same features, so the same scores), with nothing loaded that runs code.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from qlib.data.dataset.handler import DataHandlerLP
from qlib.data.dataset.processor import Processor
from qlib.utils import init_instance_by_config

# the attributes each fitting processor sets in its fit (Qlib 0.9.7); a processor that does not override
# Processor.fit keeps no state
FITTED_ATTRIBUTES = {
    "RobustZScoreNorm": ("cols", "mean_train", "std_train"),
    "ZScoreNorm": ("cols", "mean_train", "std_train", "ignore"),
    "MinMaxNorm": ("cols", "min_val", "max_val", "ignore"),
}


def fitted_state(handler: DataHandlerLP) -> list[dict] | None:
    """Every processor's fitted state (infer processors, then learn processors), or None when one of them keeps a
    state this module cannot write as numbers."""
    states = []
    for processor in [*handler.infer_processors, *handler.learn_processors]:
        name = type(processor).__name__
        if name in FITTED_ATTRIBUTES:
            states.append({"class": name, **{attribute: _plain(getattr(processor, attribute))
                                             for attribute in FITTED_ATTRIBUTES[name]}})
        elif type(processor).fit is Processor.fit:
            states.append({"class": name})
        else:
            return None
    return states


def handler_with_state(config: dict, states: list[dict]) -> DataHandlerLP:
    """The handler ``config`` builds, its processors given ``states`` (`fitted_state`) instead of being fitted."""
    handler = init_instance_by_config({**config, "kwargs": {**config.get("kwargs", {}), "init_data": False}})
    processors = [*handler.infer_processors, *handler.learn_processors]
    if [type(p).__name__ for p in processors] != [state["class"] for state in states]:
        raise ValueError(f"stored processor states {[s['class'] for s in states]} do not match the handler's "
                         f"processors {[type(p).__name__ for p in processors]}")
    for processor, state in zip(processors, states):
        for attribute in FITTED_ATTRIBUTES.get(state["class"], ()):
            setattr(processor, attribute, _restored(attribute, state[attribute]))
    handler.setup_data(init_type=DataHandlerLP.IT_LS)
    return handler


def _plain(value: Any) -> Any:
    """What JSON holds: (group, name) column pairs as lists; arrays as their dtype and values (exact: a float32
    value is a float64 number, and goes back to the same float32)."""
    if isinstance(value, pd.Index):
        return [list(column) if isinstance(column, tuple) else column for column in value]
    array = np.asarray(value)
    return {"dtype": str(array.dtype), "values": array.tolist()}


def _restored(attribute: str, value: Any) -> Any:
    if attribute == "cols":
        return pd.MultiIndex.from_tuples([tuple(c) for c in value]) if value and isinstance(value[0], list) \
            else pd.Index(value)
    dtype = np.dtype(value["dtype"])
    if dtype.kind not in "fb":
        raise ValueError(f"a processor's {attribute} must hold floats or booleans, got dtype {dtype}")
    return np.asarray(value["values"], dtype=dtype)
