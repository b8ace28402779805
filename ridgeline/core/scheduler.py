"""Token-budget scheduler in the vLLM v1 style (torch-free).

One engine step is `out = scheduler.schedule()` -> `result = runner.execute(out)` ->
`scheduler.update_from_output(out, result)` -> the output processor.

schedule(): running sequences first (those one token behind, i.e. decodes, before those still
prefilling), then waiting sequences in arrival order, each given min(pending tokens, remaining
budget). A prompt longer than the budget is therefore prefilled in chunks while decodes keep
flowing (Sarathi-Serve's stall-free batching). When the KV pool runs out, the newest running
sequence is preempted: its blocks are freed and it is recomputed from its tokens later. A newly
admitted sequence starts at its longest prefix in the prefix cache (num_computed_tokens jumps
ahead), the same rule again. These decisions are core.rules, which the simulator's replicas
(ridgeline.sim) apply to counts.

update_from_output(): advances num_computed_tokens, registers full blocks in the prefix cache,
forks a request's other samples off its first once the prompt is computed, appends sampled
tokens, and finishes sequences on stop tokens, EOS and length. Stop strings need text: the
output processor finds them and calls finish_seq().
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .config import HydragenConfig, SchedulerConfig
from .kv_blocks import BlockManager
from .prefix_groups import SharedPrefix, find_shared_prefixes
from .request import Request, Sequence, SeqStatus
from .spec_policy import SpecPolicy
from .rules import admission, blocks_fit, chunk_tokens, has_seats, make_room, prefix_pending, preemption_victim

# (token id, its logprob, its rank, top ids, top logprobs): one generated or prompt position
TokenLogprobs = tuple[int, float, int, list[int], list[float]]


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: positions [start, start + num_new_tokens) are computed."""
    seq: Sequence
    start: int
    num_new_tokens: int
    # the step reaches the sequence's last token, so its last row's logits give the next token
    sample: bool = False
    # samples of the same request still to fork off this one: they sample from the same row
    fork_candidates: list[Sequence] = field(default_factory=list)
    # prompt positions [first, last) whose rows give the next prompt token's logprob
    prompt_logprobs: tuple[int, int] | None = None
    # speculative decoding: the proposals verified in this step, after the sequence's last token
    # (num_new_tokens = 1 + len(spec_token_ids), each row checking the next proposal)
    spec_token_ids: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    """What one step computes, as plain data: the model runner turns it into tensors."""
    seqs: list[ScheduledSeq] = field(default_factory=list)  # decode rows (one new token) first
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src, dst), before the forward
    # Hydragen's parts over the attention's decode rows (each decode, then each verified position of
    # the speculative sequences), and per such row its first block not shared
    shared_prefixes: list[SharedPrefix] = field(default_factory=list)
    own_start_blocks: list[int] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)  # since the last output: the runner drops them
    num_preempted: int = 0
    num_spec_tokens: int = 0  # speculative decoding: tokens to propose for each sampled sequence

    @property
    def num_decode_rows(self) -> int:
        n = 0
        while n < len(self.seqs) and self.seqs[n].num_new_tokens == 1:
            n += 1
        return n

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)


@dataclass
class ModelRunnerOutput:
    """What the runner returns, as plain data. Speculative decoding returns several tokens per
    sequence through the same lists."""
    sampled: dict[int, list[int]] = field(default_factory=dict)  # seq_id -> new token ids
    logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)  # seq_id -> per new token
    prompt_logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)  # seq_id -> per position
    spec_token_ids: dict[int, list[int]] = field(default_factory=dict)  # seq_id -> proposals for the next step
    grammar_errors: dict[int, str] = field(default_factory=dict)  # seq_id -> why its grammar allows no token


