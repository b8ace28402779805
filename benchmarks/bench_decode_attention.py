"""Why decode attention upcasts to float32: CPU attention variants for one query row per sequence.

For the default model's head layout (9 query heads, 3 KV heads, head_dim 64) and a few batch
sizes and context lengths, times (median of --repeats rounds) the K/V gather through a slot
matrix plus attention, done as:
  - bf16 SDPA: torch's scaled_dot_product_attention on the bfloat16 cache,
  - bf16 matmul: two batched matmuls in bfloat16 with a float32 softmax,
  - fp32 SDPA: K/V and q upcast to float32, then SDPA (what ridgeline's decode path does).

    .venv/bin/python benchmarks/bench_decode_attention.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

HQ, HKV, D = 9, 3, 64
SHAPES = [(1, 64), (1, 1024), (8, 256), (32, 256), (32, 1024)]


def timed(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters * 1e6


def variants(b: int, ctx: int, pool: int = 40_000) -> dict:
    dt = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    kc = torch.randn(pool, HKV, D, generator=g).to(dt)
    vc = torch.randn(pool, HKV, D, generator=g).to(dt)
    q = torch.randn(b, HQ, D, generator=g).to(dt)
    slots = torch.randint(0, pool, (b, ctx), generator=g)
    bias = torch.zeros(b, 1, 1, ctx)
    mask = torch.ones(b, 1, 1, ctx, dtype=torch.bool)
    scale = D ** -0.5

    def bf16_sdpa():
        k, v = kc[slots].transpose(1, 2), vc[slots].transpose(1, 2)
        return F.scaled_dot_product_attention(q.view(b, HQ, 1, D), k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=True)

    def bf16_matmul():
        k, v = kc[slots].transpose(1, 2), vc[slots].transpose(1, 2)
        s = torch.matmul(q.view(b, HKV, HQ // HKV, D), k.transpose(-1, -2)).float()
        return torch.matmul((s * scale + bias).softmax(-1).to(dt), v)

    def fp32_sdpa():
        k, v = kc[slots].transpose(1, 2).float(), vc[slots].transpose(1, 2).float()
        out = F.scaled_dot_product_attention(q.float().view(b, HQ, 1, D), k, v, attn_mask=bias, scale=scale,
                                             enable_gqa=True)
        return out.to(dt)

    return {"bf16 SDPA": bf16_sdpa, "bf16 matmul": bf16_matmul, "fp32 SDPA": fp32_sdpa}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"{'batch':>5} {'context':>7} {'bf16 SDPA us':>13} {'bf16 matmul us':>15} {'fp32 SDPA us':>13}")
    for b, ctx in SHAPES:
        fns = variants(b, ctx)
        iters = max(5, 20_000 // (b * ctx // 16 + 1))
        rounds = {name: [] for name in fns}
        for _ in range(args.repeats):  # interleaved rounds so drift in machine load hits all alike
            for name, fn in fns.items():
                rounds[name].append(timed(fn, iters))
        med = {name: statistics.median(ts) for name, ts in rounds.items()}
        print(f"{b:>5} {ctx:>7} {med['bf16 SDPA']:>13.0f} {med['bf16 matmul']:>15.0f} {med['fp32 SDPA']:>13.0f}")


if __name__ == "__main__":
    main()
