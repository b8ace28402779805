"""Paged attention equals naive attention over contiguous K/V (float32, max abs diff <= 1e-5).

The batch mixes decode rows and prefill chunks with shuffled, block-unaligned block tables,
GQA head ratios, and an optional sliding window.
"""

from __future__ import annotations

import pytest
import torch

from ridgeline import attention
from ridgeline.attention import build_metadata, paged_attention
from ridgeline.kernels import load_cpu_kernels


def naive(q, k, v, start: int, window: int | None, scale: float) -> torch.Tensor:
    """q: [n, Hq, D] for positions start..start+n-1; k, v: [start+n, Hkv, D]."""
    n, hq, _ = q.shape
    rep = hq // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    qpos = torch.arange(start, start + n).unsqueeze(1)
    kpos = torch.arange(k.shape[0]).unsqueeze(0)
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


MIXED_SHAPES = [(0, 1), (5, 1), (13, 1), (31, 1), (0, 9), (6, 3), (17, 12), (3, 2)]
LONE_CHUNK = [(5, 1), (0, 23)]  # the prefill chunk alone from position 0 takes the is_causal path


@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["torch", "cpu_kernels"])
@pytest.mark.parametrize("hq, hkv, window, shapes, keys_per_call, dtype, d", [
    (4, 4, None, MIXED_SHAPES, None, torch.float32, 16), (8, 2, None, MIXED_SHAPES, None, torch.float32, 16),
    (9, 3, None, MIXED_SHAPES, None, torch.float32, 16), (6, 1, 7, MIXED_SHAPES, None, torch.float32, 16),
    (8, 2, None, LONE_CHUNK, None, torch.float32, 16), (8, 2, 5, LONE_CHUNK, None, torch.float32, 16),
    (8, 2, None, MIXED_SHAPES, 70, torch.float32, 16),  # decode rows attended in chunks of two sequences
    (9, 3, None, MIXED_SHAPES, None, torch.bfloat16, 16), (6, 1, 7, MIXED_SHAPES, 70, torch.bfloat16, 16),
    # head_dim 64: the kernels' vector dot products (bf16 pairs / float32 FMA); 24: the scalar tail
    (9, 3, None, MIXED_SHAPES, None, torch.float32, 64), (9, 3, 7, MIXED_SHAPES, None, torch.bfloat16, 64),
    (8, 2, None, MIXED_SHAPES, None, torch.float32, 24)])
def test_paged_attention_matches_naive(hq, hkv, window, shapes, keys_per_call, dtype, d, cpu_kernels, monkeypatch):
    """shapes: (tokens already in the cache, new tokens this step), decodes first, then prefill chunks.
    bfloat16 runs in bfloat16 against float32 attention over the same (rounded) inputs: within a
    few bfloat16 roundings of outputs of magnitude <= ~3. `cpu_kernels`: decode rows through the
    fused C kernel that reads the paged cache directly."""
    kernels = load_cpu_kernels() if cpu_kernels else None
    if cpu_kernels and kernels is None:
        pytest.skip("the fused CPU kernels did not build here (no C compiler?)")
    if keys_per_call is not None:
        monkeypatch.setattr(attention, "DECODE_KEYS_PER_CALL", keys_per_call)
    g = torch.Generator().manual_seed(hq * 10 + hkv)
    block_size, num_blocks = 4, 64
    perm = torch.randperm(num_blocks, generator=g).tolist()  # blocks scattered over the pool
    k_cache = torch.zeros(num_blocks * block_size, hkv, d)
    v_cache = torch.zeros_like(k_cache)
    tables, starts, lens, full_k, full_v, qs = [], [], [], [], [], []
    for start, n in shapes:
        ctx = start + n
        table = [perm.pop() for _ in range(-(-ctx // block_size))]
        k = torch.randn(ctx, hkv, d, generator=g)
        v = torch.randn(ctx, hkv, d, generator=g)
        pos = torch.arange(start)  # the cached part is written here; the new part by the caller below
        slots = torch.tensor(table)[pos // block_size] * block_size + pos % block_size
        k_cache[slots], v_cache[slots] = k[:start], v[:start]
        tables.append(table), starts.append(start), lens.append(n)
        full_k.append(k), full_v.append(v), qs.append(torch.randn(n, hq, d, generator=g))
    if dtype != torch.float32:  # the reference sees the same rounded values
        full_k, full_v, qs = ([t.to(dtype).float() for t in ts] for ts in (full_k, full_v, qs))
        k_cache, v_cache = k_cache.to(dtype), v_cache.to(dtype)
    meta = build_metadata(tables, starts, lens, block_size, window, torch.device("cpu"), dtype=dtype)
    k_cache.index_copy_(0, meta.slot_mapping, torch.cat([k[s:] for k, s in zip(full_k, starts)]).to(dtype))
    v_cache.index_copy_(0, meta.slot_mapping, torch.cat([v[s:] for v, s in zip(full_v, starts)]).to(dtype))
    scale = d ** -0.5
    out = paged_attention(torch.cat(qs).to(dtype), k_cache, v_cache, meta, scale, kernels)
    expected = torch.cat([naive(q, k, v, s, window, scale) for q, k, v, s in zip(qs, full_k, full_v, starts)])
    assert out.shape == expected.shape and out.dtype == dtype
    assert (out.float() - expected).abs().max().item() <= (1e-5 if dtype == torch.float32 else 3e-2)
