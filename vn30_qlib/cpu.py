"""How many CPU threads a process should use, shared by the models and the loop (no torch import here)."""
from __future__ import annotations

import os


def cpu_threads() -> int:
    """``OMP_NUM_THREADS`` when set, else the cores this process may run on (a container's limit, not the host's)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
