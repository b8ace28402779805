"""Paged attention over the block-table KV cache.

The step's tokens are laid out flat: first every sequence with one new token (decode
rows), then the prefill chunks one after another. Attention metadata is built once per
step and shared by all layers: for each of the two groups a matrix of cache slots per
sequence, the query positions, and a boolean mask (causal, context length, optional
sliding window). Each layer then does one gather of K/V through the slot matrix per group,
then attention for the decode rows (with Hydragen, shared prefixes are attended once per
group; see hydragen.py) and one scaled-dot-product attention call for the prefill chunks.

Hybrid models (Gemma 2 / 3: some layers see a sliding window, the others everything) get two
metadata sets for one step, sharing the slot mapping: `meta` for the full-attention layers and
`meta.local` for the windowed ones, whose decode rows gather only the window's keys. Attention
logit soft-capping (Gemma 2: scores -> cap * tanh(scores / cap) before the mask) has no SDPA
or C-kernel form; it runs as explicit float32 matmuls (`_attend_softcap`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .core.config import HydragenConfig
from .core.prefix_groups import SharedPrefix, find_shared_prefixes
from .hydragen import PrefixPart, hydragen_decode
from .kernels import CpuKernels
from .kv_cache import gather_kv


@dataclass
class AttentionGroup:
    slots: torch.Tensor  # [B, Lk] cache slot of each key position (padded with 0)
    mask: torch.Tensor | None  # prefill: [B, 1, Lq, Lk] True where allowed; None: plain causal (see below)
    bias: torch.Tensor | None  # decode: [B, 1, 1, Lk] in the model's dtype, 0 where allowed, -inf elsewhere
    q_rows: torch.Tensor | None  # prefill: [B, Lq] rows of the flat batch (decode rows are contiguous)
    q_valid: torch.Tensor | None  # prefill: [B, Lq] real (non-padding) query entries
    num_rows: int  # flat rows covered by this group
    # decode with Hydragen: shared-prefix parts; then `slots`/`bias` cover only each row's own blocks
    prefix_parts: list[PrefixPart] | None = None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    decode: AttentionGroup | None
    prefill: AttentionGroup | None
    local: "AttentionMetadata | None" = None  # hybrid models: the sliding-window layers' groups


def _block_table_tensor(block_tables: list[list[int]], num_blocks: int) -> torch.Tensor:
    return torch.tensor([t[:num_blocks] + [0] * (num_blocks - len(t[:num_blocks])) for t in block_tables],
                        dtype=torch.long)


def _decode_group(block_tables: list[list[int]], starts: list[int], block_size: int, sliding_window: int | None,
                  hydragen: HydragenConfig | None, shared: tuple[list[SharedPrefix], list[int]] | None,
                  device: torch.device, dtype: torch.dtype) -> tuple[AttentionGroup, torch.Tensor]:
    """Decode rows: each attends from position start to keys [own_start, start]; own_start is 0
    unless Hydragen takes a shared prefix off the row (then attended once per group)."""
    parts: list[SharedPrefix] = []
    own_start = [0] * len(starts)
    if shared is None and hydragen is not None and sliding_window is None and len(starts) >= 2:
        shared = find_shared_prefixes(block_tables, [s // block_size for s in starts], block_size, hydragen)
    if shared is not None:
        parts, own_blocks = shared
        if parts:
            own_start = [n * block_size for n in own_blocks]
    ctx = torch.tensor(starts) + 1
    first = torch.tensor(own_start)
    if sliding_window is not None:  # keys before the window are not gathered at all
        first = torch.maximum(first, ctx - sliding_window)
    max_own = int((ctx - first).max())
    pos = first.unsqueeze(1) + torch.arange(max_own).unsqueeze(0)  # [B, Lo] key positions
    valid = pos < ctx.unsqueeze(1)
    if sliding_window is not None:
        valid &= pos > ctx.unsqueeze(1) - 1 - sliding_window
    pos = torch.where(valid, pos, 0)
    bt = _block_table_tensor(block_tables, -(-int(ctx.max()) // block_size))
    slots = bt.gather(1, pos // block_size) * block_size + pos % block_size
    new_slots = slots.gather(1, (ctx - 1 - first).unsqueeze(1)).squeeze(1)
    bias = torch.zeros(valid.shape, dtype=dtype).masked_fill_(~valid, float("-inf")).view(
        len(starts), 1, 1, max_own)
    prefix_parts = None
    if parts:
        offsets = torch.arange(block_size)
        prefix_parts = [PrefixPart(
            rows=None if len(p.rows) == len(starts) else torch.tensor(p.rows, device=device),
            slots=(torch.tensor(p.blocks).unsqueeze(1) * block_size + offsets).flatten().to(device))
            for p in parts]
    group = AttentionGroup(slots=slots.to(device), mask=None, bias=bias.to(device), q_rows=None, q_valid=None,
                           num_rows=len(starts), prefix_parts=prefix_parts)
    return group, new_slots


def _prefill_group(block_tables: list[list[int]], starts: list[int], lens: list[int], block_size: int,
                   sliding_window: int | None, row_offset: int,
                   device: torch.device) -> tuple[AttentionGroup, torch.Tensor]:
    """Prefill chunks, padded to the longest; also returns the new tokens' slots in flat-batch order."""
    ctx = [s + n for s, n in zip(starts, lens)]
    max_ctx, max_q = max(ctx), max(lens)
    bt = _block_table_tensor(block_tables, -(-max_ctx // block_size))
    # with a window, keys before every chunk's window are not gathered at all
    k0 = max(0, min(starts) - sliding_window + 1) if sliding_window is not None else 0
    kv_pos = torch.arange(k0, max_ctx)
    slots = bt[:, kv_pos // block_size] * block_size + (kv_pos % block_size)  # [B, max_ctx - k0]
    q_off = torch.arange(max_q).unsqueeze(0)
    q_valid = q_off < torch.tensor(lens).unsqueeze(1)  # [B, Lq]
    start_t = torch.tensor(starts).unsqueeze(1)
    q_pos = torch.where(q_valid, start_t + q_off, start_t)  # padding repeats the chunk's first position
    new_slots = (bt.gather(1, q_pos // block_size) * block_size + q_pos % block_size)[q_valid]
    kv = kv_pos.view(1, 1, -1)
    mask = (kv <= q_pos.unsqueeze(-1)) & (kv < torch.tensor(ctx).view(-1, 1, 1))  # [B, Lq, Lk]
    if sliding_window is not None:
        mask &= kv > q_pos.unsqueeze(-1) - sliding_window
    first = torch.tensor([0] + lens[:-1]).cumsum(0).unsqueeze(1) + row_offset
    q_rows = torch.where(q_valid, first + q_off, row_offset)
    # A lone chunk from position 0 is plain causal attention: SDPA's is_causal path skips the
    # blocks above the diagonal (1.7x faster than an explicit mask at 2,048 tokens on CPU).
    plain_causal = len(lens) == 1 and starts[0] == 0 and sliding_window is None
    group = AttentionGroup(slots=slots.to(device), mask=None if plain_causal else mask.unsqueeze(1).to(device),
                           bias=None,
                           q_rows=q_rows.to(device), q_valid=q_valid.to(device), num_rows=sum(lens))
    return group, new_slots


def build_metadata(block_tables: list[list[int]], starts: list[int], lens: list[int], block_size: int,
                   sliding_window: int | None, device: torch.device,
                   hydragen: HydragenConfig | None = None, dtype: torch.dtype = torch.float32,
                   shared: tuple[list[SharedPrefix], list[int]] | None = None,
                   local_window: int | None = None) -> AttentionMetadata:
    """Metadata for a flat batch whose sequences with lens == 1 come first. `hydragen` (None = off)
    sets when decode rows sharing prefix blocks attend to them as a group, unless the groups are
    given as `shared` (the scheduler's parts and each decode row's first own block); `dtype` is
    the model's (decode attention runs in it). `local_window` (hybrid models) adds `.local`, the
    same step's metadata for the layers that see only that window (without shared prefixes)."""
    meta = _build(block_tables, starts, lens, block_size, sliding_window, device, hydragen, dtype, shared)
    if local_window is not None:
        meta.local = _build(block_tables, starts, lens, block_size, local_window, device, None, dtype, None)
    return meta


def _build(block_tables: list[list[int]], starts: list[int], lens: list[int], block_size: int,
           sliding_window: int | None, device: torch.device, hydragen: HydragenConfig | None,
           dtype: torch.dtype, shared: tuple[list[SharedPrefix], list[int]] | None) -> AttentionMetadata:
    n_dec = 0
    while n_dec < len(lens) and lens[n_dec] == 1:
        n_dec += 1
    if any(n == 1 for n in lens[n_dec:]):
        raise ValueError("decode rows (one new token) must come before prefill chunks")
    decode = prefill = None
    new_slots = []
    if n_dec:
        decode, slots = _decode_group(block_tables[:n_dec], starts[:n_dec], block_size, sliding_window, hydragen,
                                      shared, device, dtype)
        new_slots.append(slots)
    if n_dec < len(lens):
        prefill, slots = _prefill_group(block_tables[n_dec:], starts[n_dec:], lens[n_dec:], block_size,
                                        sliding_window, n_dec, device)
        new_slots.append(slots)
    return AttentionMetadata(slot_mapping=torch.cat(new_slots).to(device), decode=decode, prefill=prefill)


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: AttentionGroup,
            scale: float) -> torch.Tensor:
    """q: [B, Lq, Hq, D] -> [B, Lq, Hq, D]."""
    k = gather_kv(k_cache, g.slots).transpose(1, 2)  # [B, Hkv, Lk, D]
    v = gather_kv(v_cache, g.slots).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=g.mask, is_causal=g.mask is None,
                                         scale=scale, enable_gqa=k.shape[1] != q.shape[2])
    return out.transpose(1, 2)


# Decode attention gathers each sequence's K/V into a dense float32 copy; past ~8k key rows
# per call that copy falls out of the CPU's last-level cache and the step slows 2-4x (e.g.
# 16 sequences x 4,096 keys: 50 ms per layer in one call, 13 ms in chunks of two).
DECODE_KEYS_PER_CALL = 8192


def _attend_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: AttentionGroup,
                   scale: float) -> torch.Tensor:
    """One query per sequence, q: [B, Hq, D] -> [B, Hq, D], in chunks of sequences of at most
    DECODE_KEYS_PER_CALL gathered keys."""
    b, hq, d = q.shape
    rows = max(1, DECODE_KEYS_PER_CALL // g.slots.shape[1])
    if rows < b:
        return torch.cat([_attend_decode_rows(q[i:i + rows], k_cache, v_cache, g.slots[i:i + rows],
                                              g.bias[i:i + rows], scale) for i in range(0, b, rows)])
    return _attend_decode_rows(q, k_cache, v_cache, g.slots, g.bias, scale)


def _attend_decode_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                        bias: torch.Tensor, scale: float) -> torch.Tensor:
    """The query heads that share a KV head become the rows of one query matrix ([B, Hkv,
    Hq / Hkv, D]), so the kernel reads each K/V row once and needs no GQA expansion, and it runs
    in the cache's dtype: in bfloat16 that is 1.1-1.5x faster than upcasting K/V to float32 (1 x
    4,096 keys: 421 vs 511 us per layer; 8 x 1,024: 719 vs 1,110 us), with float32 accumulation
    inside the kernel (docs/benchmarks.md, "Decode attention kernels")."""
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    k = gather_kv(k_cache, slots).transpose(1, 2)  # [B, Hkv, Lk, D]
    v = gather_kv(v_cache, slots).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, d), k, v, attn_mask=bias, scale=scale)
    return out.reshape(b, hq, d)


