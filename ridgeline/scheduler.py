"""Token-budget scheduler in the vLLM v1 style.

Every step: running sequences first (those one token behind, i.e. decodes, before those
still prefilling), then waiting sequences in arrival order, each given
min(pending tokens, remaining budget). A prompt longer than the budget is therefore
prefilled in chunks while decodes keep flowing (Sarathi-Serve's stall-free batching).
When the KV pool runs out, the newest running sequence is preempted: its blocks are
freed and it is recomputed from its tokens later. A newly admitted sequence starts at its
longest prefix in the prefix cache (num_computed_tokens jumps ahead), the same rule again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_cache import BlockManager
from .sequence import Sequence, SeqStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so every running sequence can advance each step")


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_preempted: int = 0

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the newest
        self.pending_prefix: dict[int, Sequence] = {}  # block hash -> running sequence computing that block
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        scheduled: set[int] = set()

        order = [s for s in self.running if s.num_pending_tokens == 1]
        order += [s for s in self.running if s.num_pending_tokens > 1]
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(seq.num_pending_tokens, budget)
            while not self.blocks.can_allocate(seq.block_table, seq.num_computed_tokens + num_new):
                victim = self._newest_unscheduled(scheduled)
                self._preempt(victim)
                batch.num_preempted += 1
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            self.blocks.allocate(seq.block_table, seq.num_computed_tokens + num_new)
            scheduled.add(seq.seq_id)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new

        # Admit waiting sequences only when nothing was preempted: they would just thrash.
        if not batch.num_preempted:
            self._admit(batch, budget, scheduled)
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int, scheduled: set[int]) -> None:
        """FCFS admission. A sequence starts from its longest cached prefix; one whose next prompt
        block is being computed by a running sequence is passed over until that block is cached,
        so requests sharing a prefix compute it once."""
        bs = self.blocks.block_size
        deferred: list[Sequence] = []
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            width = 1 + len(seq.request.unforked)  # forked samples join the running set with it
            if len(self.running) + width > self.config.max_num_seqs:
                break
            # A waiting sequence holds no blocks (new, or preempted and freed).
            # prompt_logprobs need every prompt position's logits: such a request computes its whole prompt.
            hits = ([] if seq.request.params.prompt_logprobs is not None
                    else self.blocks.match_prefix(seq.token_ids, seq.block_hashes))
            if self._prefix_pending(seq, len(hits)):
                deferred.append(self.waiting.popleft())
                continue
            computed = len(hits) * bs
            num_new = min(seq.num_tokens - computed, budget)
            need = -(-(computed + num_new) // bs) - len(hits)
            if need + self.blocks.num_reusable(hits) > self.blocks.allocator.num_free:
                break
            self.waiting.popleft()
            self.blocks.reuse(seq.block_table, hits, seq.num_prompt_tokens)
            seq.num_computed_tokens = computed
            self.blocks.allocate(seq.block_table, computed + num_new)
            self._claim_prefix(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.add(seq.seq_id)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        self.waiting.extendleft(reversed(deferred))

    def _prefix_pending(self, seq: Sequence, num_hit_blocks: int) -> bool:
        """True when the first prompt block past the cached prefix is being computed by another
        running sequence."""
        hashes = seq.block_hashes
        if not self.blocks.enable_prefix_caching or num_hit_blocks >= len(hashes):
            return False
        owner = self.pending_prefix.get(hashes[num_hit_blocks])
        return owner is not None and owner is not seq and owner.status is SeqStatus.RUNNING

    def _claim_prefix(self, seq: Sequence) -> None:
        """Mark the seq's uncomputed full prompt blocks as being computed by it."""
        if self.blocks.enable_prefix_caching:
            for h in seq.block_hashes[seq.num_computed_tokens // self.blocks.block_size:]:
                self.pending_prefix.setdefault(h, seq)

    def release_prefix_claims(self, seq: Sequence) -> None:
        """Drop the seq's claims on blocks it was computing (it was preempted or left)."""
        for h in seq.block_hashes:
            if self.pending_prefix.get(h) is seq:
                del self.pending_prefix[h]

    def _newest_unscheduled(self, scheduled: set[int]) -> Sequence:
        for seq in reversed(self.running):
            if seq.seq_id not in scheduled:
                return seq
        raise RuntimeError("KV cache cannot hold the scheduled sequences")  # guarded by engine sizing

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.release_prefix_claims(seq)
        self.blocks.free(seq.block_table)
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.release_prefix_claims(seq)
        self.blocks.free(seq.block_table)
        seq.status = SeqStatus.FINISHED
