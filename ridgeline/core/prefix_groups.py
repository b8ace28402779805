"""Hydragen's grouping policy (torch-free): which decode rows attend to a shared prefix together.

When several decoding sequences hold the same physical KV blocks at the start of their block
tables (a cached system prompt, n samples forked from one prompt), the prefix's attention is
one matrix-matrix product per group (hydragen.py does the math). Sharing can nest: after a
prefix common to a whole group, a subgroup may share more blocks. `find_shared_prefixes` walks
the block tables like a trie and returns one part per level worth its cost.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import MIN_SAVED_TOKENS_TORCH, HydragenConfig


@dataclass
class SharedPrefix:
    rows: list[int]  # decode rows (indices into the decode group) sharing the blocks
    blocks: list[int]  # the shared physical blocks, in order


def find_shared_prefixes(tables: list[list[int]], num_full_blocks: list[int], block_size: int,
                         cfg: HydragenConfig) -> tuple[list[SharedPrefix], list[int]]:
    """Shared-prefix parts over the decode rows' block tables, and each row's first own block.

    Only full blocks (num_full_blocks[r] of row r) can be shared; blocks are compared by id,
    which is exact: two sequences hold the same block only through the prefix cache or a fork.
    """
    parts: list[SharedPrefix] = []
    own_start = [0] * len(tables)
    need = cfg.min_saved_tokens or MIN_SAVED_TOKENS_TORCH

    def split(rows: list[int], depth: int) -> None:
        by_block: dict[int, list[int]] = {}
        for r in rows:
            if depth < num_full_blocks[r]:
                by_block.setdefault(tables[r][depth], []).append(r)
            else:
                own_start[r] = depth
        for members in by_block.values():
            lead = tables[members[0]]
            end = depth + 1
            limit = min(num_full_blocks[r] for r in members)
            while end < limit and all(tables[r][end] == lead[end] for r in members):
                end += 1
            if len(members) < 2 or (len(members) - 1) * (end - depth) * block_size < need:
                for r in members:
                    own_start[r] = depth
                continue
            parts.append(SharedPrefix(rows=members, blocks=lead[depth:end]))
            split(members, end)

    split(list(range(len(tables))), 0)
    saved = sum((len(p.rows) - 1) * len(p.blocks) for p in parts)
    if saved < cfg.min_saved_fraction * max(1, sum(num_full_blocks)):
        return [], [0] * len(tables)
    return parts, own_start
