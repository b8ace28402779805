"""KV block bookkeeping (torch-free): the allocator's reference counts, free list and prefix
cache, and the block manager that grows, shares, forks and frees block tables. It never touches
device memory: a fork returns the block pair the model runner copies.

A sequence owns a block table (list of block ids); token at position p lives in slot
block_table[p // block_size] * block_size + p % block_size of every layer's pool.
"""

from __future__ import annotations

from collections import OrderedDict, deque


class BlockAllocator:
    """Reference counts, a free list, and the prefix cache's evictable blocks.

    A block whose count drops to zero goes back to the free list, unless it holds a cached
    prefix (it has a content hash): then it stays findable in `cached` and waits, least
    recently released first, in `evictable` until the pool needs the room.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # content hash -> block id
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks with no reference, LRU first
        self.num_evictions = 0
        self.num_shared = 0  # blocks referenced by more than one sequence

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free or evictable)."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_free

    def allocate(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = self.block_tokens[block] = None
            self.num_evictions += 1
        self.ref_counts[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more reference to a block (a prefix-cache hit or a forked sample)."""
        if self.ref_counts[block] == 0:
            del self.evictable[block]
        elif self.ref_counts[block] == 1:
            self.num_shared += 1
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 1:
            self.num_shared -= 1
        elif self.ref_counts[block] == 0:
            if self.block_hash[block] is not None:
                self.evictable[block] = None
            else:
                self.free_blocks.append(block)

    def lookup(self, block_hash: int, tokens: tuple[int, ...]) -> int | None:
        """The cached block with this content, comparing tokens so a hash collision never matches."""
        block = self.cached.get(block_hash)
        if block is None or self.block_tokens[block] != tokens:
            return None
        return block

    def register(self, block: int, block_hash: int, tokens: tuple[int, ...]) -> None:
        """Make a full, computed block findable by its content (first writer wins)."""
        if self.block_hash[block] is None and block_hash not in self.cached:
            self.cached[block_hash] = block
            self.block_hash[block] = block_hash
            self.block_tokens[block] = tokens


class BlockManager:
    """Grows, shares and frees sequences' block tables; owns the automatic prefix cache.

    A full block is keyed by a hash chain: hash(parent block's hash, this block's tokens),
    so equal keys mean equal whole prefixes. A new sequence reuses every cached block of its
    longest cached prompt prefix and computes only the rest.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.allocator = BlockAllocator(num_blocks)
        self.num_cache_queries = 0  # prompt tokens looked up in the prefix cache
        self.num_cache_hits = 0  # of those, tokens found

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(block_table))

    def can_allocate(self, block_table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(block_table, num_tokens) <= self.allocator.num_free

    def allocate(self, block_table: list[int], num_tokens: int) -> None:
        """Extend block_table in place so it covers num_tokens positions."""
        for _ in range(self.blocks_needed(block_table, num_tokens)):
            block_table.append(self.allocator.allocate())

    def trim(self, block_table: list[int], num_tokens: int) -> None:
        """Release the blocks past the first that cover num_tokens positions (a speculative step's
        rejected tokens, or its draft model's lookahead, ended in them)."""
        keep = -(-num_tokens // self.block_size)
        while len(block_table) > keep:
            self.allocator.release(block_table.pop())

    def free(self, block_table: list[int]) -> None:
        # Tail blocks first, so the LRU evicts a prefix's deeper blocks before its head.
        for block in reversed(block_table):
            self.allocator.release(block)
        block_table.clear()

    # ------------------------------------------------------------------ prefix cache

    def block_hashes(self, token_ids: list[int], hashes: list[int], num_blocks: int) -> list[int]:
        """Extend `hashes` (the chain of a sequence's full blocks) to cover num_blocks blocks."""
        bs = self.block_size
        for j in range(len(hashes), num_blocks):
            parent = hashes[j - 1] if j else 0
            hashes.append(hash((parent, *token_ids[j * bs:(j + 1) * bs])))
        return hashes

    def match_prefix(self, token_ids: list[int], hashes: list[int]) -> list[int]:
        """Cached blocks holding the longest prefix of token_ids. At least the last token is left
        to compute, since the next token's logits come from it."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hashes = self.block_hashes(token_ids, hashes, (len(token_ids) - 1) // bs)
        found = []
        for j, h in enumerate(hashes):
            block = self.allocator.lookup(h, tuple(token_ids[j * bs:(j + 1) * bs]))
            if block is None:
                break
            found.append(block)
        return found

    def num_reusable(self, blocks: list[int]) -> int:
        """How many of the matched blocks sit in the evictable list (reusing them takes them out of it)."""
        return sum(1 for b in blocks if self.allocator.ref_counts[b] == 0)

    def reuse(self, block_table: list[int], blocks: list[int], num_prompt_tokens: int) -> None:
        """Start an empty block table with cached blocks; records the lookup in the hit counters."""
        for b in blocks:
            self.allocator.share(b)
        block_table.extend(blocks)
        self.num_cache_queries += num_prompt_tokens
        self.num_cache_hits += len(blocks) * self.block_size

    def cache_full_blocks(self, token_ids: list[int], hashes: list[int], block_table: list[int],
                          num_computed_tokens: int, num_cached: int) -> int:
        """Register the sequence's blocks that are now full and computed; returns the new count."""
        if not self.enable_prefix_caching:
            return num_cached
        bs = self.block_size
        full = num_computed_tokens // bs
        self.block_hashes(token_ids, hashes, full)
        for j in range(num_cached, full):
            self.allocator.register(block_table[j], hashes[j], tuple(token_ids[j * bs:(j + 1) * bs]))
        return max(num_cached, full)

    def fork(self, parent_table: list[int], num_tokens: int) -> tuple[list[int], tuple[int, int] | None] | None:
        """A block table for a sample forked from a sequence with num_tokens computed: full blocks are
        shared, a partly filled last block gets a fresh block, and the (source, destination) pair
        the model runner copies before it next writes the cache (copy-on-write done at fork
        time). None if no block is free for the copy."""
        table = list(parent_table[:num_tokens // self.block_size])
        partial = num_tokens % self.block_size
        if partial and self.allocator.num_free == 0:
            return None
        for b in table:
            self.allocator.share(b)
        copy = None
        if partial:
            dst = self.allocator.allocate()
            copy = (parent_table[len(table)], dst)
            table.append(dst)
        return table, copy

    @property
    def usage(self) -> float:
        return self.allocator.num_used / max(1, self.allocator.num_blocks)