def _attend_softcap(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                    allowed: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """Attention with tanh soft-capped scores, as transformers' eager Gemma 2 attention computes it:
    q [B, Lq, Hq, D], slots [B, Lk], allowed [B, 1, Lq or 1, Lk] (bool) -> [B, Lq, Hq, D]."""
    b, lq, hq, d = q.shape
    k = gather_kv(k_cache, slots).transpose(1, 2)  # [B, Hkv, Lk, D]
    v = gather_kv(v_cache, slots).transpose(1, 2)
    rep = hq // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q.transpose(1, 2), k.transpose(-1, -2)) * scale  # [B, Hq, Lq, Lk]
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, v).transpose(1, 2)


def _causal_mask(g: AttentionGroup) -> torch.Tensor:
    """The plain-causal prefill group's mask, spelled out ([1, 1, Lq, Lk])."""
    n = g.slots.shape[1]
    return torch.ones(n, n, dtype=torch.bool, device=g.slots.device).tril().view(1, 1, n, n)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float, kernels: CpuKernels | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """q: [T, Hq, D] for the flat batch; K/V of these tokens are already in the cache. With
    `kernels`, decode rows read their own K/V straight from the paged cache. `softcap`: tanh
    soft-capping of the scores (PyTorch ops only, no shared-prefix parts)."""
    if softcap is not None:
        return _paged_attention_softcap(q, k_cache, v_cache, meta, scale, softcap)
    parts = []
    if meta.decode is not None:
        g = meta.decode
        if g.prefix_parts:
            parts.append(hydragen_decode(q[:g.num_rows], k_cache, v_cache, g.slots, g.bias, g.prefix_parts, scale,
                                         kernels))
        elif kernels is not None:
            parts.append(kernels.decode_attention(q[:g.num_rows], k_cache, v_cache, g.slots, g.bias, scale))
        else:
            parts.append(_attend_decode(q[:g.num_rows], k_cache, v_cache, g, scale))
    if meta.prefill is not None:
        g = meta.prefill
        out = _attend(q[g.q_rows], k_cache, v_cache, g, scale)
        parts.append(out[g.q_valid] if g.q_rows.shape[0] > 1 else out[0])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _paged_attention_softcap(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             meta: AttentionMetadata, scale: float, softcap: float) -> torch.Tensor:
    parts = []
    if meta.decode is not None:
        g = meta.decode
        if g.prefix_parts:
            raise ValueError("soft-capped attention does not take Hydragen's shared-prefix parts")
        n = g.num_rows
        parts.append(_attend_softcap(q[:n].unsqueeze(1), k_cache, v_cache, g.slots, g.bias == 0, scale,
                                     softcap).squeeze(1))
    if meta.prefill is not None:
        g = meta.prefill
        mask = g.mask if g.mask is not None else _causal_mask(g)
        out = _attend_softcap(q[g.q_rows], k_cache, v_cache, g.slots, mask, scale, softcap)
        parts.append(out[g.q_valid] if g.q_rows.shape[0] > 1 else out[0])
    return parts[0] if len(parts) == 1 else torch.cat(parts)
