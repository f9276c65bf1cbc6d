"""The device the benchmark suites run on, shared by bench_ops.py and bench_cache.py.

CUDA when a GPU is present, else the CPU; HARMONICA_BENCH_DEVICE=cpu|cuda chooses explicitly.
"""

from __future__ import annotations

import os

import torch

DEVICE = torch.device(os.environ.get("HARMONICA_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))


def synchronized(fn):
    """`fn` returning only once the device has finished its work (CUDA launches are asynchronous,
    so a wall-clock timer around them would measure the launch, not the kernel)."""
    if DEVICE.type != "cuda":
        return fn

    def run(*args, **kwargs):
        result = fn(*args, **kwargs)
        torch.cuda.synchronize(DEVICE)
        return result

    return run


def describe() -> str:
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name(DEVICE)
    return f"CPU, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
