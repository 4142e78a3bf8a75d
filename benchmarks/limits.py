"""This machine's limits, measured: read bandwidth of a tensor much larger than the caches, and matmul peaks."""

from __future__ import annotations

import statistics
import time

import torch


def _timed(fn, repeats: int) -> list[float]:
    fn()  # warm up (page faults, thread pool, AMX tile setup)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


class Reader:
    """Read bandwidth in GB/s: sums of `gib` of float32 with the current thread count (a sum reads each byte once).
    Held, it can measure again beside another measurement: these machines' bandwidth drifts 1.5x within minutes."""

    def __init__(self, gib: float = 1.0):
        self.x = torch.ones(int(gib * 2**30) // 4)

    def rates(self, repeats: int) -> list[float]:
        return [self.x.nbytes / t / 1e9 for t in _timed(self.x.sum, repeats)]

    def __call__(self, repeats: int = 3) -> float:
        """The best of a few reads, now."""
        return max(self.rates(repeats))


def bandwidth(gib: float = 1.0, repeats: int = 9) -> tuple[float, float]:
    """(median, best) GB/s of `repeats` reads (Reader)."""
    rates = Reader(gib).rates(repeats)
    return statistics.median(rates), max(rates)


def matmul(dtype: torch.dtype, n: int = 2048, repeats: int = 7) -> tuple[float, float]:
    """(median, best) GFLOP/s of an n x n x n matrix product in `dtype`."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    ts = _timed(lambda: a @ b, repeats)
    return 2 * n**3 / statistics.median(ts) / 1e9, 2 * n**3 / min(ts) / 1e9


def measure() -> dict:
    return {"threads": torch.get_num_threads(), "bandwidth_gbs": bandwidth(),
            "matmul_gflops": {"float32": matmul(torch.float32), "bfloat16": matmul(torch.bfloat16, 4096)}}
