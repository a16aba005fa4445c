"""TFT on the real VN30 provider: train throughput, achieved FLOP/s against this machine's matmul FLOP/s, epoch
time against pytorch-forecasting's TemporalFusionTransformer on the same rows and inputs, peak memory, and
(``--qrun``) the test IC of ``qrun workflows/tft_vn30.yaml`` next to LightGBM's.

    # pytorch-forecasting, for the comparison only; it pins pandas<3.1, so without its dependency resolution:
    pip install --no-deps pytorch-forecasting lightning lightning-utilities torchmetrics scikit-base
    python bench/tft_throughput.py --provider /tmp/vn30_real [--epochs 2] [--threads 1] [--torch-ops] [--qrun]

FLOPs of one training step (forward + backward) are counted by torch's FlopCounterMode (matmuls, bmm, ...,
also those the LSTM kernel calls) plus, analytically, what the counter cannot see: the variable selections' fused
kernel (see `step_flops`) and, where torch's oneDNN layers run them (``--torch-ops``), the LSTMs, 2 * 4h(in + h)
FLOPs per row, step and layer forward; each twice that backward.
Elementwise work is not counted, as usual for MFU. The share of the matmul reference: each epoch's FLOP/s over
the best matmul rate sampled during that epoch (one multiply every 4 batches; `tft_epochs`), the median over the
epochs; the share against the reference measured for 1 s right before each epoch is reported too.
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
import torch
from matmul_peak import matmul_flops  # bench/ is on the path when a bench script runs
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
SEGMENTS = {"train": ("2015-10-05", "2021-12-31"), "valid": ("2022-01-01", "2022-12-31"),
            "test": ("2023-01-01", "2024-09-26")}


def step_flops(module, batch, quantiles: torch.Tensor) -> float:
    """Forward + backward FLOPs of one training step of the network ``module`` on ``batch`` (a `TFTBatch`)."""
    from vn30_qlib.models.lstm_layer import kernel_runs
    from vn30_qlib.models.tft.sub_modules import quantile_loss

    rows, steps = batch.past.shape[:2]
    horizons = batch.future.shape[1]
    module.train()
    with FlopCounterMode(display=False) as counter:
        quantile_loss(module(batch), torch.zeros(rows, horizons), quantiles).backward()
    module.zero_grad()
    h = module.lstm.encoder.hidden_size
    onednn_lstm = not kernel_runs(module.lstm.encoder, batch.past)
    lstm_forward = 2 * 4 * h * (h + h) * rows * (steps + horizons) if onednn_lstm else 0
    return counter.get_total_flops() + 3 * (lstm_forward + mix_forward_flops(module, batch))


def mix_forward_flops(module, batch) -> float:
    """Forward FLOPs of the fused variable-selection kernel, which the counter cannot see: the per-variable linear
    maps (D -> H -> H -> 2D, H = D) over every (row, step, variable) of the past and future variable selections;
    its recomputed forward is not counted. 0 where the torch ops run instead (the counter sees those)."""
    from vn30_qlib.models.variable_mix import fused_fits

    selection = module.past_selection
    if not fused_fits(batch.past[:1], selection.embedding, selection.transform):
        return 0.0
    d = selection.embedding.weight.shape[-1]
    rows, steps, n_past = batch.past.shape
    horizons, n_future = batch.future.shape[1:]
    return 2 * (d * d + d * d + d * 2 * d) * rows * (steps * n_past + horizons * n_future)


def tft_epochs(data, epochs: int, threads: int, sample_every: int = 4, cpu_kernels: str = "auto") -> dict:
    """Fit the workflow's TFT for ``epochs`` epochs (its ``cpu_kernels`` as given); epoch times come from the loop's
    train pass only.

    The shared machine's speed drifts, also within an epoch, so each epoch is compared with the matmul reference
    measured during it: one multiply every ``sample_every`` batches (its time left out of the epoch's), the best of
    them. The reference measured for 1 s right before each epoch is kept too."""
    from vn30_qlib.models import training
    from vn30_qlib.models.tft import TFT

    times: list[float] = []
    before: list[float] = []
    during: list[float] = []
    original = training._train_one_epoch

    def timed(module, optimizer, batches, *args, **kwargs):
        before.append(matmul_flops(seconds=1.0))
        samples, paused = [], [0.0]

        def sampled():
            for i, batch in enumerate(batches):
                if i % sample_every == 0:
                    start = time.perf_counter()
                    samples.append(matmul_flops(seconds=0.0))
                    paused[0] += time.perf_counter() - start
                yield batch

        start = time.perf_counter()
        result = original(module, optimizer, sampled(), *args, **kwargs)
        times.append(time.perf_counter() - start - paused[0])
        during.append(max(samples))
        return result

    training._train_one_epoch = timed
    try:
        model = TFT(n_epochs=epochs, early_stop=epochs, device="cpu", n_threads=threads, cpu_kernels=cpu_kernels)
        model.fit(data)
    finally:
        training._train_one_epoch = original
    panel = model._panel(data)
    rows = panel.rows(model._labels(data, "train").index)
    batch = panel.batch(rows, np.arange(model.batch_size), torch.device("cpu"))
    return {"model": model, "epoch_seconds": times, "matmul_flops_before_epoch": before,
            "matmul_flops_during_epoch": during, "train_rows": len(rows.index),
            "flops_per_step": step_flops(model.module, batch, torch.tensor(model.quantiles)), "panel": panel}


def pf_epoch(model, data, epochs: int) -> dict:
    """pytorch-forecasting's TFT with the same hidden size, heads, window, variable width, inputs and rows."""
    import lightning.pytorch as pl
    from pytorch_forecasting import TemporalFusionTransformer, TimeSeriesDataSet
    from pytorch_forecasting.data import TorchNormalizer
    from pytorch_forecasting.metrics import QuantileLoss

    from handlers.vn30_tft import TFT_FEATURES
    from vn30_qlib.models.tft_inputs import static_codes

    features = data.handler.fetch(col_set="feature", data_key="infer")
    label = data.handler.fetch(col_set="label", data_key="infer").iloc[:, 0]
    calendar = model._raw_calendar()
    frame = features.join(label.rename("target")).reset_index()
    frame = frame[frame["datetime"] <= pd.Timestamp(SEGMENTS["train"][1])]
    frame = frame.join(calendar, on="datetime")
    frame["time_idx"] = calendar.index.get_indexer(frame["datetime"])
    codes = static_codes(frame["instrument"])
    frame["instrument"], frame["sector"] = codes[:, 0].astype(str), codes[:, 1].astype(str)
    frame["target"] = frame["target"].fillna(0.0).astype("float32")
    known = list(calendar.columns)
    dataset = TimeSeriesDataSet(
        frame, time_idx="time_idx", target="target", group_ids=["instrument"],
        max_encoder_length=model.step_len, min_encoder_length=model.step_len, max_prediction_length=model.horizons,
        static_categoricals=["instrument", "sector"], time_varying_known_reals=known,
        time_varying_unknown_reals=list(TFT_FEATURES), target_normalizer=TorchNormalizer(method="identity"),
        add_encoder_length=False, add_relative_time_idx=False, add_target_scales=False, allow_missing_timesteps=True,
    )
    loader = dataset.to_dataloader(train=True, batch_size=model.batch_size, num_workers=0)
    tft = TemporalFusionTransformer.from_dataset(
        dataset, hidden_size=model.hidden_size, attention_head_size=model.num_heads, dropout=model.dropout,
        hidden_continuous_size=model.variable_hidden_size, loss=QuantileLoss(model.quantiles),
        learning_rate=model.lr, log_interval=-1,
    )
    times: list[float] = []

    class Timer(pl.Callback):
        def on_train_epoch_start(self, trainer, module):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            times.append(time.perf_counter() - self.start)

    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Timer()],
                         limit_val_batches=0, gradient_clip_val=3.0)
    trainer.fit(tft, train_dataloaders=loader)
    return {"epoch_seconds": times, "train_rows": len(dataset),
            "parameters": sum(p.numel() for p in tft.parameters())}


