"""Is our VN30 LightGBM workflow at least as good as plain Qlib Alpha158 + LGBModel, and than 1-day reversal?

    python bench/lgb_vs_alpha158.py --provider /tmp/vn30_real

Runs, in one process on one provider, three workflows with the same split, backtest and records:
`lgb_vn30.yaml` (handler VN30Alpha158), `alpha158_lgb_vn30.yaml` (Qlib's own `Alpha158` handler, its default
processors and Qlib's LGBModel) and `reversal_vn30.yaml` (the one-day-reversal factor, score = -(close_t /
close_t-1 - 1), no fitting). Then times `qrun workflows/lgb_vn30.yaml` end to end in a subprocess.
Prints a Markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import qlib
from qlib.model.trainer import task_train
from qlib.workflow import R

from vn30_qlib.workflow_config import load_workflow

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "workflows" / "lgb_vn30.yaml"
METRICS = {
    "IC": "IC", "ICIR": "ICIR", "Rank IC": "Rank IC", "Rank ICIR": "Rank ICIR",
    "excess ann. return (with cost)": "1day.excess_return_with_cost.annualized_return",
    "excess max drawdown (with cost)": "1day.excess_return_with_cost.max_drawdown",
}
WORKFLOWS = {"VN30Alpha158 + LGBModel (ours)": WORKFLOW,
             "Qlib Alpha158 + LGBModel": REPO / "workflows" / "alpha158_lgb_vn30.yaml",
             "one-day reversal": REPO / "workflows" / "reversal_vn30.yaml"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--provider", required=True)
    args = parser.parse_args()
    provider = str(Path(args.provider).expanduser())
    config = load_workflow(WORKFLOW, {"VN30_PROVIDER": provider})
    tasks = {name: load_workflow(path, {"VN30_PROVIDER": provider})["task"] for name, path in WORKFLOWS.items()}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        init = {**config["qlib_init"]}
        init["exp_manager"] = {**init["exp_manager"], "kwargs": {"uri": f"sqlite:///{tmp}/mlruns.db",
                                                                 "default_exp_name": "bench"}}
        qlib.init(**init)
        for name, task in tasks.items():
            start = time.perf_counter()
            recorder = task_train(task, experiment_name=f"bench_{len(rows)}")
            seconds = time.perf_counter() - start
            metrics = R.get_recorder(recorder_id=recorder.id, experiment_name=f"bench_{len(rows)}").list_metrics()
            rows[name] = {label: metrics[key] for label, key in METRICS.items()} | {"in-process s": seconds}
        start = time.perf_counter()
        env = {**os.environ, "VN30_PROVIDER": provider}
        subprocess.run([str(Path(sys.executable).parent / "qrun"), str(WORKFLOW)], cwd=tmp, env=env, check=True,
                       capture_output=True)
        qrun_seconds = time.perf_counter() - start
    columns = list(next(iter(rows.values())))
    print("| variant | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{values[c]:.4f}" for c in columns) + " |")
    print(f"\nqrun workflows/lgb_vn30.yaml end to end (process start, data load, fit, records): {qrun_seconds:.1f} s")


if __name__ == "__main__":
    main()
