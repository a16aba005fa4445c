"""How fast is our LSTM's epoch against Qlib's `pytorch_lstm_ts.LSTM` + `TSDatasetH`, and how good are both?

    python bench/lstm_epoch_vs_qlib.py --provider /tmp/vn30_real [--epochs 5] [--pairs 3] [--precision float32]

On one provider, with the features, hidden size, layers, step_len and batch size of
`workflows/lstm_vn30.yaml`, trains (each in its own process, so peak memory is its own) our LSTM and Qlib's
contrib LSTM for ``--epochs`` epochs, timing each epoch's training pass and its evaluation. It does so
``--pairs`` times, alternating which goes first, and reports each pair's ratio and their median: on a shared
machine whose speed drifts by a third within minutes, one pair's ratio is one draw. It also prints the
floor of any implementation of this network on this CPU: the multiply-adds of one train pass (forward and
backward of every LSTM layer, counted analytically) divided by the float32 matmul FLOP/s measured in the same
process with the same threads (our LSTM's ``precision: auto`` runs bfloat16 matmuls on a CPU with AMX, which
that floor does not bound; ``--precision float32`` times it in float32). Then runs
`qrun workflows/lstm_vn30.yaml` (default settings: up to 100 epochs, early stop 10) and
`qrun workflows/lgb_vn30.yaml` end to end and reads their test IC / Rank IC from the recorder, and trains
Qlib's contrib LSTM the same way (up to the workflow's epochs, the same patience on the valid loss, its own
`fit`) for its test metrics (``--pairs 0`` runs only these).
Prints a Markdown report for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
LSTM_WORKFLOW = REPO / "workflows" / "lstm_vn30.yaml"
LGB_WORKFLOW = REPO / "workflows" / "lgb_vn30.yaml"
METRICS = ("IC", "ICIR", "Rank IC", "Rank ICIR")


def signal_metrics(pred: pd.Series, label: pd.Series) -> dict[str, float]:
    """Test IC, ICIR, Rank IC, Rank ICIR as Qlib's SigAnaRecord defines them (daily, not annualised)."""
    both = pd.concat([pred, label], axis=1, keys=["pred", "label"]).dropna()
    by_day = both.groupby(level="datetime")
    ic = by_day.apply(lambda day: day["pred"].corr(day["label"]))
    ric = by_day.apply(lambda day: day["pred"].corr(day["label"], method="spearman"))
    return {"IC": ic.mean(), "ICIR": ic.mean() / ic.std(), "Rank IC": ric.mean(), "Rank ICIR": ric.mean() / ric.std()}


def timed(function, into: list):
    """``function`` that appends (wall s, this process's CPU s) of each call to ``into``."""
    def wrapper(*args, **kwargs):
        start, cpu = time.perf_counter(), time.process_time()
        result = function(*args, **kwargs)
        into.append((time.perf_counter() - start, time.process_time() - cpu))
        return result
    return wrapper


def lstm_train_flops(rows: int, steps: int, d_feat: int, hidden: int, layers: int) -> float:
    """FLOPs of one pass of ``rows`` windows through a stacked LSTM, forward and backward.

    Per row, step and layer with input width ``i``: forward 2 * 4h(i + h) (gates from input and hidden state);
    backward the weight gradients (the same again) plus the gradient to the previous hidden state 2 * 4h * h
    and, above the first layer, to the layer's input 2 * 4h * i. The read-out and elementwise work are left out,
    so the floor this gives is a lower bound.
    """
    total = 0.0
    for layer in range(layers):
        width = d_feat if layer == 0 else hidden
        forward = 2 * 4 * hidden * (width + hidden)
        backward = forward + 2 * 4 * hidden * hidden + (2 * 4 * hidden * width if layer > 0 else 0)
        total += forward + backward
    return total * rows * steps


