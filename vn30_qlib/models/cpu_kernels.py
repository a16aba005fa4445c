"""The package's C++ CPU kernels (``csrc/``), compiled on first use by torch's cpp_extension.

- ``variable_mix_*``: the TFT numeric variable selection's embedding, per-variable GRNs and weighted mix
  (`variable_mix`);
- ``numeric_embedding_*``: the TFT's numeric embedding x[..., v] * w[v] + b[v] (`numeric_embedding`);
- ``glu_*``: the TFT's gates, residual + GLU of a linear map's output and bias (`glu`);
- ``elu_*``: ELU (`elu`);
- ``lstm_layer_*``: one batch-first LSTM layer, the TFT's encoder and decoder (`lstm_layer`);
- ``dropout``: x times a dropout mask hashed from each value's position and a seed (`dropout.Dropout`).

The first call compiles them (about 50 s with 2 cores; needs a C++ compiler) into ``~/.cache/torch_extensions``,
one build per CPU kind and torch version; later processes load that build. Where they cannot be built, `build`
returns None after one warning and the callers run the same maths in torch's ops, as they do everywhere while
``ENABLED`` is False (tests and benchmarks compare the two paths with it).
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch
from qlib.log import get_module_logger

SOURCES = sorted((Path(__file__).with_name("csrc")).glob("*.cpp"))
ENABLED = True
VARIABLE_WIDTH = 8  # the TFT's per-variable width (and per-variable GRN size), the only one the kernels compile


def get() -> ModuleType | None:
    """The kernels where they run: built, and ``ENABLED``; else None."""
    return build() if ENABLED else None


def runs_on(x: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """Do the kernels take ``x``: a CPU tensor of one of ``dtypes``, the kernels running (`get`)?"""
    return x.device.type == "cpu" and x.dtype in dtypes and get() is not None


@lru_cache(maxsize=None)
def build() -> ModuleType | None:
    """The compiled kernels, or None (with one warning) where they cannot be built."""
    from torch.utils.cpp_extension import load

    try:
        if shutil.which("ninja") is None:  # torch runs `ninja` from PATH: the pip package's, in a venv not activated
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        return load(name=f"vn30_cpu_kernels_{_build_kind()}", sources=[str(source) for source in SOURCES],
                    extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as error:  # no compiler, an unsupported platform: the torch-ops paths still work
        get_module_logger("vn30_qlib").warning(
            f"the CPU kernels (vn30_qlib/models/csrc) did not build, so the TFT's variable selection, embedding, "
            f"gates, ELUs and LSTM layers and the sequence models' dropout run in torch's ops, about 2x slower a "
            f"TFT epoch: {str(error).splitlines()[0]}")
        return None


def _build_kind() -> str:
    """A short hash of this CPU's instruction-set flags and torch's version: ``-march=native`` code runs only on
    CPUs like the one that compiled it, and a build links one torch; a home folder shared by different machines
    or virtual environments keeps one build per kind."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = f"{platform.machine()} {platform.processor()}"
    return hashlib.sha1(f"{flags} torch {torch.__version__}".encode()).hexdigest()[:10]
