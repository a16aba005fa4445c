"""Does the tuned workflow beat the seed defaults on the test segment the search never saw?

    python bench/tuned_vs_default.py --provider ~/.qlib/qlib_data/vn30_real workflows/lgb_vn30.yaml workflows/lgb_tuned_vn30.yaml

For each workflow, in one process: the mean walk-forward validation Rank IC on the folds of the default
workflow's search space (what the search optimised), then the full task (fit on train, early stopping on
valid, records on test) with its test IC, Rank IC and excess return. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import yaml
from qlib.model.trainer import task_train
from qlib.workflow import R

from vn30_qlib.cv import cross_validate, folds_for
from vn30_qlib.loop import init_qlib_for
from vn30_qlib.tune import search_space_path
from vn30_qlib.workflow_config import load_workflow

METRICS = {"test IC": "IC", "test Rank IC": "Rank IC", "test Rank ICIR": "Rank ICIR",
           "excess ann. return (with cost)": "1day.excess_return_with_cost.annualized_return"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--provider", required=True)
    parser.add_argument("workflows", nargs="+")
    args = parser.parse_args()
    provider = str(Path(args.provider).expanduser())
    folds_spec = yaml.safe_load(search_space_path(Path(args.workflows[0]).resolve()).read_text())["folds"]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlruns.db"
        init_qlib_for(provider, uri)
        _, folds = folds_for(args.workflows[0], provider, **folds_spec)
        for i, workflow in enumerate(args.workflows):
            task = load_workflow(workflow, {"VN30_PROVIDER": provider})["task"]
            cv = cross_validate(task, folds, uri, run_name=Path(workflow).stem)
            recorder = task_train(task, experiment_name=f"bench_{i}")
            metrics = R.get_recorder(recorder_id=recorder.id, experiment_name=f"bench_{i}").list_metrics()
            rows[Path(workflow).name] = {"CV mean Rank IC": cv["mean_rank_ic"],
                                         **{label: metrics[key] for label, key in METRICS.items()}}
    print(f"folds: {[(f'{f.train[0]:%Y-%m-%d}..{f.train[1]:%Y-%m-%d}', f'{f.valid[0]:%Y-%m-%d}..{f.valid[1]:%Y-%m-%d}') for f in folds]}")
    columns = list(next(iter(rows.values())))
    print("| workflow | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{values[c]:.4f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
