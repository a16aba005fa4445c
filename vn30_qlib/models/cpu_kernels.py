"""The package's C++ CPU kernels (``csrc/``), compiled on first use by torch's cpp_extension, and their one switch.

- ``variable_mix_*``: the TFT numeric variable selection's embedding, per-variable GRNs and weighted mix
  (`variable_mix`);
- ``numeric_embedding_*``: the TFT's numeric embedding x[..., v] * w[v] + b[v] (`numeric_embedding`);
- ``glu_*``: the TFT's gates, residual + GLU of a linear map's output and bias (`glu`);
- ``elu_*``: ELU (`elu`);
- ``lstm_layer_*``: one batch-first LSTM layer, the TFT's encoder and decoder (`lstm_layer`);
- ``dropout``: x times a dropout mask hashed from each value's position and a seed (`dropout.Dropout`).

Each computes what torch's ops compute (the same dropout masks too), so the switch changes speed, not the model:
the same seed gives the same fitted weights to float32 rounding with the kernels on or off. The switch is a model's
``cpu_kernels`` ("auto": run them where they build; "on": they must; "off": never), beaten by the environment
variable ``VN30_CPU_KERNELS`` (1 = on, 0 = off); `resolve` is the one place that reads both, and a model's fit
and predict run inside `use`. Code outside a model (tests, benchmarks) runs as "auto" unless inside `use`.

The first call compiles them (about 50 s with 2 cores; needs a C++ compiler) into
``~/.cache/torch_extensions/vn30_qlib``, one build per CPU kind, torch version and checkout; later processes load
that build, and a build killed halfway is redone by the next. Linux builds with OpenMP; macOS
(Apple's clang has no ``-fopenmp``) without, so there each kernel runs on one thread; Windows is not supported.
Where they cannot be built, "auto" warns once, in one line, and runs torch's ops.
"""
from __future__ import annotations

import contextvars
import hashlib
import os
import platform
import shutil
import sys
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Iterator

import filelock
import torch
from qlib.log import get_module_logger

SOURCES = sorted((Path(__file__).with_name("csrc")).glob("*.cpp"))
SETTINGS = ("auto", "on", "off")
ENVIRONMENT_VARIABLE = "VN30_CPU_KERNELS"
VARIABLE_WIDTH = 8  # the TFT's per-variable width (and per-variable GRN size), the only one the kernels compile
_build_errors: list[str] = []
_ENABLED: contextvars.ContextVar[bool | None] = contextvars.ContextVar("cpu_kernels_enabled", default=None)


def resolve(setting: str = "auto") -> bool:
    """Do the kernels run under a model's ``setting``? ``VN30_CPU_KERNELS`` (0/1), when set, beats it.

    "on" (or ``VN30_CPU_KERNELS=1``) where they cannot be built is an error saying why.
    """
    if setting not in SETTINGS:
        raise ValueError(f"cpu_kernels must be one of {SETTINGS}, got {setting!r}")
    override = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
    if override not in ("", "0", "1"):
        raise ValueError(f"{ENVIRONMENT_VARIABLE} must be 0 (off) or 1 (on), got {override!r}")
    if override:
        setting = "on" if override == "1" else "off"
    if setting == "off":
        return False
    if setting == "on" and build() is None:
        raise RuntimeError(f"the CPU kernels were asked for (cpu_kernels='on' or {ENVIRONMENT_VARIABLE}=1) but "
                           f"cannot run here: {unavailable_reason() or build_error()}")
    return build() is not None


@contextmanager
def use(setting: str) -> Iterator[bool]:
    """Within it the kernels run as ``setting`` resolves (`resolve`); yields that choice."""
    token = _ENABLED.set(resolve(setting))
    try:
        yield _ENABLED.get()
    finally:
        _ENABLED.reset(token)


def enabled() -> bool:
    """Do the kernels run here: as the enclosing `use` chose, else as "auto" resolves."""
    chosen = _ENABLED.get()
    return resolve("auto") if chosen is None else chosen


def runs_on(x: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """Do the kernels take ``x``: a CPU tensor of one of ``dtypes``, the kernels `enabled`?"""
    return x.device.type == "cpu" and x.dtype in dtypes and enabled()


def unavailable_reason() -> str | None:
    """Why the kernels cannot be built on this machine at all (an unsupported platform, no compiler), or None."""
    if sys.platform not in ("linux", "darwin"):
        return f"unsupported platform {sys.platform!r} (the kernels build with GCC or Clang on Linux and macOS)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found ({compiler!r} is not on PATH)"
    return None


def build_error() -> str | None:
    """The first line of the error the failed build raised, or None."""
    return _build_errors[-1] if _build_errors else None


@lru_cache(maxsize=None)
def build() -> ModuleType | None:
    """The compiled kernels, or None (with one one-line warning) where they cannot be built."""
    reason = unavailable_reason()
    if reason is None:
        try:
            return _load()
        except Exception as error:  # a compiler that fails: the torch-ops paths still work
            _build_errors.append(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
            reason = f"the build failed: {build_error()}"
    get_module_logger("vn30_qlib").warning(
        f"CPU kernels off, {reason}: the models run the same maths in torch's ops (same results, a TFT epoch about "
        f"2x slower on CPU); set {ENVIRONMENT_VARIABLE}=0 to silence this")
    return None


def _load() -> ModuleType:
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # torch runs `ninja` from PATH: the pip package's, in a venv not activated
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    name = f"vn30_cpu_kernels_{_build_kind()}"
    folder = build_folder(name)
    folder.mkdir(parents=True, exist_ok=True)
    # torch guards a build with a plain `lock` file that a process killed mid-build leaves behind, and every later
    # load then waits for it forever. Loads of this folder take this lock first (flock: freed when its holder dies),
    # so a torch `lock` found while holding it belongs to no running build.
    with filelock.FileLock(f"{folder}.load-lock"):
        (folder / "lock").unlink(missing_ok=True)
        return load(name=name, sources=[str(source) for source in SOURCES], build_directory=str(folder),
                    extra_cflags=_compile_flags(), extra_ldflags=["-fopenmp"] if sys.platform == "linux" else [])


def build_folder(name: str) -> Path:
    """Where the build ``name`` lives: torch's extensions folder (``TORCH_EXTENSIONS_DIR``, by default
    ``~/.cache/torch_extensions``), in a folder of this package's builds."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / "vn30_qlib" / name


def _compile_flags() -> list[str]:
    """Tuned for this CPU (the build is keyed by it, `_build_kind`); OpenMP threads on Linux only: Apple's clang
    has no ``-fopenmp``, so on macOS ATen's parallel loops in the kernels run on one thread."""
    native = "-mcpu=native" if sys.platform == "darwin" and platform.machine() == "arm64" else "-march=native"
    return ["-O3", native, "-fno-math-errno"] + (["-fopenmp"] if sys.platform == "linux" else [])


def _build_kind() -> str:
    """A short hash of this CPU's instruction-set flags, torch's version and the sources' folder: ``-march=native``
    code runs only on CPUs like the one that compiled it, a build links one torch, and torch's build file names the
    sources by path (another checkout's load would rebuild it); a home folder shared by machines, virtual
    environments or checkouts keeps one build per kind."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = f"{platform.machine()} {platform.processor()}"
    return hashlib.sha1(f"{flags} torch {torch.__version__} {SOURCES[0].parent}".encode()).hexdigest()[:10]
