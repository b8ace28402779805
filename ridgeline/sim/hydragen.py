"""Hydragen on counts: the K/V reads a decode step saves by attending shared prefixes once per group.

The engine (ridgeline.hydragen.find_shared_prefixes) walks the decode rows' block tables like
a trie: at each depth it groups rows by block id, extends a group's run while every member
holds the same block, and takes the run as a part when (g - 1) * run tokens >= min_saved_tokens
(a part that fails ends its branch: no nested part below it); then the parts together must save
min_saved_fraction of the rows' full blocks. A part saves (g - 1) * run blocks of K/V reads.

Here a row's shared blocks are the prefix-cache nodes it holds (cache.Node, in chain order) up
to its `shared` count; two rows hold the same physical block at a position exactly when they
hold the same node there (a node's blocks cannot be evicted while referenced). The index keeps
a trie of those nodes with, per node, the number of decode rows holding it and where the rows
that stop inside it stop; a row's own blocks (private ones, or its preemption node) are never
shared. Runs break where the member set changes: a row stops, or the members go to different
next nodes. Each trie node caches its value for a group starting at its first block and the sum
of its children's, so a row joining or leaving recomputes only its own path; the number of parts
(the engine's len(parts), each level of a nested prefix its own) is kept beside each sum the same
way, for the perf model's per-part dispatch cost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cache import Node
    from .replica import Seq

Sig = tuple  # ((node, held end), ...): a row's shared blocks, node by node


def row_signature(q: "Seq") -> Sig | None:
    """The prefix-cache nodes q holds and up to which block, or None if it holds none that another
    row could share (a preempted sequence's own node is its alone)."""
    h = q.shared
    sig = []
    for nd in q.nodes:
        if nd.end is None or nd.start >= h:
            break
        sig.append((nd, min(h, nd.end)))
    return tuple(sig) if sig else None


class _TNode:
    __slots__ = ("start", "end", "h", "ends", "at_end", "children", "fresh", "fresh_parts", "dirty", "counted",
                 "counted_parts", "kids_sum", "kids_parts", "dirty_kids")

    def __init__(self, start: int, end: int):
        self.start = start
        self.end = end
        self.h = 0  # decode rows holding at least one of the node's blocks
        self.ends: dict[int, int] = {}  # held end (< end) -> rows stopping inside the node
        self.at_end = 0  # rows holding the whole node and nothing after it
        self.children: dict["Node", _TNode] = {}
        self.fresh = 0  # saved blocks of a group of all h rows starting at `start` (when not dirty)
        self.fresh_parts = 0  # and its number of parts
        self.dirty = True
        self.counted = 0  # `fresh` as included in the parent's kids_sum (or the index's total)
        self.counted_parts = 0  # `fresh_parts` as included in the parent's kids_parts
        self.kids_sum = 0  # sum of the children's `counted`
        self.kids_parts = 0  # sum of the children's `counted_parts`
        self.dirty_kids: dict["Node", _TNode] = {}  # children changed since kids_sum was updated


class HydragenIndex:
    """Shared-prefix structure of one replica's decode rows; `saved_blocks()` is the engine's
    sum((len(rows) - 1) * len(blocks)) over its parts before the fraction rule, `parts()` their
    number."""

    def __init__(self, block_size: int, min_saved_tokens: int):
        self.bs = block_size
        self.min_saved = min_saved_tokens
        self.roots: dict["Node", _TNode] = {}
        self.rows = 0  # rows with a signature
        self._top = _TNode(0, 0)  # holds the roots' sum (its children are `roots`)
        self._top.children = self.roots

    def add(self, sig: Sig) -> None:
        self._update(sig, 1)

    def remove(self, sig: Sig) -> None:
        self._update(sig, -1)

    def _update(self, sig: Sig, d: int) -> None:
        self.rows += d
        parent = self._top
        last = len(sig) - 1
        for i, (nd, held) in enumerate(sig):
            level = parent.children
            t = level.get(nd)
            if t is None:
                t = level[nd] = _TNode(nd.start, nd.end)
            t.h += d
            if t.h == 0:  # its subtree is empty too
                del level[nd]
                parent.kids_sum -= t.counted
                parent.kids_parts -= t.counted_parts
                parent.dirty_kids.pop(nd, None)
                return
            t.dirty = True
            parent.dirty_kids[nd] = t
            if i == last:
                if held < t.end:
                    c = t.ends.get(held, 0) + d
                    if c:
                        t.ends[held] = c
                    else:
                        del t.ends[held]
                else:
                    t.at_end += d
            parent = t

    def saved_blocks(self) -> int:
        top = self._top
        if top.dirty_kids:
            self._refresh_kids(top)
        return top.kids_sum if self.rows >= 2 else 0

    def parts(self) -> int:
        """The engine's len(parts) before the fraction rule (every nested level a part)."""
        top = self._top
        if top.dirty_kids:
            self._refresh_kids(top)
        return top.kids_parts if self.rows >= 2 else 0

    def _refresh_kids(self, t: _TNode) -> None:
        for c in t.dirty_kids.values():
            if c.dirty:
                self._fresh(c)
            t.kids_sum += c.fresh - c.counted
            t.kids_parts += c.fresh_parts - c.counted_parts
            c.counted, c.counted_parts = c.fresh, c.fresh_parts
        t.dirty_kids.clear()

    def _fresh(self, t: _TNode) -> None:
        if t.dirty_kids:
            self._refresh_kids(t)
        t.fresh, t.fresh_parts = self._run(t, t.start, t.h) if t.h >= 2 else (0, 0)
        t.dirty = False

    def _run(self, t: _TNode, d: int, g: int) -> tuple[int, int]:
        """(saved blocks, parts) of the group of g rows entering t with its current run started at
        block d (d < t.start: the run goes on from t's parent, every member continuing into t)."""
        if g < 2:
            return 0, 0
        total = parts = 0
        bs, need = self.bs, self.min_saved
        if t.ends:
            for e in sorted(t.ends):
                if g < 2 or (g - 1) * (e - d) * bs < need:
                    return total, parts
                total += (g - 1) * (e - d)  # a part ending where rows stop
                parts += 1
                g -= t.ends[e]
                d = e
        children = t.children
        if t.at_end == 0 and len(children) == 1:  # every member continues into one node: one run
            child = next(iter(children.values()))
            s, p = self._run(child, d, g)
            return total + s, parts + p
        if g < 2 or (g - 1) * (t.end - d) * bs < need:
            return total, parts
        if t.dirty_kids:
            self._refresh_kids(t)
        # the part up to t's end, then a fresh group per next node
        return total + (g - 1) * (t.end - d) + t.kids_sum, parts + 1 + t.kids_parts
