"""Paged attention over the block-table KV cache.

The step's tokens are laid out flat: first every sequence with one new token (decode
rows), then the prefill chunks one after another. Attention metadata is built once per
step and shared by all layers: for each of the two groups a matrix of cache slots per
sequence, the query positions, and a boolean mask (causal, context length, optional
sliding window). Each layer then does one gather of K/V through the slot matrix and one
scaled-dot-product attention call per group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionGroup:
    slots: torch.Tensor  # [B, Lk] cache slot of each key position (padded with 0)
    mask: torch.Tensor  # [B, 1, Lq, Lk] True where attention is allowed
    q_rows: torch.Tensor | None  # [B, Lq] rows of the flat batch (None: the rows are contiguous, Lq == 1)
    q_valid: torch.Tensor | None  # [B, Lq] real (non-padding) query entries
    num_rows: int  # flat rows covered by this group


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    decode: AttentionGroup | None
    prefill: AttentionGroup | None


def _group(block_tables: list[list[int]], starts: list[int], lens: list[int], block_size: int,
           sliding_window: int | None, row_offset: int, device: torch.device) -> AttentionGroup:
    b = len(lens)
    ctx = [s + n for s, n in zip(starts, lens)]
    max_ctx, max_q = max(ctx), max(lens)
    max_blocks = -(-max_ctx // block_size)
    bt = torch.tensor([t[:max_blocks] + [0] * (max_blocks - len(t[:max_blocks])) for t in block_tables],
                      dtype=torch.long)
    kv_pos = torch.arange(max_ctx)
    slots = bt[:, kv_pos // block_size] * block_size + (kv_pos % block_size)
    starts_t = torch.tensor(starts).unsqueeze(1)
    lens_t = torch.tensor(lens).unsqueeze(1)
    q_off = torch.arange(max_q).unsqueeze(0)
    q_valid = q_off < lens_t  # [B, Lq]
    q_pos = torch.where(q_valid, starts_t + q_off, 0)  # padded queries sit at position 0
    kv = kv_pos.view(1, 1, -1)
    mask = (kv <= q_pos.unsqueeze(-1)) & (kv < torch.tensor(ctx).view(-1, 1, 1))
    if sliding_window is not None:
        mask &= kv > q_pos.unsqueeze(-1) - sliding_window
    q_rows = None
    if max_q > 1:
        first = torch.tensor([0] + lens[:-1]).cumsum(0).unsqueeze(1) + row_offset
        q_rows = torch.where(q_valid, first + q_off, row_offset)
    return AttentionGroup(
        slots=slots.to(device), mask=mask.unsqueeze(1).to(device),
        q_rows=None if q_rows is None else q_rows.to(device),
        q_valid=None if max_q == 1 else q_valid.to(device), num_rows=sum(lens))


def build_metadata(block_tables: list[list[int]], starts: list[int], lens: list[int], block_size: int,
                   sliding_window: int | None, device: torch.device) -> AttentionMetadata:
    """Metadata for a flat batch whose sequences with lens == 1 come first."""
    n_dec = 0
    while n_dec < len(lens) and lens[n_dec] == 1:
        n_dec += 1
    if any(n == 1 for n in lens[n_dec:]):
        raise ValueError("decode rows (one new token) must come before prefill chunks")
    slot_parts = []
    for table, s, n in zip(block_tables, starts, lens):
        pos = torch.arange(s, s + n)
        slot_parts.append(torch.tensor(table, dtype=torch.long)[pos // block_size] * block_size + pos % block_size)
    slot_mapping = torch.cat(slot_parts).to(device)
    decode = prefill = None
    if n_dec:
        decode = _group(block_tables[:n_dec], starts[:n_dec], lens[:n_dec], block_size, sliding_window, 0, device)
    if n_dec < len(lens):
        prefill = _group(block_tables[n_dec:], starts[n_dec:], lens[n_dec:], block_size, sliding_window,
                         n_dec, device)
    return AttentionMetadata(slot_mapping=slot_mapping, decode=decode, prefill=prefill)


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, g: AttentionGroup,
            scale: float) -> torch.Tensor:
    """q: [B, Lq, Hq, D] -> [B, Lq, Hq, D]."""
    k = k_cache[g.slots].transpose(1, 2)  # [B, Hkv, Lk, D]
    v = v_cache[g.slots].transpose(1, 2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=g.mask, scale=scale,
                                         enable_gqa=k.shape[1] != q.shape[2])
    return out.transpose(1, 2)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, Hq, D] for the flat batch; K/V of these tokens are already in the cache."""
    parts = []
    if meta.decode is not None:
        g = meta.decode
        parts.append(_attend(q[:g.num_rows].unsqueeze(1), k_cache, v_cache, g, scale).squeeze(1))
    if meta.prefill is not None:
        g = meta.prefill
        out = _attend(q[g.q_rows], k_cache, v_cache, g, scale)
        parts.append(out[g.q_valid] if g.q_rows.shape[0] > 1 else out[0])
    return parts[0] if len(parts) == 1 else torch.cat(parts)
