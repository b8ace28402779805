"""CPU kernels in C, compiled at first use for the CPU's instruction set and called via ctypes.

A batch-1 decode step of a small model is mostly small ATen ops: each costs 1-10 us of
dispatch and allocation on this class of CPU whatever its size, and F.rms_norm alone is a
six-op composite on CPU (~11 us for one 576-wide row). cpu_kernels.c does the per-layer
elementwise work in four calls: residual add + RMSNorm, SiLU(gate) * up, rotary + KV-cache
write, and paged decode attention that reads K/V through the slot table instead of gathering
a dense copy first. Each rounds where the PyTorch ops it replaces round, so outputs agree with
the PyTorch path to a bfloat16 ulp (float32: to float rounding).

quant_kernels.c multiplies by GGUF block-quantized weights in their own layout (see there).

The sources are compiled once with the system C compiler ($CC, else cc) into the cache directory,
keyed by the sources, the flags and the CPU's feature flags, in one of three variants chosen at
run time from what the CPU reports: "avx512" (-march=native on a CPU with AVX-512 F/BW/DQ/VL),
"avx2" (x86-64-v3: AVX2, FMA, F16C) or "scalar" (portable C). RIDGELINE_CPU_ISA=scalar|avx2|avx512
forces one (an error if the CPU lacks it). Without a compiler, or with RIDGELINE_CPU_KERNELS=0,
the model runs its PyTorch ops instead, and block-quantized weights are dequantized at load."""

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

SOURCES = [Path(__file__).with_name(n) for n in ("cpu_kernels.c", "quant_kernels.c")]
HEADERS = [Path(__file__).with_name("common.h")]
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]  # OpenMP: the runtime torch loads (libgomp.so.1)
ISA_FLAGS = {"avx512": ["-march=native"], "avx2": ["-march=x86-64-v3", "-mtune=generic"],
             "scalar": ["-march=x86-64", "-mtune=generic"] if platform.machine() in ("x86_64", "AMD64") else []}
# CPU feature flags (/proc/cpuinfo names) each variant needs
ISA_NEEDS = {"avx512": {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "f16c"},
             "avx2": {"avx2", "fma", "f16c"}, "scalar": set()}
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
_C = ctypes.c_int
_QUANT_SIGNATURES = {  # no dtype suffix: the dtype is an argument
    "quant_matmul": [_C, _P, _I, _I, _P, _I, _C, _P, _P, _I, _I],
    "dequant_rows": [_C, _P, _I, _P, _I, _P, _C],
}


# Decode attention runs on several threads once a step reads this many keys (a thread handoff
# costs ~20-50 us; one thread reads ~4,000 bfloat16 keys of 3 KV heads in ~250 us).
PARALLEL_MIN_KEYS = 4096


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, os.cpu_count() or 1), thread_name_prefix="ridgeline-kernels")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def supported_isas() -> list[str]:
    """The kernel variants this CPU can run, best first."""
    x86 = platform.machine() in ("x86_64", "AMD64")
    return [isa for isa in ("avx512", "avx2", "scalar") if isa == "scalar" or (x86 and ISA_NEEDS[isa] <= cpu_flags())]


def cpu_isa() -> str:
    """The variant in use: RIDGELINE_CPU_ISA if set (checked against the CPU), else the best."""
    forced = os.environ.get("RIDGELINE_CPU_ISA", "").strip().lower()
    have = supported_isas()
    if not forced:
        return have[0]
    if forced not in ISA_FLAGS:
        raise ValueError(f"RIDGELINE_CPU_ISA must be one of {', '.join(ISA_FLAGS)}, got {forced!r}")
    if forced not in have:
        missing = sorted(ISA_NEEDS[forced] - cpu_flags())
        raise ValueError(f"RIDGELINE_CPU_ISA={forced}: this CPU lacks {', '.join(missing) or 'x86-64'}; "
                         f"it supports {', '.join(have)}")
    return forced


