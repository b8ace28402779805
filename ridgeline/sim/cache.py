"""One replica's KV block pool and prefix cache, as counts instead of block tables.

The engine's pool (ridgeline.kv_cache) hands out fixed-size blocks, keeps blocks of a full
computed prefix findable by content after their sequences leave, and evicts those
unreferenced cached blocks least recently released first, only when a new block is needed.
Here every shared prefix is a `Node` (a key of the workload's prefix chain) holding a run of
cached blocks; a sequence's other blocks are just a count. When a sequence is preempted its
own full blocks become a node too, so its recomputation hits them if they were not evicted,
as in the engine.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable


class Node:
    """Blocks [start, start + cached) of one prefix; `end` is where the prefix's full blocks stop
    (None: unbounded, a preempted sequence's own blocks)."""
    __slots__ = ("key", "start", "end", "cached", "refs", "claims")

    def __init__(self, key: Hashable, start: int, end: int | None):
        self.key = key
        self.start = start
        self.end = end
        self.cached = 0
        self.refs = 0
        # [(seq, lo, hi)]: disjoint block ranges a running sequence claimed to compute (the engine's
        # pending_prefix entries: a block keeps its first claimer until that one leaves)
        self.claims: list | None = None

    def __repr__(self) -> str:
        return f"Node({self.key!r}, blocks {self.start}+{self.cached}/{self.end}, refs {self.refs})"


class BlockPool:
    """free + evictable + blocks held by sequences (private or in referenced nodes) = total."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.total = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.free = num_blocks
        self.evictable = 0
        self.nodes: dict[Hashable, Node] = {}
        self.lru: OrderedDict[Hashable, Node] = OrderedDict()  # unreferenced nodes with blocks, oldest first
        self.evictions = 0

    @property
    def available(self) -> int:
        return self.free + self.evictable

    @property
    def used(self) -> int:
        return self.total - self.free - self.evictable

    def allocate(self, n: int) -> None:
        """Take n blocks: free ones first, then evict cached prefixes (oldest release first, tail first)."""
        if n <= self.free:
            self.free -= n
            return
        n -= self.free
        self.free = 0
        if n > self.evictable:
            raise RuntimeError(f"KV pool overcommitted: {n} blocks short")  # callers check `available`
        while n:
            key, node = next(iter(self.lru.items()))
            k = min(n, node.cached)
            node.cached -= k
            self.evictable -= k
            self.evictions += k
            n -= k
            if node.cached == 0:
                del self.lru[key]
                if node.end is None:  # a preempted sequence's blocks: nothing else will find it
                    del self.nodes[key]

    def release(self, n: int) -> None:
        self.free += n

    def node(self, key: Hashable, start: int, end: int | None) -> Node:
        node = self.nodes.get(key)
        if node is None:
            node = self.nodes[key] = Node(key, start, end)
        return node

    def ref(self, node: Node) -> None:
        if node.refs == 0 and node.cached:
            del self.lru[node.key]
            self.evictable -= node.cached
        node.refs += 1

    def unref(self, node: Node) -> None:
        node.refs -= 1
        if node.refs == 0:
            if node.cached:
                self.lru[node.key] = node
                self.evictable += node.cached
            elif node.end is None:
                self.nodes.pop(node.key, None)

    def park(self, key: Hashable, start: int, blocks: int) -> None:
        """Blocks nobody references but the cache keeps until evicted (a finished sequence's)."""
        node = self.nodes[key] = Node(key, start, None)
        node.cached = blocks
        self.lru[key] = node
        self.evictable += blocks

    def drop(self, node: Node) -> None:
        """Forget an unreferenced node, freeing its blocks (a stale preempted-sequence node)."""
        if node.refs == 0:
            if node.cached:
                del self.lru[node.key]
                self.evictable -= node.cached
                self.free += node.cached
                node.cached = 0
            self.nodes.pop(node.key, None)
