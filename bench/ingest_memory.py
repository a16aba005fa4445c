"""Peak memory of `vn30-qlib data ingest` on a large export, and the wall time of the 30 shared exports.

    python bench/ingest_memory.py [--mb 50]

Builds, in a temp folder, one export of about ``--mb`` MB: the shared ACB.csv's rows repeated (a download
that re-appended the same block many times, as paginated vendors do), runs the ingest in a child process
and reads the child's peak resident memory with ``resource.getrusage(RUSAGE_CHILDREN)``. Targets: peak
<= 5x the input size; the 30 shared exports (+ the index) in <= 2 s end to end (the CLI in a child, imports
included). Linux/macOS only (``resource``).
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "vn30"
IMPORTS_ONLY = "import vn30_qlib.cli, vn30_qlib.data.ingest"


def peak_rss_mb_of(command: list[str]) -> float:
    """Run ``command`` to completion; the peak RSS of all children so far, in MB (run in increasing order)."""
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from vn30_qlib.cli import main; sys.exit(main(sys.argv[1:]))", *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=50.0, help="size of the large export in MB (default 50)")
    args = parser.parse_args()
    if not (SHARED / "prices").is_dir():
        raise SystemExit(f"needs the shared exports at {SHARED}")
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "big"
        source.mkdir()
        header, *rows = (SHARED / "prices" / "ACB.csv").read_text().splitlines(keepends=True)
        block = "".join(rows)
        copies = max(1, round(args.mb * 1e6 / len(block.encode())))
        with open(source / "ACB.csv", "w") as handle:
            handle.write(header)
            for _ in range(copies):
                handle.write(block)
        size_mb = (source / "ACB.csv").stat().st_size / 1e6

        baseline = peak_rss_mb_of([sys.executable, "-c", IMPORTS_ONLY])
        start = time.perf_counter()
        peak = peak_rss_mb_of(cli("data", "ingest", "--source", str(source), "--out", str(Path(tmp) / "big_provider")))
        big_seconds = time.perf_counter() - start

        start = time.perf_counter()
        subprocess.run(cli("data", "ingest", "--source", str(SHARED / "prices"), "--index",
                           str(SHARED / "index" / "VN30.csv"), "--out", str(Path(tmp) / "provider")),
                       check=True, stdout=subprocess.DEVNULL)
        shared_seconds = time.perf_counter() - start

    print(f"large export: {size_mb:.1f} MB ({copies} copies of ACB.csv's {len(rows)} rows), ingest {big_seconds:.1f} s")
    print(f"peak RSS: {peak:.0f} MB = {peak / size_mb:.1f}x the input (interpreter + imports alone: {baseline:.0f} MB)")
    print(f"30 shared exports + index, CLI in a child process: {shared_seconds:.2f} s")


if __name__ == "__main__":
    main()
