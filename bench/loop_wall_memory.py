"""How long does the full symbol loop take, and how much memory does it hold at its peak?

Runs ``vn30-qlib loop`` (the CLI a user runs) as a child process and samples, once a second, the memory of
the whole process tree (the loop and its workers, summed; RSS and PSS, see `tree_memory_bytes`). Prints wall time, peak RSS, the machine's
load average, and the mean data + fit + predict seconds per entry by model and mode (from each version's
metadata.json: the per-entry costs behind the README's estimate for larger universes).

    python bench/loop_wall_memory.py --provider ~/.qlib/qlib_data/vn30_real --store /tmp/loop/models --jobs 2 \
        workflows/tft_vn30.yaml workflows/lstm_vn30.yaml workflows/lgb_vn30.yaml
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def tree_memory_bytes(root: int) -> tuple[int, int]:
    """(RSS, PSS) summed over ``root`` and all its descendants, from /proc. RSS counts the pages a process
    shares with others (torch's and qlib's libraries, mapped by every worker) once per process; PSS splits
    each shared page among its users, so the PSS sum is the memory the loop really holds."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    rss = pss = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, pss


def entry_costs(store_root: str) -> str:
    """Per (model, mode): entries, mean and max of data + fit + predict seconds, from the latest versions."""
    import json

    costs: dict[tuple[str, str], list[float]] = {}
    for meta_path in Path(store_root).glob("*/**/latest"):
        meta = json.loads((meta_path.parent / meta_path.read_text().strip() / "metadata.json").read_text())
        costs.setdefault((meta["model"], meta["mode"]), []).append(sum(meta["timings"].values()))
    return "\n".join(f"{model} {mode}: {len(v)} entries, mean {sum(v) / len(v):.1f} s, max {max(v):.1f} s"
                     for (model, mode), v in sorted(costs.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflows", nargs="+")
    parser.add_argument("--provider", required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--symbols", nargs="+")
    args = parser.parse_args()
    command = [sys.executable, "-m", "vn30_qlib.cli", "loop", *args.workflows, "--provider", args.provider,
               "--store", args.store, "--jobs", str(args.jobs)] + (["--symbols", *args.symbols] if args.symbols else [])
    load_before = os.getloadavg()
    started = time.perf_counter()
    process = subprocess.Popen(command)
    peak_rss = peak_pss = 0
    loads = []
    while process.poll() is None:
        rss, pss = tree_memory_bytes(process.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        loads.append(os.getloadavg()[0])
        time.sleep(1.0)
    wall = time.perf_counter() - started
    print(f"command: {' '.join(command)}")
    print(f"exit code {process.returncode}; wall {wall / 60:.1f} min ({wall:.0f} s); peak of the process tree: "
          f"RSS sum {peak_rss / 2**30:.2f} GiB, PSS sum {peak_pss / 2**30:.2f} GiB; load average before {load_before[0]:.1f}, during: mean "
          f"{sum(loads) / max(len(loads), 1):.1f}, max {max(loads, default=0):.1f} ({os.cpu_count()} CPUs)")
    print(entry_costs(args.store))


if __name__ == "__main__":
    main()
