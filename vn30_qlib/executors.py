"""Where the independent tasks of the symbol loop and the search run: local worker processes or a Ray cluster.

``run_calls(fn, calls, executor=...)`` runs ``fn(*args)`` for every ``args`` in ``calls`` and yields
``(index, result)`` as calls finish, in any order. A call whose worker process died (killed, out of memory)
yields ``(index, WorkerDied(...))`` instead of stopping the others; Ray first retries it ``max_retries``
times (a local pool cannot: its other pending calls fail with it, and are reported the same way). A call
that raises is a bug, not a lost worker: its exception propagates, as it would in-process.

- ``local``: ``jobs`` spawned processes on this machine, each told to use its share of the cores.
- ``ray``: one Ray task per call (1 CPU each, so Ray sets ``OMP_NUM_THREADS=1`` in its worker). With no
  ``ray_address`` a local Ray instance with ``jobs`` CPUs is started and stopped; with an address (``auto`` or
  ``host:6379``) the calls go to that cluster. Ray is an optional extra: ``pip install -e '.[ray]'``.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Any, Callable, Iterator, Sequence

from vn30_qlib.cpu import cpu_threads

EXECUTORS = ("local", "ray")
CHECK_TIMEOUT_S = 120
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class WorkerDied(RuntimeError):
    """The process running a call died before returning (after Ray's retries, if any)."""


class WorkerCannotSee(RuntimeError):
    """A worker (on some node) cannot read or write a path every worker needs."""


def missing_paths(readable: Sequence[str], writable: Sequence[str]) -> list[str]:
    """What this process cannot see: ``host: path`` lines, empty when everything is there."""
    host = socket.gethostname()
    problems = [f"{host}: cannot read {path}" for path in readable if not os.access(path, os.R_OK)]
    for path in writable:
        probe = path if os.path.exists(path) else os.path.dirname(path.rstrip("/")) or "."
        if not os.access(probe, os.W_OK):
            problems.append(f"{host}: cannot write {path}")
    return problems


def run_calls(fn: Callable, calls: Sequence[tuple], executor: str = "local", jobs: int = 1,
              ray_address: str | None = None, max_retries: int = 2, readable: Sequence[str] = (),
              writable: Sequence[str] = (), exclusive: Sequence[int] = ()) -> Iterator[tuple[int, Any]]:
    """Run ``fn(*args)`` for each of ``calls``; yields ``(index, result or WorkerDied)`` as they finish.

    ``exclusive``: indices of calls that must not run two at a time on this machine (the loop's pooled fits,
    each holding the whole panel); the local executor holds them back meanwhile. Ray ignores it: it places
    tasks by CPUs over a cluster's nodes.

    ``readable``/``writable``: paths every worker must see (provider, store); checked on every Ray node
    before the first call, so a node without them fails fast with :class:`WorkerCannotSee`, not a hang.
    """
    if executor == "local":
        yield from _run_local(fn, calls, jobs, set(exclusive))
    elif executor == "ray":
        yield from _run_ray(fn, calls, jobs, ray_address, max_retries, readable, writable)
    else:
        raise ValueError(f"unknown executor {executor!r}: use one of {EXECUTORS}")


def _start_local_worker(threads: int, parent_pid: int) -> None:
    """Give each worker its share of the cores: the torch models (``n_threads: 0``) and LightGBM
    (``num_threads: 0``) read ``OMP_NUM_THREADS``; two workers on all cores each would wait on each other.

    On Linux the worker also dies with the loop that started it: a driver killed by a signal cannot shut its
    pool down, and its workers would otherwise go on fitting, orphaned, holding cores and memory.
    """
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the driver died before the line above took effect
            os._exit(1)


def _run_local(fn: Callable, calls: Sequence[tuple], jobs: int, exclusive: set[int]) -> Iterator[tuple[int, Any]]:
    """Keeps ``jobs`` calls in flight, taking them in order, except that an ``exclusive`` call waits while
    another exclusive call runs (the next non-exclusive call goes first)."""
    threads = max(1, cpu_threads() // jobs)
    waiting, running = list(range(len(calls))), {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), initializer=_start_local_worker,
                             initargs=(threads, os.getpid())) as pool:
        while waiting or running:
            while waiting and len(running) < jobs:
                exclusive_running = any(index in exclusive for index in running.values())
                index = next((i for i in waiting if not (exclusive_running and i in exclusive)), None)
                if index is None:
                    break
                waiting.remove(index)
                try:
                    running[pool.submit(fn, *calls[index])] = index
                except BrokenProcessPool as error:  # the pool broke: nothing more can start in it
                    for lost in [index, *waiting]:
                        yield lost, WorkerDied(f"a local worker process died: {error}")
                    waiting.clear()
                    break
            if not running:
                continue
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                index = running.pop(future)
                try:
                    yield index, future.result()
                except BrokenProcessPool as error:
                    yield index, WorkerDied(f"a local worker process died: {error}")


def _import_ray():
    try:
        import ray
    except ImportError as error:
        raise RuntimeError("--executor ray needs Ray, an optional extra: pip install -e '.[ray]'") from error
    return ray


def _run_ray(fn: Callable, calls: Sequence[tuple], jobs: int, address: str | None, max_retries: int,
             readable: Sequence[str], writable: Sequence[str]) -> Iterator[tuple[int, Any]]:
    ray = _import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=jobs, include_dashboard=False, log_to_driver=False)
    try:
        if readable or writable:
            _check_every_node(ray, readable, writable)
        task = ray.remote(num_cpus=1, max_retries=max_retries)(fn)
        pending = {task.remote(*args): index for index, args in enumerate(calls)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            try:
                yield index, ray.get(done[0])
            except ray.exceptions.RayTaskError:
                raise  # the call itself raised: a bug to see, as it would be in a local process
            except ray.exceptions.RayError as error:  # its worker or node died, or it ran out of memory
                yield index, WorkerDied(f"Ray task lost after {max_retries} retries: {type(error).__name__}: {error}")
    finally:
        if started_here:
            ray.shutdown()


def _check_every_node(ray, readable: Sequence[str], writable: Sequence[str]) -> None:
    """Run `missing_paths` once on each alive node; raise with every problem found (or on a silent node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check = ray.remote(num_cpus=0)(missing_paths)
    refs = [check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
            .remote(list(readable), list(writable)) for node in ray.nodes() if node["Alive"]]
    try:
        problems = [line for lines in ray.get(refs, timeout=CHECK_TIMEOUT_S) for line in lines]
    except ray.exceptions.GetTimeoutError as error:
        raise WorkerCannotSee(f"a Ray node did not answer the path check within {CHECK_TIMEOUT_S} s") from error
    if problems:
        raise WorkerCannotSee("Ray workers cannot see paths every worker needs (share them at the same path on "
                              "every node, e.g. NFS):\n  " + "\n  ".join(problems))
