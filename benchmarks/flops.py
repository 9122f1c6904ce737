"""Model FLOPs utilisation helpers shared by the benchmarks.

The peak is *measured*, not looked up: the best of a few large ``torch.mm`` calls in the training dtype
on the same device, in the same process as the benchmark. Training FLOPs use the standard estimate
6 × parameters-in-the-forward-path × tokens (forward 2, backward 4) for trained weights, 2 for frozen
ones that only run forward plus 2 for the activation gradients they pass back (LLaVA's frozen vision
tower passes none: nothing before it trains).
"""

from __future__ import annotations

import time

import torch


def matmul_peak_flops(dtype: torch.dtype = torch.float32, device: str = "cpu", size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    torch.mm(a, b)  # warm up
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best
