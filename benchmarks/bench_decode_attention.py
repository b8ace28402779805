"""Decode attention on CPU: variants for one query row per sequence.

For the default model's head layout (9 query heads, 3 KV heads, head_dim 64) and batch x context
shapes of at most 8,192 keys (the engine's DECODE_KEYS_PER_CALL), times (median of --repeats
rounds) the K/V gather through a slot matrix (index_select, as the engine) plus attention, as:
  - bf16 SDPA: torch's scaled_dot_product_attention on the bfloat16 cache, one query row per
    head and enable_gqa,
  - bf16 matmul: two batched matmuls in bfloat16 with a float32 softmax,
  - fp32 SDPA: K/V and q upcast to float32, then SDPA (ridgeline's decode path until 2026-11-23),
  - bf16 grouped: SDPA in bfloat16 with the 3 query heads of each KV head as 3 query rows
    (ridgeline's decode path now).

    .venv/bin/python benchmarks/bench_decode_attention.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

HQ, HKV, D = 9, 3, 64
SHAPES = [(1, 64), (1, 1024), (1, 4096), (8, 256), (8, 1024), (32, 256), (64, 128)]
NAMES = ("bf16 SDPA", "bf16 matmul", "fp32 SDPA", "bf16 grouped")


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
    bias16 = bias.to(dt)
    mask = torch.ones(b, 1, 1, ctx, dtype=torch.bool)
    scale = D ** -0.5

    def gather(cache):
        return cache.index_select(0, slots.reshape(-1)).view(b, ctx, HKV, D).transpose(1, 2)

    def bf16_sdpa():
        k, v = gather(kc), gather(vc)
        return F.scaled_dot_product_attention(q.view(b, HQ, 1, D), k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=True)

    def bf16_matmul():
        k, v = gather(kc), gather(vc)
        s = torch.matmul(q.view(b, HKV, HQ // HKV, D), k.transpose(-1, -2)).float()
        return torch.matmul((s * scale + bias).softmax(-1).to(dt), v)

    def fp32_sdpa():
        k, v = gather(kc).float(), gather(vc).float()
        out = F.scaled_dot_product_attention(q.float().view(b, HQ, 1, D), k, v, attn_mask=bias, scale=scale,
                                             enable_gqa=True)
        return out.to(dt)

    def bf16_grouped():
        return F.scaled_dot_product_attention(q.view(b, HKV, HQ // HKV, D), gather(kc), gather(vc),
                                              attn_mask=bias16, scale=scale)

    return dict(zip(NAMES, (bf16_sdpa, bf16_matmul, fp32_sdpa, bf16_grouped)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print("| batch | context | " + " | ".join(f"{n} us" for n in NAMES) + " |")
    for b, ctx in SHAPES:
        fns = variants(b, ctx)
        iters = max(5, 20_000 // (b * ctx // 16 + 1))
        rounds = {name: [] for name in fns}
        for _ in range(args.repeats):  # interleaved rounds so drift in machine load hits all alike
            for name, fn in fns.items():
                rounds[name].append(timed(fn, iters))
        med = {name: statistics.median(ts) for name, ts in rounds.items()}
        print(f"| {b} | {ctx} | " + " | ".join(f"{med[n]:.0f}" for n in NAMES) + " |", flush=True)


if __name__ == "__main__":
    main()
