"""Where a TFT training step's time goes on CPU, by kind of op, and the ceiling that puts on its FLOP/s share.

    python bench/tft_step_profile.py --provider /tmp/vn30_real [--chunks 40] [--passes 5] [--threads 1]

Fits the workflow's TFT for one epoch on the real split (trained weights, the real panel), then profiles
``--chunks`` training chunks of 256 rows with torch.profiler, run as the loop runs them (its own function, with a
zero learning rate): batches of 1,024 rows, each with its static contexts encoded once and then forward + backward
four chunks at a time. It splits their self time into: matmuls (mm, addmm, bmm, also those the LSTM kernel calls,
and oneDNN's LSTM layers where they run), our CPU kernels (the variable selections' mix, the numeric embeddings,
the gates, ELU, dropout, the LSTM layers' gates), and everything else (elementwise ops, copies, reductions,
autograd bookkeeping). FLOPs are counted as in bench/tft_throughput.py. The machine is shared and its speed
drifts, so each of ``--passes`` unprofiled passes over the same chunks is timed right after 1 s of the matmul
reference, and the share reported is the median of the passes' shares. "If only the matmuls took time": the
chunk's FLOPs over the matmuls' time alone, as a share of the reference, the most any work on the other ops
could reach with these matmuls.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import numpy as np
import torch
from matmul_peak import matmul_flops  # bench/ is on the path when a bench script runs
from tft_throughput import SEGMENTS, mix_forward_flops, step_flops
from torch.profiler import ProfilerActivity, profile

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::mkldnn_rnn_layer", "aten::mkldnn_rnn_layer_backward"}
# vn30_qlib.models.cpu_kernels, by their autograd Functions
KERNEL_OPS = {f"{name}{part}" for name in ("_FusedVariableMix", "_NumericEmbedding", "_GLU", "_ELU", "_HashedDropout",
                                           "_LSTMLayer")
              for part in ("", "Backward")}
CHUNK_ROWS = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", default="/tmp/vn30_real")
    parser.add_argument("--chunks", type=int, default=40, help="256-row training chunks profiled")
    parser.add_argument("--passes", type=int, default=5, help="unprofiled passes over the chunks (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from qlib.data.dataset import DatasetH

    from handlers import VN30TFT
    from vn30_qlib.data.check import init_qlib
    from vn30_qlib.models import training
    from vn30_qlib.models.tft import TFT
    from vn30_qlib.models.tft.sub_modules import quantile_loss

    init_qlib(args.provider)
    data = DatasetH(VN30TFT(start_time="2015-10-05", end_time="2024-09-30", fit_start_time="2015-10-05",
                            fit_end_time="2021-12-31"), segments=SEGMENTS)
    model = TFT(n_epochs=1, early_stop=1, device="cpu", n_threads=args.threads)
    model.fit(data)
    panel = model._panel(data)
    rows = panel.rows(model._labels(data, "train").index)
    module, quantiles = model.module.train(), torch.tensor(model.quantiles)
    order = np.random.default_rng(0).permutation(len(rows.index))
    batch_rows = model.batch_size
    chunks_per_batch = batch_rows // CHUNK_ROWS
    batches = [(panel.batch(rows, order[i * batch_rows:(i + 1) * batch_rows], torch.device("cpu")),
                torch.zeros(batch_rows, model.horizons), torch.zeros(batch_rows, dtype=torch.long))
               for i in range(max(1, args.chunks // chunks_per_batch))]
    n_chunks = len(batches) * chunks_per_batch
    flops = step_flops(module, batches[0][0], quantiles) / chunks_per_batch  # a 256-row chunk's share
    still = torch.optim.SGD(module.parameters(), lr=0.0)  # the loop's optimizer step, leaving the weights as they are

    def loss(output, label, days):
        return quantile_loss(output, label, quantiles)

    def run(batch):
        training._train_one_epoch(module, still, [batch], loss, None, CHUNK_ROWS, module.encode_static)

    run(batches[0])
    passes, references = [], []
    for _ in range(args.passes):
        references.append(matmul_flops(seconds=1.0))
        start = time.perf_counter()
        for batch in batches:
            run(batch)
        passes.append((time.perf_counter() - start) / n_chunks)
    shares = [flops / seconds / reference for seconds, reference in zip(passes, references)]
    reference, unprofiled = float(np.median(references)), float(np.median(passes))
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for batch in batches:
            run(batch)
    seconds: dict[str, float] = defaultdict(float)
    for event in profiler.key_averages():
        kind = "matmuls" if event.key in MATMUL_OPS else "our CPU kernels" if event.key in KERNEL_OPS else "other ops"
        seconds[kind] += event.self_cpu_time_total / 1e6 / n_chunks
    profiled = sum(seconds.values())
    report = {
        "threads": args.threads, "matmul_reference_gflops": reference / 1e9, "gflop_per_chunk": flops / 1e9,
        "ms_per_chunk_unprofiled": unprofiled * 1e3,
        "ms_per_chunk_unprofiled_passes": [round(value * 1e3, 1) for value in passes],
        "ms_per_chunk_profiled": profiled * 1e3,
        "ms_per_chunk_by_kind": {kind: value * 1e3 for kind, value in sorted(seconds.items())},
        "share_of_matmul_reference": float(np.median(shares)),
        "share_of_matmul_reference_passes": [round(share, 3) for share in shares],
        "share_if_only_matmuls_and_our_kernels_took_time":
            flops / (seconds["matmuls"] + seconds["our CPU kernels"]) / reference,
        "share_if_only_matmuls_took_time": flops / seconds["matmuls"] / reference,
        "matmul_gflops_in_the_step":
            (flops - 3 * mix_forward_flops(module, batches[0][0]) / chunks_per_batch) / seconds["matmuls"] / 1e9,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
