"""How long does the full symbol loop take, and how much memory does it hold at its peak?

Runs ``vn30-qlib loop`` (the CLI a user runs) as a child process and samples, once a second, the resident
memory of the whole process tree (the loop and its workers, summed). Prints wall time, peak RSS, the machine's
load average and the loop's own summary line; the per-entry timings are in each version's metadata.json.

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


def tree_rss_bytes(root: int) -> int:
    """Sum of VmRSS over ``root`` and all its descendants (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


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
    peak, loads = 0, []
    while process.poll() is None:
        peak = max(peak, tree_rss_bytes(process.pid))
        loads.append(os.getloadavg()[0])
        time.sleep(1.0)
    wall = time.perf_counter() - started
    print(f"command: {' '.join(command)}")
    print(f"exit code {process.returncode}; wall {wall / 60:.1f} min ({wall:.0f} s); peak RSS of the process tree "
          f"{peak / 2**30:.2f} GiB; load average before {load_before[0]:.1f}, during: mean "
          f"{sum(loads) / max(len(loads), 1):.1f}, max {max(loads, default=0):.1f} ({os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
