"""Fused CPU kernels in C for the decode hot path, compiled at first use and called via ctypes.

A batch-1 decode step of a small model is mostly small ATen ops: each costs 1-10 us of
dispatch and allocation on this class of CPU whatever its size, and F.rms_norm alone is a
six-op composite on CPU (~11 us for one 576-wide row). cpu_kernels.c does the per-layer
elementwise work in four calls: residual add + RMSNorm, SiLU(gate) * up, rotary + KV-cache
write, and paged decode attention that reads K/V through the slot table instead of gathering
a dense copy first. Each rounds where the PyTorch ops it replaces round, so outputs agree with
the PyTorch path to a bfloat16 ulp (float32: to float rounding).

The source is compiled once with the system C compiler ($CC, else cc) into the cache directory,
keyed by the source, the flags and the CPU's feature flags (-march=native). Without a compiler,
or with RIDGELINE_CPU_KERNELS=0, the model runs its PyTorch ops instead."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger("ridgeline")

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-shared", "-fPIC"]
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_P = ctypes.c_void_p
_I = ctypes.c_int64
_F = ctypes.c_float
_SIGNATURES = {
    "add_rms_norm": [_P, _P, _P, _P, _I, _I, _F],
    "silu_mul": [_P, _P, _I, _I],
    "rope_store": [_P, _I, _P, _I, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _P],
    "decode_attention": [_P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _F, _P, _P],
}


# Decode attention runs on several threads once a step reads this many keys (a thread handoff
# costs ~20-50 us; one thread reads ~4,000 bfloat16 keys of 3 KV heads in ~250 us).
PARALLEL_MIN_KEYS = 4096


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="ridgeline-kernels")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _compile(compiler: str, out_dir: Path) -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *FLAGS, platform.machine(), _cpu_flags()])
                         .encode()).hexdigest()[:16]
    lib = out_dir / f"cpu_kernels-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        built = Path(tmp) / lib.name
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], check=True, capture_output=True,
                       timeout=120)
        os.replace(built, lib)  # atomic: concurrent processes never load a half-written file
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CpuKernels:
    """Typed wrappers over the compiled library; every tensor argument must be contiguous."""

    def __init__(self, path: str):
        # Two handles on one library: PyDLL calls keep the GIL, CDLL calls release it. A kernel
        # call takes microseconds; releasing and retaking the GIL around each of ~150 calls per
        # step lets another Python thread (the server's HTTP thread) slip in and delay the step.
        # Only the thread-split attention releases it, so its threads can run at once.
        serial, parallel = ctypes.PyDLL(path), ctypes.CDLL(path)
        self._fns = {}
        for name, args in _SIGNATURES.items():
            for dtype, suffix in _SUFFIX.items():
                handles = [(serial, (name, dtype))]
                if name == "decode_attention":
                    handles.append((parallel, (name, dtype, "nogil")))
                for lib, key in handles:
                    fn = getattr(lib, f"rl_{name}_{suffix}")
                    fn.argtypes, fn.restype = args, None
                    self._fns[key] = fn
        serial.rl_decode_attention_max_heads.restype = ctypes.c_int64
        self.max_attention_heads = serial.rl_decode_attention_max_heads()

    @staticmethod
    def supports(dtype: torch.dtype) -> bool:
        return dtype in _SUFFIX

    def add_rms_norm(self, h: torch.Tensor, weight: torch.Tensor, eps: float,
                     delta: torch.Tensor | None = None) -> torch.Tensor:
        """RMSNorm of h's rows; with delta, first h += delta in place (the residual add)."""
        out = torch.empty_like(h)
        self._fns["add_rms_norm", h.dtype](h.data_ptr(), _ptr(delta), weight.data_ptr(), out.data_ptr(),
                                           h.shape[0], h.shape[1], eps)
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2I] (gate, up) -> [T, I] silu(gate) * up."""
        t, two_i = gate_up.shape
        out = gate_up.new_empty(t, two_i // 2)
        self._fns["silu_mul", gate_up.dtype](gate_up.data_ptr(), out.data_ptr(), t, two_i // 2)
        return out

    def rope_store(self, qk: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                   num_heads: int) -> torch.Tensor:
        """Rotary on q and k (qk: [T, >= (Hq + Hkv) * D] rows, v: [T, >= Hkv * D] rows, both with
        unit inner stride), k and v written to the cache at `slots`; returns q [T, Hq, D]."""
        t = qk.shape[0]
        hkv, d = k_cache.shape[1], k_cache.shape[2]
        q = qk.new_empty(t, num_heads, d)
        self._fns["rope_store", qk.dtype](qk.data_ptr(), qk.stride(0), v.data_ptr(), v.stride(0), t, num_heads, hkv,
                                          d, positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), q.data_ptr(),
                                          k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr())
        return q

    def decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                         bias: torch.Tensor, scale: float, with_lse: bool = False):
        """q [B, Hq, D], slots [B, Lk] int64, bias [B, .., Lk] (0 / -inf) -> out [B, Hq, D] in q's
        dtype; with `with_lse`, (out in float32, lse [B, Hq] float32)."""
        b, hq, d = q.shape
        hkv, lk = k_cache.shape[1], slots.shape[1]
        out = torch.empty_like(q, dtype=torch.float32 if with_lse else q.dtype)
        lse = torch.empty(b, hq, dtype=torch.float32) if with_lse else None
        parts = min(torch.get_num_threads(), b, 1 + b * lk // PARALLEL_MIN_KEYS)
        fn = self._fns["decode_attention", q.dtype] if parts <= 1 else self._fns["decode_attention", q.dtype, "nogil"]

        def rows(start: int, stop: int) -> None:
            fn(q[start].data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots[start].data_ptr(),
               bias[start].data_ptr(), stop - start, hkv, hq // hkv, d, lk, scale, out[start].data_ptr(),
               None if lse is None else lse[start].data_ptr())

        # Each row is computed the same way whichever split it falls in, so splitting the rows
        # over threads changes speed, not results.
        if parts <= 1:
            rows(0, b)
        else:
            bounds = [b * p // parts for p in range(parts + 1)]
            futures = [_pool().submit(rows, lo, hi) for lo, hi in zip(bounds[1:-1], bounds[2:])]
            rows(0, bounds[1])
            for f in futures:
                f.result()
        return (out, lse) if with_lse else out

    def handles_attention(self, num_heads: int) -> bool:
        return num_heads <= self.max_attention_heads


@functools.cache
def load_cpu_kernels() -> CpuKernels | None:
    """The compiled kernels, or None (no compiler, a failed build, or RIDGELINE_CPU_KERNELS=0)."""
    if os.environ.get("RIDGELINE_CPU_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: the fused CPU kernels are off (set CC to enable them)")
        return None
    from ..tokenizer import cache_dir
    try:
        return CpuKernels(str(_compile(compiler, cache_dir() / "kernels")))
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.warning("fused CPU kernels unavailable (%s %s); running PyTorch ops", e, detail.decode()[-500:])
        return None
