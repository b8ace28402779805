"""The paged KV cache: one preallocated pool of fixed-size blocks per layer, and the block allocator.

A sequence owns a block table (list of block ids); token at position p lives in slot
block_table[p // block_size] * block_size + p % block_size of every layer's pool.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

import torch

from .config import ModelConfig


def parse_memory_size(value: int | float | str) -> int:
    """'2GiB', '512MiB', '1.5GB', or a plain number of bytes -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        size = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*", str(value), re.IGNORECASE)
        if not m:
            raise ValueError(f"kv_cache_memory: cannot parse {value!r}; use bytes or e.g. '2GiB', '512MiB'")
        unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
        size = int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])
    if size <= 0:
        raise ValueError(f"kv_cache_memory must be > 0 bytes, got {value!r}")
    return size


@dataclass
class CacheConfig:
    block_size: int = 16
    num_blocks: int = 0  # derived from the memory budget unless given

    @staticmethod
    def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.finfo(dtype).bits // 8
        return 2 * model.num_layers * block_size * model.kv_size * elem


class KVCachePool:
    """Per-layer K and V tensors of shape [num_blocks * block_size, num_kv_heads, head_dim]."""

    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (model.num_layers, 2, num_blocks * block_size, model.num_kv_heads, model.head_dim)
        self.storage = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.storage[i, 0], self.storage[i, 1]


class BlockAllocator:
    """Free list plus reference counts; a block returns to the free list when its count hits zero."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def allocate(self) -> int:
        block = self.free_blocks.popleft()
        self.ref_counts[block] = 1
        return block

    def release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_blocks.append(block)


class BlockManager:
    """Grows and frees sequences' block tables."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(block_table))

    def can_allocate(self, block_table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(block_table, num_tokens) <= self.allocator.num_free

    def allocate(self, block_table: list[int], num_tokens: int) -> None:
        """Extend block_table in place so it covers num_tokens positions."""
        for _ in range(self.blocks_needed(block_table, num_tokens)):
            block_table.append(self.allocator.allocate())

    def free(self, block_table: list[int]) -> None:
        for block in reversed(block_table):
            self.allocator.release(block)
        block_table.clear()

    @property
    def usage(self) -> float:
        return self.allocator.num_used / max(1, self.allocator.num_blocks)
