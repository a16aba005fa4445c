"""Does `qrun workflows/tft_vn30.yaml` run unchanged where torch sees a GPU, and does the model it records predict
the same on a machine without one?

    python bench/tft_device_run.py --provider /tmp/vn30_real [--epochs N]

Runs the workflow as a user would (its ``device: auto`` picks CUDA when torch sees a device), then loads the
recorded model (``params.pkl``) in a child process that sees no GPU (``CUDA_VISIBLE_DEVICES=""``), predicts the
test segment there and compares with the predictions the run recorded (``pred.pkl``). Prints JSON: where the fit
ran, the qrun's wall time and test metrics, and the largest difference of the reloaded predictions. A model fitted
on a GPU predicts there with other kernels than on a CPU, so expect float32 rounding differences (~1e-6), not
bit-equality; a CPU-fitted model must reload exactly (also tests/test_tft.py). ``--epochs`` sets ``TFT_EPOCHS``
(a shorter check); without it the workflow's defaults run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tft_throughput import REPO, open_recorder, run_workflow  # bench/ is on the path when a bench script runs

WORKFLOW = "tft_vn30.yaml"
EXPERIMENT = "tft_device"


def reload_and_compare(provider: str, workdir: Path) -> dict:
    """In this process: the recorded model's test predictions against the recorded ones."""
    from qlib.utils import init_instance_by_config

    from vn30_qlib.workflow_config import load_workflow

    recorder = open_recorder(provider, workdir, EXPERIMENT)
    model = recorder.load_object("params.pkl")
    recorded = recorder.load_object("pred.pkl").iloc[:, 0]
    dataset = init_instance_by_config(
        load_workflow(REPO / "workflows" / WORKFLOW, {"VN30_PROVIDER": provider})["task"]["dataset"])
    reloaded = model.predict(dataset).reindex(recorded.index)
    difference = (reloaded - recorded).abs()
    return {"reload_sees_cuda": torch.cuda.is_available(),
            "reload_module_device": str(next(model.module.parameters()).device),
            "rows": int(len(recorded)), "missing_after_reload": int(reloaded.isna().sum()),
            "max_abs_difference": float(difference.max()), "identical": bool(np.array_equal(reloaded, recorded))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", default="/tmp/vn30_real")
    parser.add_argument("--epochs", type=int, help="TFT_EPOCHS for the run (default: the workflow's)")
    parser.add_argument("--reload-from", type=Path, help=argparse.SUPPRESS)  # the child process's part
    args = parser.parse_args()
    provider = str(Path(args.provider).expanduser())
    if args.reload_from is not None:
        print(json.dumps(reload_and_compare(provider, args.reload_from)))
        return
    if args.epochs is not None:
        os.environ["TFT_EPOCHS"] = str(args.epochs)
    report = {"fit_sees_cuda": torch.cuda.is_available(),
              "fit_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        seconds, recorder = run_workflow(WORKFLOW, provider, workdir, EXPERIMENT)
        metrics = recorder.list_metrics()
        report["qrun_seconds"] = seconds
        report.update({k: metrics[k] for k in ("IC", "Rank IC", "tft_coverage_10_90", "tft_quantile_crossing")})
        child = subprocess.run([sys.executable, __file__, "--provider", provider, "--reload-from", str(workdir)],
                               env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True)
        if child.returncode != 0:
            raise RuntimeError(f"reloading the recorded model failed:\n{child.stderr[-4000:]}")
        report.update(json.loads(child.stdout.strip().splitlines()[-1]))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