def native_bf16() -> bool:
    """True where the kernels in use have bfloat16 dot products in hardware (AVX512-BF16 or AMX):
    dtype "auto" computes in bfloat16 only there (elsewhere bf16 matmuls are emulated and slower
    than float32)."""
    return cpu_isa() == "avx512" and bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def _compile(compiler: str, isa: str, out_dir: Path) -> Path:
    flags = [*FLAGS, *ISA_FLAGS[isa]]
    blob = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
    key = hashlib.sha256(blob + " ".join([compiler, *flags, platform.machine(), *sorted(cpu_flags())])
                         .encode()).hexdigest()[:16]
    lib = out_dir / f"kernels-{isa}-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        built = Path(tmp) / lib.name
        subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(built), "-lm"], check=True,
                       capture_output=True, timeout=300)
        os.replace(built, lib)  # atomic: concurrent processes never load a half-written file
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CpuKernels:
    """Typed wrappers over the compiled library; every tensor argument must be contiguous."""

    def __init__(self, path: str, isa: str):
        self.isa = isa
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
        for name, args in _QUANT_SIGNATURES.items():
            fn = getattr(parallel, f"rl_{name}")  # these release the GIL: their threads are OpenMP's
            fn.argtypes, fn.restype = args, None
            self._fns[name] = fn
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

    def quant_matmul(self, fmt: int, weight: torch.Tensor, out_features: int, in_features: int, x: torch.Tensor,
                     bias: torch.Tensor | None = None, activation_bytes: int = 1) -> torch.Tensor:
        """x [M, K] (float32 or bfloat16, contiguous) @ W^T for W of GGUF format id `fmt` in its
        block layout (uint8 [N, row bytes]); returns [M, N] in x's dtype (+ bias, x's dtype).
        activation_bytes: 1 (8 bits, llama.cpp's numerics) or 2 (about 15 bits, slower)."""
        y = x.new_empty(x.shape[0], out_features)
        self._fns["quant_matmul"](fmt, weight.data_ptr(), out_features, in_features, x.data_ptr(), x.shape[0],
                                  int(x.dtype == torch.bfloat16), _ptr(bias), y.data_ptr(), activation_bytes,
                                  torch.get_num_threads())
        return y

    def dequant_rows(self, fmt: int, weight: torch.Tensor, in_features: int, ids: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` (int64, contiguous) of a block-quantized weight as float32 or bfloat16."""
        out = torch.empty(ids.shape[0], in_features, dtype=dtype)
        self._fns["dequant_rows"](fmt, weight.data_ptr(), in_features, ids.data_ptr(), ids.shape[0], out.data_ptr(),
                                  int(dtype == torch.bfloat16))
        return out

    def handles_attention(self, num_heads: int) -> bool:
        return num_heads <= self.max_attention_heads


def load_cpu_kernels() -> CpuKernels | None:
    """The compiled kernels of the variant in use (cpu_isa()), or None (no compiler, a failed
    build, or RIDGELINE_CPU_KERNELS=0). Raises ValueError for a RIDGELINE_CPU_ISA this CPU
    cannot run."""
    if os.environ.get("RIDGELINE_CPU_KERNELS", "1") == "0":
        return None
    return kernels_for(cpu_isa())


@functools.cache
def kernels_for(isa: str) -> CpuKernels | None:
    """The kernels built for one variant (tests compare every variant the CPU supports)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: the CPU kernels are off (set CC to enable them)")
        return None
    from ..tokenizer import cache_dir
    try:
        kernels = CpuKernels(str(_compile(compiler, isa, cache_dir() / "kernels")), isa)
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        detail = getattr(e, "stderr", b"") or b""
        log.warning("CPU kernels unavailable (%s %s); running PyTorch ops", e, detail.decode()[-500:])
        return None
    log.info("CPU kernels: %s variant", isa)
    return kernels