def pipeline_pass(batches) -> tuple[float, float]:
    """(wall s, CPU s) of one epoch of batches with no model: what the data pipeline alone costs."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in batches:
        pass
    return time.perf_counter() - start, time.process_time() - cpu


def lstm_workflow(provider: str) -> dict:
    """`workflows/lstm_vn30.yaml` on ``provider``, as qrun would render it."""
    from vn30_qlib.workflow_config import load_workflow

    return load_workflow(LSTM_WORKFLOW, {"VN30_PROVIDER": provider})


def train_one(which: str, provider: str, epochs: int, precision: str | None, early_stop: int | None = None) -> dict:
    """Fit ``which`` ("ours" or "qlib") for up to ``epochs`` epochs in this process; times, memory, test metrics.

    ``precision``: our LSTM's, overriding the workflow's (Qlib's runs float32). ``early_stop``: Qlib's patience
    (None: run every epoch, as in the timed head-to-head)."""
    import qlib
    import torch
    from qlib.data.dataset.handler import DataHandlerLP
    from qlib.utils import init_instance_by_config

    config = lstm_workflow(provider)
    qlib.init(provider_uri=provider, region="cn", kernels=1)
    kwargs = config["task"]["model"]["kwargs"]
    dataset_config = config["task"]["dataset"]
    start = time.perf_counter()
    train_s, eval_s = [], []
    if which == "ours":
        from vn30_qlib.models import training
        from vn30_qlib.models.lstm import LSTM

        dataset = init_instance_by_config(dataset_config)
        model = LSTM(**{**kwargs, "n_epochs": epochs, "device": "cpu", "precision": precision or kwargs["precision"]})
        windows = model._windows(dataset)
        rows = training.LabelledRows(training.segment_labels(dataset, "train").iloc[:, 0], torch.device("cpu"), "train")
        positions = windows.positions(rows.index)
        pipeline = pipeline_pass((torch.from_numpy(windows.gather(positions[batch])), rows.label[batch])
                                 for batch in rows.batches(kwargs["batch_size"], by_day=False))
        training._train_one_epoch = timed(training._train_one_epoch, train_s)
        LSTM._forward = timed(LSTM._forward, eval_s)   # during fit: one valid-segment pass per epoch
        data_s = time.perf_counter() - start
        fit_start = time.perf_counter()
        model.fit(dataset)
        fit_s = time.perf_counter() - fit_start
        eval_s = eval_s[:len(train_s)]
        pred = model.predict(dataset)
        from matmul_peak import matmul_flops  # bench/ is on the path when a bench script runs

        ours_only = {"bf16": model.bf16, "matmul_flops": matmul_flops(),
                 "train_flops": lstm_train_flops(len(rows.positions), kwargs["step_len"], len(windows.columns),
                                                kwargs["hidden_size"], kwargs["num_layers"])}
    else:
        from qlib.contrib.model.pytorch_lstm_ts import LSTM as QlibLSTM
        from torch.utils.data import DataLoader

        dataset_config = {**dataset_config, "class": "TSDatasetH",
                          "kwargs": {**dataset_config["kwargs"], "step_len": kwargs["step_len"]}}
        dataset = init_instance_by_config(dataset_config)
        d_feat = len(dataset.handler.get_cols(col_set="feature"))
        model = QlibLSTM(d_feat=d_feat, hidden_size=kwargs["hidden_size"], num_layers=kwargs["num_layers"],
                         dropout=kwargs["dropout"], n_epochs=epochs, lr=kwargs["lr"], batch_size=kwargs["batch_size"],
                         early_stop=early_stop or epochs, loss="mse", n_jobs=0, GPU=-1, seed=kwargs["seed"])
        sampler = dataset.prepare("train", col_set=["feature", "label"], data_key=DataHandlerLP.DK_L)
        sampler.config(fillna_type="ffill+bfill")
        pipeline = pipeline_pass(DataLoader(sampler, batch_size=kwargs["batch_size"], shuffle=True, drop_last=True))
        model.train_epoch = timed(model.train_epoch, train_s)
        model.test_epoch = timed(model.test_epoch, eval_s)   # Qlib evaluates the train and the valid loader
        data_s = time.perf_counter() - start
        fit_start = time.perf_counter()
        model.fit(dataset, save_path=tempfile.mktemp(suffix=".pt"))
        fit_s = time.perf_counter() - fit_start
        eval_s = [(a[0] + b[0], a[1] + b[1]) for a, b in zip(eval_s[0::2], eval_s[1::2])]
        pred = model.predict(dataset)
        ours_only = {}
    label = dataset.handler.fetch(slice(*dataset.segments["test"]), col_set="label", data_key=DataHandlerLP.DK_R)
    label = label.iloc[:, 0]
    pred.index = pred.index.set_names(["datetime", "instrument"])
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"data_s": data_s, "fit_s": fit_s, "train_s": train_s, "eval_s": eval_s, "pipeline_s": pipeline,
            "threads": torch.get_num_threads(), "peak_mb": peak_kb / 1024, **ours_only,
            **signal_metrics(pd.Series(np.asarray(pred, dtype="float64"), index=pred.index), label)}


def median(row: dict, key: str, kind: int) -> float:
    return float(np.median([times[kind] for times in row[key]]))


def mean(row: dict, key: str, kind: int) -> float:
    return float(np.mean([times[kind] for times in row[key]]))


def report_pair(ours: dict, theirs: dict) -> tuple[float, float]:
    """Print one pair's Markdown table and ratios; return its (train pass, train + eval epoch) CPU-time ratios."""
    print("| model | data pipeline alone, wall / CPU s | train pass, wall / CPU s | eval per epoch, wall / CPU s "
          "| peak RSS MiB | test IC | ICIR | Rank IC | Rank ICIR |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in (("ours (vn30_qlib.models.lstm)", ours), ("Qlib pytorch_lstm_ts + TSDatasetH", theirs)):
        print(f"| {name} | {row['pipeline_s'][0]:.2f} / {row['pipeline_s'][1]:.2f} | "
              f"{median(row, 'train_s', 0):.1f} / {median(row, 'train_s', 1):.1f} | "
              f"{median(row, 'eval_s', 0):.1f} / {median(row, 'eval_s', 1):.1f} | {row['peak_mb']:.0f} | "
              + " | ".join(f"{row[k]:.4f}" for k in METRICS) + " |")
    ratios = {}
    for kind, what in ((0, "wall"), (1, "CPU")):
        train = median(ours, "train_s", kind) / median(theirs, "train_s", kind)
        epoch = ((median(ours, "train_s", kind) + median(ours, "eval_s", kind))
                 / (median(theirs, "train_s", kind) + median(theirs, "eval_s", kind)))
        ratios[what] = (train, epoch)
        pipe = ours["pipeline_s"][kind] / theirs["pipeline_s"][kind]
        print(f"\nours / theirs, {what} time (medians over the epochs): data pipeline {pipe:.3f}, train pass "
              f"{train:.3f}, train + eval epoch {epoch:.3f}")
    epoch_by_means = ((mean(ours, "train_s", 1) + mean(ours, "eval_s", 1))
                      / (mean(theirs, "train_s", 1) + mean(theirs, "eval_s", 1)))
    print(f"\nwith means over the epochs (the first, warm-up epoch counted): train pass "
          f"{mean(ours, 'train_s', 1) / mean(theirs, 'train_s', 1):.3f}, train + eval epoch {epoch_by_means:.3f} (CPU)")
    floor_s = ours["train_flops"] / ours["matmul_flops"]
    theirs_epoch = median(theirs, "train_s", 1) + median(theirs, "eval_s", 1)
    print(f"\nfloor of any implementation of this network here: {ours['train_flops'] / 1e9:.1f} GFLOP per train pass "
          f"/ {ours['matmul_flops'] / 1e9:.1f} GFLOP/s matmul = {floor_s:.1f} s = {floor_s / theirs_epoch:.3f} x Qlib's "
          f"epoch (CPU s), {floor_s / median(theirs, 'train_s', 1):.3f} x its train pass; ours does "
          f"{ours['train_flops'] / median(ours, 'train_s', 1) / ours['matmul_flops']:.0%} of the float32 matmul FLOP/s "
          "in its train pass" + (" (in bfloat16 matmuls, which this float32 floor does not bound)" if ours["bf16"] else ""))
    for name, row in (("ours", ours), ("theirs", theirs)):
        print(f"\n{name}: per-epoch train pass (wall, CPU) s {[(round(w, 1), round(c, 1)) for w, c in row['train_s']]}")
    print()
    return ratios["CPU"]


def child_fit(which: str, provider: str, epochs: int, env: dict, options: list[str]) -> dict:
    """`train_one` in a process of its own (so its peak memory is its own), with this script's ``options``."""
    out = subprocess.run([sys.executable, __file__, "--provider", provider, "--epochs", str(epochs), "--one", which,
                          *options], capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.split("RESULT ", 1)[1])


def run_qrun(workflow: Path, provider: str, workdir: str, experiment: str) -> dict:
    """Time ``qrun workflow`` in a subprocess, then read its recorder's metrics."""
    env = {**os.environ, "VN30_PROVIDER": provider, "VN30_EXPERIMENT": experiment}
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "qrun"), str(workflow)], cwd=workdir, env=env, check=True,
                   capture_output=True)
    seconds = time.perf_counter() - start
    import qlib
    from qlib.workflow import R

    qlib.init(provider_uri=provider, region="cn", kernels=1,
              exp_manager={"class": "MLflowExpManager", "module_path": "qlib.workflow.expm",
                           "kwargs": {"uri": f"sqlite:///{workdir}/mlruns.db", "default_exp_name": "bench"}})
    recorder = next(iter(R.list_recorders(experiment_name=experiment).values()))
    metrics = recorder.list_metrics()
    epochs = len(recorder.client.get_metric_history(recorder.id, "valid_loss"))
    return {"qrun_s": seconds, "epochs": epochs, **{key: metrics[key] for key in METRICS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--provider", required=True)
    parser.add_argument("--epochs", type=int, default=5, help="epochs for the timed head-to-head (Qlib's is slow)")
    parser.add_argument("--one", choices=["ours", "qlib"], help=argparse.SUPPRESS)   # the child processes
    parser.add_argument("--early-stop", type=int, help=argparse.SUPPRESS)            # and Qlib's patience there
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both models (OMP_NUM_THREADS)")
    parser.add_argument("--pairs", type=int, default=3,
                        help="timed head-to-heads, one after the other, alternating which model goes first")
    parser.add_argument("--skip-qrun", action="store_true", help="only the head-to-head epoch timing")
    parser.add_argument("--precision", choices=["auto", "float32", "bfloat16"],
                        help="our LSTM's precision in the head-to-head (default: the workflow's)")
    args = parser.parse_args()
    provider = str(Path(args.provider).expanduser())
    if args.one:
        print("RESULT " + json.dumps(train_one(args.one, provider, args.epochs, args.precision, args.early_stop)))
        return

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}   # torch's (and our fit's) thread count
    ratios = []
    for pair in range(args.pairs):
        results = {}
        # alternate who goes first, so a drift in the shared machine's speed does not always favour one side
        order = ("ours", "qlib") if pair % 2 == 0 else ("qlib", "ours")
        first = "ours" if order[0] == "ours" else "Qlib's"
        for which in order:
            results[which] = child_fit(which, provider, args.epochs, env,
                                       ["--precision", args.precision] if args.precision else [])
            print(which, results[which], file=sys.stderr)
        print(f"### Pair {pair + 1} of {args.pairs}: {args.epochs} epochs each, {args.threads} torch thread(s), one "
              f"process per model, {first} first; ours in "
              f"{'bfloat16' if results['ours']['bf16'] else 'float32'} (precision "
              f"{args.precision or 'as in the workflow'}), Qlib's in float32\n")
        ratios.append(report_pair(results["ours"], results["qlib"]))
    if ratios:
        train, epoch = (float(np.median([r[k] for r in ratios])) for k in (0, 1))
        print(f"\n**Median over the {args.pairs} pairs, CPU time: train pass {train:.3f}, train + eval epoch "
              f"{epoch:.3f}** (per pair: {', '.join(f'{t:.3f} / {e:.3f}' for t, e in ratios)})\n")
    if args.skip_qrun:
        return
    with tempfile.TemporaryDirectory() as tmp:
        lstm = run_qrun(LSTM_WORKFLOW, provider, tmp, "bench_lstm")
        lgb = run_qrun(LGB_WORKFLOW, provider, tmp, "bench_lgb")
    # Qlib's contrib LSTM trained as ours is by qrun: up to the workflow's n_epochs, stopping on the valid loss
    # after the workflow's patience, best epoch restored (its own fit); timed from data loading to prediction
    kwargs = lstm_workflow(provider)["task"]["model"]["kwargs"]
    start = time.perf_counter()
    qlib_full = child_fit("qlib", provider, kwargs["n_epochs"], env, ["--early-stop", str(kwargs["early_stop"])])
    qlib_full.update(qrun_s=time.perf_counter() - start, epochs=len(qlib_full["train_s"]))
    print("\n### End to end, trained to early stopping\n")
    print("| run | torch threads | wall s | epochs | test IC | ICIR | Rank IC | Rank ICIR |")
    print("|---|---|---|---|---|---|---|---|")
    for name, threads, row in (("`qrun workflows/lstm_vn30.yaml` (ours)", "default", lstm),
                               ("Qlib `pytorch_lstm_ts` + `TSDatasetH`, same settings, its `fit`", args.threads,
                                qlib_full),
                               ("`qrun workflows/lgb_vn30.yaml`", "-", lgb)):
        print(f"| {name} | {threads} | {row['qrun_s']:.0f} | {row['epochs'] or '-'} | "
              + " | ".join(f"{row[k]:.4f}" for k in METRICS) + " |")


if __name__ == "__main__":
    main()
