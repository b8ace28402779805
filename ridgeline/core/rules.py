"""The scheduler's decisions as pure functions on counts. The engine's Scheduler applies them to
sequences and block tables, the serving simulator's replicas (ridgeline.sim) to counts, so the
two cannot drift apart: what a step computes, who is admitted, who is preempted, who waits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

S = TypeVar("S")


def chunk_tokens(num_pending: int, budget: int) -> int:
    """Tokens a sequence computes this step: all it has pending, up to the budget left, so a
    prompt longer than the budget is prefilled in chunks while decodes keep flowing."""
    return min(num_pending, budget)


def has_seats(num_running: int, width: int, max_num_seqs: int) -> bool:
    """Whether `width` more sequences (a request's samples join together) fit the running set."""
    return num_running + width <= max_num_seqs


def admission(num_tokens: int, num_hit_blocks: int, block_size: int, budget: int) -> tuple[int, int, int]:
    """(tokens already computed, tokens this step, new blocks) for a waiting sequence that starts
    at its num_hit_blocks cached prefix blocks."""
    computed = num_hit_blocks * block_size
    num_new = chunk_tokens(num_tokens - computed, budget)
    return computed, num_new, -(-(computed + num_new) // block_size) - num_hit_blocks


def blocks_fit(num_needed: int, num_reusable: int, num_free: int) -> bool:
    """Whether an admission's new blocks fit the pool. Reused cached blocks that no sequence holds
    sit among the free (evictable) ones, and taking them shrinks what is left."""
    return num_needed + num_reusable <= num_free


def prefix_pending(seq: S, num_hit_blocks: int, num_lookup_blocks: int,
                   claimer: Callable[[int], S | None]) -> bool:
    """Whether admission passes over seq: the first prompt block past its cached prefix (of the
    num_lookup_blocks its lookup covers) is being computed by another running sequence
    (claimer(block index), None if none). It waits until that block is cached, so sequences
    sharing a prefix compute it once."""
    if num_hit_blocks >= num_lookup_blocks:
        return False
    owner = claimer(num_hit_blocks)
    return owner is not None and owner is not seq


def preemption_victim(running: Sequence[S], is_scheduled: Callable[[S], bool]) -> S:
    """The newest running sequence not yet scheduled this step (running: admission order)."""
    for seq in reversed(running):
        if not is_scheduled(seq):
            return seq
    raise RuntimeError("KV cache cannot hold the scheduled sequences")  # guarded by pool sizing


def make_room(seq: S, fits: Callable[[], bool], victim: Callable[[], S], preempt: Callable[[S], None]) -> int:
    """Preempt victim() until seq's blocks fit or seq itself was preempted; how many were."""
    count = 0
    while not fits():
        v = victim()
        preempt(v)
        count += 1
        if v is seq:
            break
    return count
