"""`ridgeline perf probe`: measure this machine's peaks (matrix-multiply rate per dtype, memory
read bandwidth, per-operator dispatch time) and describe it as a HardwareSpec."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from .hardware import HardwareSpec


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of fn() after one warm-up call."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_flops(dtype: torch.dtype, device: torch.device, n: int, repeats: int = 5) -> float:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n ** 3 / _timed(lambda: torch.mm(a, b), device, repeats)


def read_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Streaming read rate: a sum over a buffer far larger than the caches."""
    x = torch.ones(nbytes // 4, device=device)
    return nbytes / _timed(lambda: x.sum(), device, repeats)


def dispatch_overhead(device: torch.device, calls: int = 2000) -> float:
    """Seconds per tiny operator: the Python + dispatcher (+ launch on GPU) floor of every op."""
    a = torch.ones(8, device=device)
    out = torch.empty_like(a)
    per_call = []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            torch.add(a, a, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_call.append((time.perf_counter() - t) / calls)
    return statistics.median(per_call)


def memory_capacity(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def probe(name: str = "local", device: str = "auto", quick: bool = False) -> HardwareSpec:
    """Measure the current device. quick: smaller problems (a few seconds in all; for tests)."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    gpu = dev.type == "cuda"
    n = (8192 if gpu else 2048) // (4 if quick else 1)
    peaks = {"float32": matmul_flops(torch.float32, dev, n)}
    peaks["bfloat16"] = matmul_flops(torch.bfloat16, dev, n)
    if gpu:
        peaks["float16"] = matmul_flops(torch.float16, dev, n)
    nbytes = (4 << 30 if gpu else 512 << 20) // (8 if quick else 1)
    bandwidth = read_bandwidth(dev, nbytes)
    overhead = dispatch_overhead(dev, 200 if quick else 2000)
    when = time.strftime("%Y-%m-%d")
    return HardwareSpec(
        name=name, peak_flops=peaks, memory_bandwidth=bandwidth, memory_capacity=memory_capacity(dev),
        op_overhead_s=overhead,
        source=f"measured by `ridgeline perf probe` on {device_description(dev)}, {when}",
        extra={"device": dev.type, "probe": {"matmul_n": n, "read_bytes": nbytes}})