def run_workflow(workflow: str, provider: str, workdir: Path, experiment: str) -> tuple[float, object]:
    """Run ``qrun workflows/{workflow}`` as a user would, in ``workdir``; its wall time and its recorder."""
    env = {**os.environ, "VN30_PROVIDER": provider, "VN30_EXPERIMENT": experiment}
    start = time.perf_counter()
    result = subprocess.run([str(Path(sys.executable).parent / "qrun"), str(REPO / "workflows" / workflow)],
                            cwd=workdir, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"qrun {workflow} failed:\n{result.stderr[-4000:]}")
    return seconds, open_recorder(provider, workdir, experiment)


def open_recorder(provider: str, workdir: Path, experiment: str):
    """The one recorder of ``experiment`` in the runs (``mlruns.db``) that qrun left in ``workdir``."""
    from qlib.workflow import R

    from vn30_qlib.loop import init_qlib_for, sqlite_tracking_uri

    init_qlib_for(provider, sqlite_tracking_uri(workdir))
    return next(iter(R.list_recorders(experiment_name=experiment).values()))


def qrun(workflow: str, provider: str, workdir: Path, experiment: str) -> dict:
    """Run a workflow as a user would and return its wall time and recorded metrics."""
    seconds, recorder = run_workflow(workflow, provider, workdir, experiment)
    metrics = recorder.list_metrics()
    keep = ("IC", "ICIR", "Rank IC", "Rank ICIR", "tft_coverage_10_90", "tft_quantile_crossing",
            "1day.excess_return_with_cost.annualized_return", "1day.excess_return_with_cost.information_ratio")
    return {"seconds": seconds, **{k: metrics[k] for k in keep if k in metrics}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", default="/tmp/vn30_real")
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed for each implementation")
    parser.add_argument("--qrun", action="store_true", help="also time qrun tft_vn30.yaml and lgb_vn30.yaml")
    parser.add_argument("--no-pf", action="store_true", help="skip the pytorch-forecasting comparison")
    parser.add_argument("--torch-ops", action="store_true",
                        help="also time our TFT with the CPU kernels off (cpu_kernels='off'): all in torch's ops")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for everything (0 = every core)")
    args = parser.parse_args()
    from vn30_qlib.cpu import cpu_threads

    torch.set_num_threads(args.threads or cpu_threads())
    provider = str(Path(args.provider).expanduser())
    from qlib.data.dataset import DatasetH

    from handlers import VN30TFT
    from vn30_qlib.data.check import init_qlib

    report: dict = {"torch_threads": torch.get_num_threads(), "cores": os.cpu_count()}
    report["matmul_flops"] = matmul_flops()
    init_qlib(provider)
    start = time.perf_counter()
    data = DatasetH(VN30TFT(start_time="2015-10-05", end_time="2024-09-30", fit_start_time="2015-10-05",
                            fit_end_time="2021-12-31"), segments=SEGMENTS)
    report["handler_seconds"] = time.perf_counter() - start
    ours = tft_epochs(data, args.epochs, args.threads)
    epoch = min(ours["epoch_seconds"])
    steps = int(np.ceil(ours["train_rows"] / ours["model"].batch_size))
    report["tft"] = {
        "train_rows": ours["train_rows"], "epoch_seconds": ours["epoch_seconds"],
        "samples_per_second": ours["train_rows"] / epoch,
        "flops_per_step": ours["flops_per_step"],
        "achieved_flops": ours["flops_per_step"] * steps / epoch,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "parameters": sum(p.numel() for p in ours["model"].module.parameters()),
    }
    for when in ("during", "before"):
        references = ours[f"matmul_flops_{when}_epoch"]
        report["tft"][f"matmul_flops_{when}_epoch"] = references
        report["tft"][f"fraction_of_matmul_{when}_epoch"] = [
            ours["flops_per_step"] * steps / seconds / reference
            for seconds, reference in zip(ours["epoch_seconds"], references)]
    report["tft"]["fraction_of_matmul"] = float(np.median(report["tft"]["fraction_of_matmul_during_epoch"]))
    print(json.dumps(report, indent=1), flush=True)
    if args.torch_ops:
        torch_ops = tft_epochs(data, args.epochs, args.threads, cpu_kernels="off")
        report["tft_torch_ops"] = {"epoch_seconds": torch_ops["epoch_seconds"],
                                   "fused_epoch_ratio": epoch / min(torch_ops["epoch_seconds"])}
        print(json.dumps({"tft_torch_ops": report["tft_torch_ops"]}, indent=1), flush=True)
    if not args.no_pf:
        theirs = pf_epoch(ours["model"], data, args.epochs)
        theirs["peak_rss_mib_after"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        report["pytorch_forecasting"] = theirs
        report["epoch_ratio"] = epoch / min(theirs["epoch_seconds"])
        print(json.dumps({k: report[k] for k in ("pytorch_forecasting", "epoch_ratio")}, indent=1), flush=True)
    if args.qrun:
        with tempfile.TemporaryDirectory() as tmp:
            for workflow, name in (("tft_vn30.yaml", "tft_real"), ("lgb_vn30.yaml", "lgb_real")):
                workdir = Path(tmp) / name
                workdir.mkdir()
                report[name] = qrun(workflow, provider, workdir, name)
                print(json.dumps({name: report[name]}, indent=1), flush=True)
    print(json.dumps(report, indent=1, default=float))


if __name__ == "__main__":
    main()
