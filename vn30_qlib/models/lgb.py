"""Qlib's LightGBM model with its kwargs checked (``module_path: vn30_qlib.models.lgb``, ``class: LGBModel``).

Qlib's ``LGBModel`` hands every kwarg it does not know to LightGBM, which only logs ``Unknown parameter`` and
trains with the default: a workflow's ``num_leavs: 210`` fits 31 leaves and nothing says so in the results.
"""
from __future__ import annotations

import ctypes
import functools
import json

from lightgbm import basic as lightgbm_basic
from qlib.contrib.model import gbdt

from vn30_qlib.models.kwargs_check import check_kwargs, constructor_kwargs

PARAMETERS_PAGE = "https://lightgbm.readthedocs.io/en/latest/Parameters.html"


@functools.cache
def lightgbm_parameter_names() -> frozenset[str]:
    """Every parameter name and alias the installed LightGBM accepts.

    Read through ``LGBM_DumpParamAliases`` of LightGBM's C API (the list LightGBM checks its own parameters
    against); the Python package has no public function for it.
    """
    library = lightgbm_basic._LIB
    size = ctypes.c_int64(0)
    buffer = ctypes.create_string_buffer(1 << 16)
    for _ in range(2):  # the second call gets a buffer of the size the first reported
        if library.LGBM_DumpParamAliases(ctypes.c_int64(len(buffer)), ctypes.byref(size), buffer) != 0:
            raise RuntimeError(f"LightGBM's LGBM_DumpParamAliases failed: {library.LGBM_GetLastError().decode()}")
        if size.value <= len(buffer):
            break
        buffer = ctypes.create_string_buffer(size.value)
    aliases = json.loads(buffer.value.decode("utf-8"))
    return frozenset(aliases) | {alias for names in aliases.values() for alias in names}


class LGBModel(gbdt.LGBModel):
    """``qlib.contrib.model.gbdt.LGBModel`` that refuses a kwarg which is neither its own nor a LightGBM
    parameter or alias, naming the nearest valid key."""

    def __init__(self, loss: str = "mse", early_stopping_rounds: int = 50, num_boost_round: int = 1000, **kwargs):
        own = constructor_kwargs(gbdt.LGBModel)
        check_kwargs("LGBModel", kwargs, set(own) | lightgbm_parameter_names(),
                     reference=f"{', '.join(own)} and LightGBM's parameters and their aliases ({PARAMETERS_PAGE})")
        super().__init__(loss=loss, early_stopping_rounds=early_stopping_rounds, num_boost_round=num_boost_round,
                         **kwargs)
