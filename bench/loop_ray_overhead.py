"""What does Ray cost over the local process pool, for the same loop on this machine?

Runs the same per-symbol loop twice into fresh stores, in one process one after the other: ``--executor local
--jobs J`` and ``--executor ray --jobs J`` (a local Ray instance with J CPUs, started and stopped by the loop,
its start-up included in the wall time). Prints both wall times, their ratio, and the mean per-entry cost
(data + fit + predict from each version's metadata) that the README's 400-symbol estimate is built from.

    python bench/loop_ray_overhead.py --provider ~/.qlib/qlib_data/vn30_real --jobs 2 --symbols 10 workflows/lgb_vn30.yaml
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from vn30_qlib import store
from vn30_qlib.data.provider import read_instruments
from vn30_qlib.loop import run_loop


def timed_loop(workflows: list[str], provider: str, symbols: list[str], jobs: int, executor: str) -> tuple[float, Path]:
    store_root = Path(tempfile.mkdtemp(prefix=f"loop_{executor}_")) / "models"
    started = time.perf_counter()
    results = run_loop(workflows, provider, store_root, symbols=symbols, modes=["per_symbol"], jobs=jobs,
                       progress=False, executor=executor)
    wall = time.perf_counter() - started
    failed = [r for r in results if r["status"] != "done"]
    if failed:
        raise SystemExit(f"{executor}: {len(failed)} entries did not finish: {failed[0].get('error')}")
    return wall, store_root


def mean_entry_seconds(store_root: Path) -> float:
    costs = [sum(store.read_metadata(v)["timings"].values()) for v in store_root.glob("symbols/*/*/v0001")]
    return sum(costs) / len(costs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflows", nargs="+")
    parser.add_argument("--provider", required=True)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--symbols", type=int, default=10, help="the first N symbols of the provider's vn30 list")
    args = parser.parse_args()
    provider = str(Path(args.provider).expanduser())
    symbols = read_instruments(provider, "vn30")["symbol"].tolist()[: args.symbols]
    entries = len(symbols) * len(args.workflows)
    print(f"{entries} per-symbol entries ({len(symbols)} symbols x {', '.join(Path(w).name for w in args.workflows)}), "
          f"--jobs {args.jobs}, load average before {os.getloadavg()[0]:.1f}")
    local_wall, local_store = timed_loop(args.workflows, provider, symbols, args.jobs, "local")
    ray_wall, ray_store = timed_loop(args.workflows, provider, symbols, args.jobs, "ray")
    print(f"local: {local_wall:.1f} s ({local_wall * args.jobs / entries:.2f} worker-s per entry); "
          f"mean data+fit+predict per entry {mean_entry_seconds(local_store):.2f} s")
    print(f"ray:   {ray_wall:.1f} s ({ray_wall * args.jobs / entries:.2f} worker-s per entry); "
          f"mean data+fit+predict per entry {mean_entry_seconds(ray_store):.2f} s")
    print(f"ray / local wall: {ray_wall / local_wall:.2f}; load average after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
