"""How long does ingesting the 30 shared VN30 exports (+ the index) take?  Target: <= 5 s on a 2-core machine.

    python bench/ingest_speed.py [--repeat 5]

Times the whole `vn30-qlib data ingest` path in-process (read, clean, report, write, atomic swap) and the
provider check; prints a Markdown table row for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

from vn30_qlib.data.ingest import ingest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "vn30"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if not (SHARED / "prices").is_dir():
        raise SystemExit(f"needs the shared exports at {SHARED}")
    timings = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            start = time.perf_counter()
            report = ingest(SHARED / "prices", Path(tmp) / "provider", index_file=SHARED / "index" / "VN30.csv")
            timings.append(time.perf_counter() - start)
    rows_read = sum(entry["rows_read"] for entry in report["symbols"].values())
    rows_kept = sum(entry["rows_kept"] for entry in report["symbols"].values())
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"files: {len(report['symbols'])}, rows read {rows_read}, kept {rows_kept}")
    print("| runs | median s | min s | max s |")
    print("|---|---|---|---|")
    print(f"| {args.repeat} | {statistics.median(timings):.2f} | {min(timings):.2f} | {max(timings):.2f} |")


if __name__ == "__main__":
    main()
