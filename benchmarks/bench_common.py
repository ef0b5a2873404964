"""Shared by the benchmark scripts (run as `python benchmarks/NAME.py`, so this folder is on sys.path)."""

from __future__ import annotations

import time

import torch


def streaming_bandwidth(repeats: int = 5) -> float:
    """Bytes/s for reading a 256 MiB buffer, far larger than the caches (best of `repeats`)."""
    x = torch.ones(256 * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best
