"""The block-quantized matmul kernels alone, per format, against this machine's limits.

Weights: one Llama-3.2-1B layer's matrices (q/k/v 2048 -> 3072, o 2048 -> 2048, gate/up 2048 ->
16384, down 8192 -> 2048), --layers copies so they exceed the caches, random blocks in each format.
  m = 1      GB/s of weights read per second, and that as a fraction of the memory read bandwidth
             measured in the same run (ridgeline.perf.probe.read_bandwidth, 512 MiB): decode's limit.
  m = 8, 64, 512  G multiply-adds per second, and the ratio to torch's dense matmul of the same
             shapes in the engine's activation dtype (bfloat16 where the CPU has native bf16, else
             float32), timed in the same run.

    .venv/bin/python benchmarks/bench_quant_kernels.py [--formats Q4_K,Q6_K] [--isa avx2] [--repeats 5]
        [--activation-bytes 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.timing import median_time  # noqa: E402
from ridgeline.kernels import cpu_isa, kernels_for, native_bf16  # noqa: E402
from ridgeline.perf.probe import read_bandwidth  # noqa: E402
from ridgeline.quant import FORMATS, QuantLinear  # noqa: E402
from tests.test_quant_kernels import random_weight  # noqa: E402

SHAPES_1B = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192)]  # (out, in) per layer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--isa", default=None, help="kernel variant (default: the best this CPU runs)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--rows", default="1,8,64,512")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--activation-bytes", type=int, default=1, choices=[1, 2])
    args = ap.parse_args()
    isa = args.isa or cpu_isa()
    kern = kernels_for(isa)
    dtype = torch.bfloat16 if native_bf16() and isa == "avx512" else torch.float32
    threads = torch.get_num_threads()
    bw = read_bandwidth(torch.device("cpu"), 512 << 20)
    print(f"# {platform.processor() or platform.machine()} {os.cpu_count()} CPUs, {threads} threads, isa {isa}, "
          f"activations {dtype} at {args.activation_bytes} byte(s) per value, read bandwidth {bw / 1e9:.1f} GB/s")
    rows = [int(r) for r in args.rows.split(",")]
    shapes = SHAPES_1B * args.layers
    macs = sum(n * k for n, k in shapes)
    dense = [torch.randn(n, k).to(dtype) for n, k in SHAPES_1B]
    print("| format | m=1 GB/s | of bandwidth | " + " | ".join(f"m={m} GMAC/s (x dense)" for m in rows[1:]) + " |")
    print("|---|---|---|" + "---|" * (len(rows) - 1))
    for fmt in args.formats.split(","):
        mats = [QuantLinear(random_weight(fmt, n, k, seed=i), kern, None, args.activation_bytes)
                for i, (n, k) in enumerate(shapes)]
        nbytes = sum(q.weight.nbytes for q in mats)
        cells = []
        for m in rows:
            xs = {k: torch.randn(m, k).to(dtype) for _, k in SHAPES_1B}
            t = median_time(lambda: [q(xs[q.in_features]) for q in mats], args.repeats)
            if m == 1:
                cells += [f"{nbytes / t / 1e9:.1f}", f"{nbytes / t / bw:.0%}"]
                continue
            td = median_time(lambda: [torch.nn.functional.linear(xs[w.shape[1]], w) for w in dense],
                             args.repeats) * args.layers
            cells.append(f"{m * macs / t / 1e9:.1f} ({td / t:.2f}x)")
        print(f"| {fmt} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
