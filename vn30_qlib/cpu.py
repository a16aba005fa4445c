"""How many CPU threads a process should use, shared by the models and the loop (no torch import here)."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

THREADS_AUTO = "auto"


def cpu_threads() -> int:
    """``OMP_NUM_THREADS`` when set, else the cores this process may run on (a container's limit, not the host's)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fit_threads(n_threads: int | str) -> int:
    """The torch threads for a fit asked to use ``n_threads``: a count >= 1 as given; 0 every core (`cpu_threads`);
    "auto" ``OMP_NUM_THREADS`` when set (a loop worker's share), else the cores divided among this process and
    those keeping the CPU busy now (`other_busy_processes`).

    Why "auto" is the default: OpenMP threads spin while they wait for each other, so two fits on all cores of one
    CPU each ran 3.4x slower an epoch than one fit alone (the 2-core machine, BENCHMARKS.md); sharing the cores
    keeps each near its one-thread speed.
    """
    if n_threads == THREADS_AUTO:
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            return cpu_threads()
        return max(1, cpu_threads() // (1 + other_busy_processes()))
    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 0:
        raise ValueError(f"n_threads must be 'auto', 0 (every core) or a thread count >= 1, got {n_threads!r}")
    return n_threads or cpu_threads()


def other_busy_processes(samples: int = 5, interval_s: float = 0.05) -> int:
    """About how many other processes run on the CPU now: the kernel's count of runnable threads (Linux
    ``/proc/stat``, the median of a few samples, less this process), else the 1-minute load average less this one
    (macOS), else 0."""
    stat = Path("/proc/stat")
    if stat.is_file():
        counts = []
        for sample in range(samples):
            if sample:
                time.sleep(interval_s)
            line = next((line for line in stat.read_text().splitlines() if line.startswith("procs_running")), None)
            if line is None:
                break
            counts.append(int(line.split()[1]))
        if counts:
            return max(0, round(statistics.median(counts)) - 1)
    if hasattr(os, "getloadavg"):
        return max(0, round(os.getloadavg()[0]) - 1)
    return 0
