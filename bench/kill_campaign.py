"""Fault campaign: SIGKILL `vn30-qlib data ingest` and `vn30-qlib loop` at random moments and check, after each
kill and after the run that follows it, the guarantees the README states.

Ingest (the shared real exports; skipped with a message when ../shared is absent): a first run writes the
reference provider; then, ``--ingest-kills`` times, an ingest of the same exports into the same ``--out`` is
killed at a uniform random moment of its measured duration, and re-run to the end. Invariants:
- right after the kill, ``--out`` holds a complete provider, byte-identical to the reference;
- after the re-run, it still does, and nothing else is left beside it (no ``.writing-*`` / ``.old-*``).

Loop (the simulated market, 4 symbols, LightGBM and a 2-epoch one-thread LSTM, per-symbol and pooled: 10
entries): runs into one store, each to be killed at a uniform random moment of a full run's duration, until
``--loop-kills`` of them were killed mid-run; a run that finishes before its kill (a resumed run has less left to
do) ends a round (the store is checked complete and started anew) and does not count as a kill.
Invariants after every run:
- every version stored before it is still there, byte for byte (finished entries are never retrained);
- no entry holds two versions (nothing stored twice);
- every new version validates (``vn30-qlib validate``: reloaded, it re-predicts its stored predictions);
- after a run that finished: all 10 entries are stored and no temporary folder is left in the store.

    python bench/kill_campaign.py                      # 100 ingest runs killed at random, 30 loop kills
    python bench/kill_campaign.py --ingest-kills 10 --loop-kills 5 --seed 1
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_VN30 = REPO.parent / "shared" / "data" / "vn30"
VERSION = re.compile(r"v\d{4}")


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root``, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vn30_qlib.cli", *args]


def run_killed(command: list[str], after: float, env: dict | None = None) -> int | None:
    """Run ``command`` in its own process group and SIGKILL the group ``after`` seconds in; returns its exit
    code when it ended before that, else None."""
    process = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return process.wait(timeout=after)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return None


def timed_run(command: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return time.perf_counter() - start


def ingest_campaign(kills: int, rng: random.Random, work: Path) -> dict:
    prices, index = SHARED_VN30 / "prices", SHARED_VN30 / "index" / "VN30.csv"
    if not prices.is_dir():
        print(f"ingest campaign skipped: the real exports are not at {SHARED_VN30}")
        return {"skipped": f"no exports at {SHARED_VN30}"}
    parent = work / "ingest"
    parent.mkdir()
    out = parent / "provider"
    command = cli("data", "ingest", "--source", str(prices), "--index", str(index), "--out", str(out))
    duration = timed_run(command)
    reference = tree_digest(out)
    violations: list[str] = []
    killed = 0
    for i in range(kills):
        was_killed = run_killed(command, rng.uniform(0.0, duration)) is None
        killed += was_killed
        if not out.is_dir() or tree_digest(out) != reference:
            violations.append(f"kill {i}: --out is not the complete provider right after the kill")
        timed_run(command)
        if tree_digest(out) != reference:
            violations.append(f"kill {i}: the re-run did not rewrite the same provider")
        left = sorted(p.name for p in parent.iterdir() if p != out)
        if left:
            violations.append(f"kill {i}: left beside --out after the re-run: {left}")
        print(f"ingest {i + 1}/{kills}: {'killed' if was_killed else 'finished'}; violations so far {len(violations)}",
              flush=True)
    return {"runs": kills, "killed": killed, "finished_before_kill": kills - killed, "run_seconds": round(duration, 2),
            "violations": violations}


def store_versions(store: Path) -> dict[Path, list[Path]]:
    """Each entry folder of the store with its complete versions."""
    entries: dict[Path, list[Path]] = {}
    for model_dir in [*store.glob("symbols/*/*"), *store.glob("pooled/*")]:
        if model_dir.is_dir():
            entries[model_dir] = sorted(p for p in model_dir.iterdir() if p.is_dir() and VERSION.fullmatch(p.name))
    return entries


def temporary_left(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob(".*") if p.is_dir())


def loop_campaign(kills: int, rng: random.Random, work: Path) -> dict:
    from vn30_qlib.data.provider import read_instruments
    from vn30_qlib.data.simulate import write_simulated_provider

    provider = write_simulated_provider(work / "sim_provider", seed=0, signal=0.05)
    symbols = sorted(read_instruments(provider, "vn30")["symbol"])[:4]
    env = {**os.environ, "LSTM_EPOCHS": "2", "LSTM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    entries_expected = 2 * (len(symbols) + 1)

    def command(store: Path) -> list[str]:
        return cli("loop", "workflows/lgb_vn30.yaml", "workflows/lstm_vn30.yaml", "--provider", str(provider),
                   "--store", str(store), "--symbols", *symbols, "--jobs", "1")

    round_no = 0
    store = work / f"store{round_no}"
    duration = timed_run(command(store), env)
    violations: list[str] = []
    validated: set[Path] = set()

    def check(label: str, before: dict[Path, str], finished: bool) -> None:
        entries = store_versions(store)
        now = {v: json.dumps(tree_digest(v)) for vs in entries.values() for v in vs}
        for version, digest in before.items():
            if now.get(version) != digest:
                violations.append(f"{label}: {version.relative_to(store)} changed or vanished")
        for entry, vs in entries.items():
            if len(vs) > 1:
                violations.append(f"{label}: {entry.relative_to(store)} stored {len(vs)} times")
        new = sorted(set(now) - validated)
        if new:
            result = subprocess.run(cli("validate", *map(str, new)), cwd=REPO, env=env, capture_output=True,
                                    text=True)
            if result.returncode != 0:
                violations.append(f"{label}: validate failed: {result.stderr.strip()[-500:]}")
            validated.update(new)
        if finished:
            stored = sum(bool(vs) for vs in entries.values())
            if stored != entries_expected:
                violations.append(f"{label}: {stored} of {entries_expected} entries stored after a finished run")
            left = temporary_left(store)
            if left:
                violations.append(f"{label}: temporary folders left after a finished run: {left}")

    check("first run", {}, finished=True)
    round_no += 1
    store = work / f"store{round_no}"
    killed = finished = i = 0
    while killed < kills:
        i += 1
        before = {v: json.dumps(tree_digest(v)) for vs in store_versions(store).values() for v in vs}
        code = run_killed(command(store), rng.uniform(0.0, duration), env)
        if code is None:
            killed += 1
        elif code != 0:
            violations.append(f"run {i}: exited {code}")
        check(f"run {i}", before, finished=code is not None)
        if code is not None:
            finished += 1
            round_no += 1
            store = work / f"store{round_no}"
        print(f"loop run {i}: {'killed' if code is None else 'finished'} ({killed}/{kills} kills); violations so "
              f"far {len(violations)}", flush=True)
    before = {v: json.dumps(tree_digest(v)) for vs in store_versions(store).values() for v in vs}
    timed_run(command(store), env)
    check("final run", before, finished=True)
    return {"runs": i, "killed": killed, "finished_before_kill": finished, "entries": entries_expected,
            "full_run_seconds": round(duration, 1), "versions_validated": len(validated), "violations": violations}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ingest-kills", type=int, default=100, help="ingest runs killed at random (default 100)")
    parser.add_argument("--loop-kills", type=int, default=30, help="loop runs to kill mid-run, at random moments "
                        "(default 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    parser.add_argument("--out", help="write the results as JSON here too")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="kill_campaign-") as folder:
        work = Path(folder)
        results = {"ingest": ingest_campaign(args.ingest_kills, rng, work) if args.ingest_kills else None,
                   "loop": loop_campaign(args.loop_kills, rng, work) if args.loop_kills else None}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 1 if any(part and part.get("violations") for part in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
