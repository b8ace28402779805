"""The paged KV pool: one preallocated tensor of fixed-size blocks per layer (the block
bookkeeping is torch-free, in core/kv_blocks.py)."""

from __future__ import annotations

import mmap
import os

import torch

from .config import ModelConfig
from .core.config import CacheConfig


def gather_kv(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache[slots] for a slot tensor of any shape -> [*slots.shape, Hkv, D]. index_select on the
    flattened slots is 5-7x faster on CPU than advanced indexing (42 vs 318 us for 4,096 keys)."""
    return cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])


def zeroed_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on CPU over anonymous mmap pages, which the kernel hands out zeroed on first
    touch. torch.zeros writes every byte up front: 1.3-1.7 s for the default 2.1 GB pool, and the
    whole pool resident before a single token is cached. Here RSS grows only with the blocks used."""
    numel = torch.Size(shape).numel()
    if torch.device(device).type != "cpu" or numel == 0:
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    # pages that could never all be resident fail here, as torch.zeros would, not at first touch
    if nbytes > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"):
        raise MemoryError(f"{nbytes} bytes exceed this machine's physical memory")
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError as exc:
        raise MemoryError(str(exc)) from exc
    return torch.frombuffer(buf, dtype=dtype).view(shape)


class KVCachePool:
    """Per-layer K and V tensors of shape [num_blocks * block_size, num_kv_heads, head_dim]."""

    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (model.num_layers, 2, num_blocks * block_size, model.num_kv_heads, model.head_dim)
        self.storage = zeroed_tensor(shape, dtype, device)
        self._layers = [(self.storage[i, 0], self.storage[i, 1]) for i in range(model.num_layers)]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of layer i's K and V, made once (two indexing ops per layer and step saved)."""
        return self._layers[i]

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's K and V in every layer."""
        bs = self.block_size
        self.storage[:, :, dst * bs:(dst + 1) * bs] = self.storage[:, :, src * bs:(src + 1) * bs]

    @staticmethod
    def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return CacheConfig.bytes_per_block(model.num_layers, model.kv_size, block_size,
                                           torch.finfo(dtype).bits // 8)
