"""Decode attention on CPU: variants for one query row per sequence.

For the default model's head layout (9 query heads, 3 KV heads, head_dim 64) and batch x context
shapes of at most 8,192 keys (the engine's DECODE_KEYS_PER_CALL), times (median of --repeats
rounds) decode attention over a paged cache of blocks of 16 slots scattered over the pool. Each
call reads the next of 30 layers' caches, as a decode step does, so K/V come from memory rather
than from a cache that the previous call warmed. The PyTorch variants gather K/V through the
slot matrix first (index_select, as the engine's PyTorch path) and then attend:
  - bf16 SDPA: torch's scaled_dot_product_attention on the bfloat16 cache, one query row per
    head and enable_gqa,
  - bf16 matmul: two batched matmuls in bfloat16 with a float32 softmax,
  - fp32 SDPA: K/V and q upcast to float32, then SDPA (ridgeline's decode path until 2026-11-23),
  - bf16 grouped: SDPA in bfloat16 with the 3 query heads of each KV head as 3 query rows
    (ridgeline's PyTorch decode path),
  - C paged: ridgeline's fused CPU kernel (ridgeline/kernels), which reads K/V through the slot
    matrix itself, with its rows split over the threads for big steps (the engine's default).

    .venv/bin/python benchmarks/bench_decode_attention.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ridgeline.kernels import load_cpu_kernels

HQ, HKV, D = 9, 3, 64
LAYERS, BLOCK = 30, 16
SHAPES = [(1, 64), (1, 1024), (1, 4096), (8, 256), (8, 1024), (32, 256), (64, 128)]
NAMES = ("bf16 SDPA", "bf16 matmul", "fp32 SDPA", "bf16 grouped", "C paged")


def timed(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters * 1e6


def variants(b: int, ctx: int) -> dict:
    dt = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    blocks = -(-ctx // BLOCK)
    pool = 2 * b * blocks * BLOCK  # half the pool in use, as a cache partly full
    caches = [(torch.randn(pool, HKV, D, generator=g).to(dt), torch.randn(pool, HKV, D, generator=g).to(dt))
              for _ in range(LAYERS)]
    layer = iter(range(1 << 62))
    q = torch.randn(b, HQ, D, generator=g).to(dt)
    table = torch.randperm(pool // BLOCK, generator=g)[:b * blocks].view(b, blocks)
    slots = (table.repeat_interleave(BLOCK, 1) * BLOCK + torch.arange(BLOCK).repeat(blocks))[:, :ctx].contiguous()
    bias = torch.zeros(b, 1, 1, ctx)
    bias16 = bias.to(dt)
    mask = torch.ones(b, 1, 1, ctx, dtype=torch.bool)
    scale = D ** -0.5
    kernels = load_cpu_kernels()

    def next_layer():
        return caches[next(layer) % LAYERS]

    def gather(cache):
        return cache.index_select(0, slots.reshape(-1)).view(b, ctx, HKV, D).transpose(1, 2)

    def bf16_sdpa():
        kc, vc = next_layer()
        k, v = gather(kc), gather(vc)
        return F.scaled_dot_product_attention(q.view(b, HQ, 1, D), k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=True)

    def bf16_matmul():
        kc, vc = next_layer()
        k, v = gather(kc), gather(vc)
        s = torch.matmul(q.view(b, HKV, HQ // HKV, D), k.transpose(-1, -2)).float()
        return torch.matmul((s * scale + bias).softmax(-1).to(dt), v)

    def fp32_sdpa():
        kc, vc = next_layer()
        k, v = gather(kc).float(), gather(vc).float()
        out = F.scaled_dot_product_attention(q.float().view(b, HQ, 1, D), k, v, attn_mask=bias, scale=scale,
                                             enable_gqa=True)
        return out.to(dt)

    def bf16_grouped():
        kc, vc = next_layer()
        return F.scaled_dot_product_attention(q.view(b, HKV, HQ // HKV, D), gather(kc), gather(vc),
                                              attn_mask=bias16, scale=scale)

    def c_paged():
        kc, vc = next_layer()
        return kernels.decode_attention(q, kc, vc, slots, bias16, scale)

    fns = dict(zip(NAMES, (bf16_sdpa, bf16_matmul, fp32_sdpa, bf16_grouped, c_paged)))
    if kernels is None:
        del fns["C paged"]
    return fns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    names = list(variants(1, 16))
    print("| batch | context | " + " | ".join(f"{n} us" for n in names) + " |")
    for b, ctx in SHAPES:
        fns = variants(b, ctx)
        iters = max(5, 20_000 // (b * ctx // 16 + 1))
        rounds = {name: [] for name in fns}
        for _ in range(args.repeats):  # interleaved rounds so drift in machine load hits all alike
            for name, fn in fns.items():
                rounds[name].append(timed(fn, iters))
        med = {name: statistics.median(ts) for name, ts in rounds.items()}
        print(f"| {b} | {ctx} | " + " | ".join(f"{med[n]:.0f}" for n in names) + " |", flush=True)


if __name__ == "__main__":
    main()
