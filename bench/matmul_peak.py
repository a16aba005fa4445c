"""This machine's reference compute rate, which the model benchmarks report their FLOP/s against."""
from __future__ import annotations

import time

import torch


def matmul_flops(seconds: float = 3.0, n: int = 2048) -> float:
    """Best float32 FLOP/s of an n x n matmul over ``seconds`` (at least one timed multiply), with torch's current
    threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while True:
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
        if time.perf_counter() >= end:
            return best