@dataclass
class SeqUpdate:
    """What a step added to one sequence, for the output processor."""
    seq: Sequence
    new_token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int,
                 eos_token_ids: list[int], hydragen: HydragenConfig | None = None,
                 spec_policy: SpecPolicy | None = None, num_lookahead_tokens: int = 0):
        self.config = config
        self.blocks = block_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = list(eos_token_ids)
        self.hydragen = hydragen  # the resolved policy; None: off (or a sliding-window model)
        self.spec_policy = spec_policy  # None: no speculative decoding
        # KV positions a draft model writes past a sampled sequence's step while it proposes
        self.num_lookahead_tokens = num_lookahead_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the newest
        self.pending_prefix: dict[int, Sequence] = {}  # block hash -> running sequence computing that block
        self._pending_copies: list[tuple[Sequence, int, int]] = []  # (forked sample, src, dst)
        self._finished_ids: list[int] = []
        self.num_preemptions = 0
        self.num_prompt_tokens = 0  # computed prompt tokens (recomputation after preemption included)
        self.num_generation_tokens = 0
        self.num_steps = 0
        self.num_hydragen_steps = 0
        self.num_spec_drafts = 0  # speculative rows verified
        self.num_spec_draft_tokens = 0  # proposals verified
        self.num_spec_accepted_tokens = 0

    # ------------------------------------------------------------------ requests

    def add_request(self, req: Request) -> None:
        """Queue a request: its first sample waits; the others fork from it after its prompt."""
        self.waiting.append(req.seqs[0])

    def abort_request(self, req: Request) -> None:
        for seq in req.seqs:
            if not seq.finished:
                self.finish_seq(seq, "abort")
        req.unforked = []

    def finish_seq(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence (a stop condition or an abort) and free its blocks. A finished one keeps its
        blocks freed and only has its reason updated (a stop string found after a stop token)."""
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        if seq.finished:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.release_prefix_claims(seq)
        self.blocks.free(seq.block_table)
        seq.status = SeqStatus.FINISHED
        self._finished_ids.append(seq.seq_id)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: set[int] = set()

        order = [s for s in self.running if s.num_pending_tokens == 1]
        order += [s for s in self.running if s.num_pending_tokens > 1]
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            spec = self._spec_tokens(seq)
            num_new = chunk_tokens(seq.num_pending_tokens + len(spec), budget)
            spec = spec[:max(0, num_new - seq.num_pending_tokens)]
            need = seq.num_computed_tokens + num_new + self._lookahead(seq, num_new, spec)
            out.num_preempted += make_room(
                seq, lambda: self.blocks.can_allocate(seq.block_table, need),
                lambda: preemption_victim(self.running, lambda s: s.seq_id in scheduled), self._preempt)
            if seq.status is not SeqStatus.RUNNING:
                continue
            self.blocks.allocate(seq.block_table, need)
            scheduled.add(seq.seq_id)
            out.seqs.append(self._scheduled(seq, num_new, spec))
            budget -= num_new

        # Admit waiting sequences only when nothing was preempted: they would just thrash.
        if not out.num_preempted:
            self._admit(out, budget, scheduled)

        # Decode rows first, then speculative rows (each verified position is a decode row for the
        # attention), then prefill chunks: the attention metadata groups them (a stable sort).
        out.seqs.sort(key=lambda s: 0 if s.num_new_tokens == 1 else 1 if s.spec_token_ids else 2)
        out.blocks_to_copy = [(src, dst) for child, src, dst in self._pending_copies
                              if child.status is SeqStatus.RUNNING]
        self._pending_copies = []
        out.finished_seq_ids, self._finished_ids = self._finished_ids, []
        self._group_shared_prefixes(out)
        if out.seqs:
            self.num_steps += 1
            if out.shared_prefixes:
                self.num_hydragen_steps += 1
            if self.spec_policy is not None:
                sampled = [s for s in out.seqs if s.sample]
                if sampled:
                    context = sum(s.start + s.num_new_tokens for s in sampled) // len(sampled)
                    out.num_spec_tokens = self.spec_policy.choose(len(sampled), context)
        return out

    def _spec_tokens(self, seq: Sequence) -> list[int]:
        """The proposals a decoding sequence verifies this step: all it has, within what max_tokens
        and max_model_len leave (the step yields one token more than it verifies)."""
        if not seq.spec_token_ids or seq.num_pending_tokens != 1:
            return []
        room = self.max_model_len - seq.num_tokens - 1
        if seq.params.max_tokens is not None:
            room = min(room, seq.params.max_tokens - seq.num_output_tokens - 1)
        return seq.spec_token_ids[:max(0, room)]

    def _lookahead(self, seq: Sequence, num_new: int, spec: list[int]) -> int:
        """KV positions a draft model writes past the step while proposing for seq (sampling ones only)."""
        if not self.num_lookahead_tokens or seq.num_computed_tokens + num_new < seq.num_tokens + len(spec):
            return 0
        return max(0, min(self.num_lookahead_tokens, self.max_model_len - seq.num_computed_tokens - num_new))

    def _scheduled(self, seq: Sequence, num_new: int, spec: list[int] | None = None) -> ScheduledSeq:
        start = seq.num_computed_tokens
        spec = spec or []
        item = ScheduledSeq(seq, start, num_new, sample=start + num_new == seq.num_tokens + len(spec),
                            spec_token_ids=list(spec))
        req = seq.request
        if item.sample and seq.index == 0:
            item.fork_candidates = list(req.unforked)
        if req.num_prompt_logprobs is not None and seq.index == 0:
            first, last = max(start, req.num_prompt_logprobs - 1), min(start + num_new, seq.num_prompt_tokens - 1)
            if last > first:
                item.prompt_logprobs = (first, last)
        return item

    def _group_shared_prefixes(self, out: SchedulerOutput) -> None:
        """Hydragen's parts over the attention's decode rows: one per decode, and one per verified
        position of a speculative sequence (those k + 1 rows share every full block)."""
        if self.hydragen is None:
            return
        bs = self.blocks.block_size
        tables, full = [], []
        for s in out.seqs:
            if s.num_new_tokens == 1 or s.spec_token_ids:
                for pos in range(s.start, s.start + s.num_new_tokens):
                    tables.append(s.seq.block_table)
                    full.append(pos // bs)
        if len(tables) < 2:
            return
        parts, own = find_shared_prefixes(tables, full, bs, self.hydragen)
        if parts:
            out.shared_prefixes, out.own_start_blocks = parts, own

    def _admit(self, out: SchedulerOutput, budget: int, scheduled: set[int]) -> None:
        """FCFS admission. A sequence starts from its longest cached prefix; one whose next prompt
        block is being computed by a running sequence is passed over until that block is cached,
        so requests sharing a prefix compute it once."""
        bs = self.blocks.block_size
        deferred: list[Sequence] = []
        # seats of the running set: its sequences and the samples still to fork off them
        seats = len(self.running) + sum(len(s.request.unforked) for s in self.running if s.index == 0)
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            width = 1 + len(seq.request.unforked)  # forked samples join the running set with it
            if not has_seats(seats, width, self.config.max_num_seqs):
                break
            # A waiting sequence holds no blocks (new, or preempted and freed).
            # prompt_logprobs need every prompt position's logits: such a request computes its whole prompt.
            hits = ([] if seq.request.params.prompt_logprobs is not None
                    else self.blocks.match_prefix(seq.token_ids, seq.block_hashes))
            if self._prefix_pending(seq, len(hits)):
                deferred.append(self.waiting.popleft())
                continue
            computed, num_new, need = admission(seq.num_tokens, len(hits), bs, budget)
            lookahead = 0
            if self.num_lookahead_tokens and computed + num_new == seq.num_tokens:
                lookahead = max(0, min(self.num_lookahead_tokens, self.max_model_len - seq.num_tokens))
                need = -(-(computed + num_new + lookahead) // bs) - len(hits)
            if not blocks_fit(need, self.blocks.num_reusable(hits), self.blocks.allocator.num_free):
                break
            self.waiting.popleft()
            self.blocks.reuse(seq.block_table, hits, seq.num_prompt_tokens)
            seq.num_computed_tokens = computed
            self.blocks.allocate(seq.block_table, computed + num_new + lookahead)
            self._claim_prefix(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            seats += width
            scheduled.add(seq.seq_id)
            out.seqs.append(self._scheduled(seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(deferred))

    def _prefix_pending(self, seq: Sequence, num_hit_blocks: int) -> bool:
        """True when the first prompt block past the cached prefix is being computed by another
        running sequence."""
        if not self.blocks.enable_prefix_caching:
            return False
        hashes = seq.block_hashes
        return prefix_pending(seq, num_hit_blocks, len(hashes), lambda j: self._running_claimer(hashes[j]))

    def _running_claimer(self, block_hash: int) -> Sequence | None:
        owner = self.pending_prefix.get(block_hash)
        return owner if owner is not None and owner.status is SeqStatus.RUNNING else None

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

    # ------------------------------------------------------------------ update

    def update_from_output(self, out: SchedulerOutput, result: ModelRunnerOutput) -> list[SeqUpdate]:
        """Apply a step's results: new tokens and the stop conditions that need no text, computed
        tokens (less rejected proposals), prefix-cache registration, forks, and the proposals for
        the next step. Finishing waits until the forks are done (a sample forks from a parent that
        stops at its first token). Returns what changed, per sequence."""
        bm = self.blocks
        updates: list[SeqUpdate] = []
        finishing: list[tuple[Sequence, str, int | str | None]] = []
        now = time.monotonic()
        proposed = accepted = 0
        for item in out.seqs:
            seq = item.seq
            prompt_lp = result.prompt_logprobs.get(seq.seq_id)
            if prompt_lp is not None:
                seq.request.num_prompt_logprobs = item.prompt_logprobs[1] + 1
            upd = SeqUpdate(seq, [], None, prompt_lp)
            if item.sample:
                self._append(upd, result, finishing, now)
            rejected = 0
            if item.spec_token_ids:
                # verification emits the accepted proposals and one token after them
                spec = item.spec_token_ids
                ok = len(result.sampled.get(seq.seq_id, [])) - 1
                proposed, accepted = proposed + len(spec), accepted + ok
                self.num_spec_drafts += 1
                # rejected proposals' KV slots are rewritten later (a stop may cut the kept ones short)
                rejected = len(spec) - min(ok, len(upd.new_token_ids))
            seq.num_computed_tokens += item.num_new_tokens - rejected
            if seq.num_computed_tokens <= seq.num_prompt_tokens:
                self.num_prompt_tokens += item.num_new_tokens
            seq.num_cached_blocks = bm.cache_full_blocks(seq.token_ids, seq.block_hashes, seq.block_table,
                                                         seq.num_computed_tokens, seq.num_cached_blocks)
            if item.sample or prompt_lp is not None:
                updates.append(upd)
        for item in out.seqs:
            if item.fork_candidates:
                for child in self._fork(item.seq, item.fork_candidates):
                    upd = SeqUpdate(child, [])
                    self._append(upd, result, finishing, now)
                    updates.append(upd)
        for seq, reason, stop_reason in finishing:
            self.finish_seq(seq, reason, stop_reason)
        self.num_spec_draft_tokens += proposed
        self.num_spec_accepted_tokens += accepted
        if self.spec_policy is not None:
            self.spec_policy.observe(proposed, accepted)
            for item in out.seqs:
                seq = item.seq
                if seq.finished:
                    continue
                if item.sample:
                    # blocks past the next step's tokens held rejected proposals or the draft's lookahead
                    bm.trim(seq.block_table, seq.num_tokens)
                seq.spec_token_ids = result.spec_token_ids.get(seq.seq_id, [])
        return updates

    def _append(self, upd: SeqUpdate, result: ModelRunnerOutput, finishing: list, now: float) -> None:
        """Append the sequence's sampled tokens up to the first that stops it (recorded in finishing)."""
        seq = upd.seq
        tokens = result.sampled.get(seq.seq_id)
        if not tokens:
            return
        lps = result.logprobs.get(seq.seq_id)
        for j, token in enumerate(tokens):
            seq.token_ids.append(token)
            upd.new_token_ids.append(token)
            if lps is not None:
                upd.logprobs = (upd.logprobs or []) + [lps[j]]
            self.num_generation_tokens += 1
            stop = self._stop(seq, token)
            if stop is not None:
                finishing.append((seq, *stop))
                break
        if seq.request.first_token_time is None:
            seq.request.first_token_time = now

    def _fork(self, parent: Sequence, candidates: list[Sequence]) -> list[Sequence]:
        """Start the request's other samples from the parent's computed prompt: full blocks shared,
        the partly filled last block copied by the runner before the next step. A sample that finds
        no free block for its copy queues as an ordinary sequence (it will still reuse the cached
        full blocks); its token sampled this step is dropped."""
        req = parent.request
        forked = []
        for child in candidates:
            if child not in req.unforked:  # aborted meanwhile
                continue
            fork = self.blocks.fork(parent.block_table, parent.num_computed_tokens)
            if fork is None:
                self.waiting.appendleft(child)
                continue
            child.block_table, copy = fork
            if copy is not None:
                self._pending_copies.append((child, *copy))
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = SeqStatus.RUNNING
            self.running.append(child)
            forked.append(child)
        req.unforked = []
        return forked

    def _stop(self, seq: Sequence, token: int) -> tuple[str, int | None] | None:
        """(finish reason, stop reason) on a stop token, EOS (after min_tokens) or length, else None."""
        params = seq.params
        reason, stop_reason = None, None
        if seq.num_output_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                reason, stop_reason = "stop", token
            elif not params.ignore_eos and token in self.eos_token_ids:
                reason = "stop"
        if reason is None and ((params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens)
                               or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is None:
            return None
        return reason, stop_reason
