"""Hydragen shared-prefix decode attention equals reference attention (float32, max abs diff <= 1e-5).

Random cases over group sizes 1..64, shared prefixes and own suffixes of 0 and block-unaligned
lengths, GQA head ratios, and two-level (nested) sharing. Sequences share physical KV blocks the
way the engine makes them: the full blocks of the shared prefix are the same block ids, a partly
filled last prefix block is a private copy.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from ridgeline.attention import build_metadata, paged_attention
from ridgeline.core.config import HydragenConfig
from ridgeline.core.prefix_groups import find_shared_prefixes
from ridgeline.kernels import load_cpu_kernels

from .test_attention import naive

BS = 8
ALWAYS = HydragenConfig(min_saved_tokens=1, min_saved_fraction=0.0)


class Pool:
    def __init__(self, num_blocks: int, hkv: int, d: int, g: torch.Generator):
        self.k = torch.zeros(num_blocks * BS, hkv, d)
        self.v = torch.zeros_like(self.k)
        self.free = torch.randperm(num_blocks, generator=g).tolist()

    def write(self, table: list[int], start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        pos = torch.arange(start, start + k.shape[0])
        slots = torch.tensor(table, dtype=torch.long)[pos // BS] * BS + pos % BS
        self.k[slots], self.v[slots] = k, v

    def blocks(self, n: int) -> list[int]:
        return [self.free.pop() for _ in range(n)]


def run_case(group: int, prefix: int, sub_prefix: int, suffix_max: int, hq: int, hkv: int, seed: int,
             cfg: HydragenConfig = ALWAYS, dtype: torch.dtype = torch.float32, kernels=None) -> int:
    """`group` sequences share `prefix` tokens; the first half of them share `sub_prefix` more.
    Returns how many shared parts Hydragen used. In bfloat16 the reference sees the same rounded
    K/V and queries, and the outputs (magnitude <= ~3) must agree to a few bfloat16 roundings."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    pool = Pool(4096, hkv, d, g)

    def rnd(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.randn(n, hkv, d, generator=g).to(dtype).float() for _ in range(2))

    pk, pv = rnd(prefix)
    shared = pool.blocks(prefix // BS)
    pool.write(shared + [0] * 8, 0, pk[:len(shared) * BS], pv[:len(shared) * BS])
    sk, sv = rnd(sub_prefix)
    sub_len = prefix + sub_prefix
    sub_shared = None
    tables, starts, full_k, full_v = [], [], [], []
    for i in range(group):
        in_sub = i < max(1, group // 2) and sub_prefix > 0
        k, v = pk, pv
        if in_sub:
            k, v = torch.cat([pk, sk]), torch.cat([pv, sv])
            if sub_shared is None:  # the subgroup's extra full blocks, after the group's prefix
                table = shared + pool.blocks(-(-sub_len // BS) - len(shared))
                pool.write(table, len(shared) * BS, k[len(shared) * BS:], v[len(shared) * BS:])
                sub_shared = table[:sub_len // BS]
            table = list(sub_shared)
        else:
            table = list(shared)
        suffix = int(torch.randint(0, suffix_max + 1, (1,), generator=g))
        own_k, own_v = rnd(suffix + 1)  # suffix plus the token decoded this step
        k, v = torch.cat([k, own_k]), torch.cat([v, own_v])
        ctx = k.shape[0]
        copied = len(table) * BS  # a partly filled shared block is this sequence's own copy
        table += pool.blocks(-(-ctx // BS) - len(table))
        pool.write(table, copied, k[copied:ctx - 1], v[copied:ctx - 1])
        tables.append(table), starts.append(ctx - 1), full_k.append(k), full_v.append(v)
    meta = build_metadata(tables, starts, [1] * group, BS, None, torch.device("cpu"), hydragen=cfg, dtype=dtype)
    pool.k.index_copy_(0, meta.slot_mapping, torch.stack([k[-1] for k in full_k]))
    pool.v.index_copy_(0, meta.slot_mapping, torch.stack([v[-1] for v in full_v]))
    q = torch.randn(group, hq, d, generator=g).to(dtype)
    scale = d ** -0.5
    out = paged_attention(q, pool.k.to(dtype), pool.v.to(dtype), meta, scale, kernels)
    expected = torch.cat([naive(q[i:i + 1].float(), full_k[i], full_v[i], starts[i], None, scale)
                          for i in range(group)])
    assert out.dtype == dtype
    assert (out.float() - expected).abs().max().item() <= (1e-5 if dtype == torch.float32 else 3e-2)
    return len(meta.decode.prefix_parts or [])


def kernels_or_skip(cpu_kernels: bool):
    """None (PyTorch attention), or the fused CPU kernels for each row's own blocks."""
    kernels = load_cpu_kernels() if cpu_kernels else None
    if cpu_kernels and kernels is None:
        pytest.skip("the fused CPU kernels did not build here (no C compiler?)")
    return kernels


@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["torch", "cpu_kernels"])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (9, 3)])
def test_hydragen_matches_reference(hq, hkv, cpu_kernels):
    kernels = kernels_or_skip(cpu_kernels)
    used = 0
    cases = itertools.product([1, 2, 3, 17, 64], [0, 5, 8, 37], [0, 11], [0, 3, 20])
    for seed, (group, prefix, sub, suffix) in enumerate(cases):
        parts = run_case(group, prefix, sub, suffix, hq, hkv, seed, kernels=kernels)
        if group >= 2 and prefix >= BS:
            assert parts >= 1, (group, prefix, sub, suffix)
        if group >= 4 and prefix >= BS and sub + prefix % BS >= BS:
            assert parts == 2, "nested sharing should give a second level"
        used += parts
    assert used > 0


@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["torch", "cpu_kernels"])
def test_hydragen_matches_reference_in_bfloat16(cpu_kernels):
    kernels = kernels_or_skip(cpu_kernels)
    cases = itertools.product([2, 17, 64], [8, 37], [0, 11], [3])
    assert sum(run_case(group, prefix, sub, suffix, 9, 3, seed, dtype=torch.bfloat16, kernels=kernels)
               for seed, (group, prefix, sub, suffix) in enumerate(cases)) > 0


def test_threshold_gates_hydragen():
    rule = HydragenConfig(min_saved_tokens=512, min_saved_fraction=0.0)
    assert run_case(8, 72, 0, 3, 8, 2, 0, rule) == 0  # 7 x 72 = 504 tokens saved: not worth it
    assert run_case(8, 80, 0, 3, 8, 2, 0, rule) == 1  # 7 x 80 = 560
    assert run_case(2, 520, 0, 3, 8, 2, 0, rule) == 1
    assert run_case(2, 500, 0, 3, 8, 2, 0, rule) == 0


def test_saved_fraction_gates_hydragen():
    """Parts must save at least min_saved_fraction of the step's full-block K/V reads."""
    rule = HydragenConfig(min_saved_tokens=1, min_saved_fraction=0.5)
    group = [[1, 2, 3, 4 + i] for i in range(4)]  # 4 rows sharing 3 of their 4 full blocks: 9 of 16 saved
    parts, own = find_shared_prefixes(group, [4] * 4, 16, rule)
    assert [(p.rows, p.blocks) for p in parts] == [([0, 1, 2, 3], [1, 2, 3])] and own == [3] * 4
    unshared = [[10 + 4 * i + j for j in range(4)] for i in range(4)]  # 4 more rows: 9 of 32 saved
    parts, own = find_shared_prefixes(group + unshared, [4] * 8, 16, rule)
    assert parts == [] and own == [0] * 8


def test_find_shared_prefixes_nested():
    tables = [[1, 2, 3, 10], [1, 2, 3, 11], [1, 2, 4, 12], [1, 2, 4, 13], [5, 6, 7, 14]]
    parts, own = find_shared_prefixes(tables, [3, 3, 3, 3, 3], 16, HydragenConfig(min_saved_tokens=16))
    assert [(p.rows, p.blocks) for p in parts] == [([0, 1, 2, 3], [1, 2]), ([0, 1], [3]), ([2, 3], [4])]
    assert own == [3, 3, 3, 3, 0]
