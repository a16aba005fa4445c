"""Is our VN30 LightGBM workflow at least as good as plain Qlib Alpha158 + LGBModel, and than 1-day reversal?

    python bench/lgb_vs_alpha158.py --provider /tmp/vn30_real

Runs, in one process on one provider, the task of `workflows/lgb_vn30.yaml` three ways, each with the same
split, backtest and records: (1) as is (handler VN30Alpha158), (2) with Qlib's own `Alpha158` handler and
its default processors, (3) with the model replaced by the one-day-reversal factor (score = -(close_t /
close_t-1 - 1), no fitting). Then times `qrun workflows/lgb_vn30.yaml` end to end in a subprocess.
Prints a Markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import qlib
from qlib.data.dataset import DatasetH
from qlib.model.base import Model
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


class OneDayReversal(Model):
    """Score = minus the day's close-to-close return: yesterday's losers are bought (no fitting)."""

    def fit(self, dataset: DatasetH, **kwargs) -> None:
        pass

    def predict(self, dataset: DatasetH, segment: str = "test") -> pd.Series:
        raw = dataset.prepare(segment, col_set="feature", data_key="raw")
        return -raw.iloc[:, 0]


def variants(task: dict) -> dict[str, dict]:
    plain = copy.deepcopy(task)
    handler = plain["dataset"]["kwargs"]["handler"]
    handler.update({"class": "Alpha158", "module_path": "qlib.contrib.data.handler"})
    plain["model"]["module_path"] = "qlib.contrib.model.gbdt"  # Qlib's own LGBModel, not our checked subclass
    reversal = copy.deepcopy(task)
    reversal["model"] = {"class": "OneDayReversal", "module_path": "__main__"}
    reversal["dataset"]["kwargs"]["handler"] = {
        "class": "DataHandlerLP", "module_path": "qlib.data.dataset.handler",
        "kwargs": {
            "instruments": handler["kwargs"]["instruments"],
            "start_time": handler["kwargs"]["start_time"], "end_time": handler["kwargs"]["end_time"],
            "data_loader": {"class": "QlibDataLoader", "kwargs": {"config": {
                "feature": (["$close / Ref($close, 1) - 1"], ["RET1"]),
                "label": (["Ref($close, -2) / Ref($close, -1) - 1"], ["LABEL0"])}}},
        },
    }
    reversal["record"] = [r for r in reversal["record"] if r["class"] != "FeatureImportanceRecord"]
    # task_train fills <MODEL>/<DATASET> in place: every variant must own its record configs
    return {"VN30Alpha158 + LGBModel (ours)": copy.deepcopy(task), "Qlib Alpha158 + LGBModel": plain,
            "one-day reversal": reversal}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--provider", required=True)
    args = parser.parse_args()
    provider = str(Path(args.provider).expanduser())
    config = load_workflow(WORKFLOW, {"VN30_PROVIDER": provider})
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        init = {**config["qlib_init"]}
        init["exp_manager"] = {**init["exp_manager"], "kwargs": {"uri": f"sqlite:///{tmp}/mlruns.db",
                                                                 "default_exp_name": "bench"}}
        qlib.init(**init)
        for name, task in variants(config["task"]).items():
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
