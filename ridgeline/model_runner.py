"""ModelRunner: owns the model, the KV pool and the sampler's generators; runs one SchedulerOutput.

It turns the scheduler's plain data into tensors (the flat batch of new tokens, their
positions, the attention metadata), copies the blocks of forked samples, runs the model once,
samples every row that caught up with its sequence (verifying speculative proposals, where a
sequence brought some), computes prompt logprobs, proposes the next step's tokens when asked,
and returns plain results (core.scheduler.ModelRunnerOutput). It never changes scheduling state.
"""

from __future__ import annotations

import torch

from .attention import build_metadata
from .core.request import Sequence
from .core.scheduler import ModelRunnerOutput, ScheduledSeq, SchedulerOutput, TokenLogprobs
from .kv_cache import KVCachePool
from .model import Transformer
from .sampler import SampleRow, sample
from .spec_decode.draft import DraftModel
from .spec_decode.ngram import NgramProposer
from .spec_decode.verify import SpecRows, verify
from .structured.masks import GrammarMasks, MaskRequest


class ModelRunner:
    def __init__(self, model: Transformer, kv: KVCachePool, device: torch.device, sliding_window: int | None,
                 eos_token_ids: list[int], proposer: NgramProposer | DraftModel | None = None,
                 local_window: int | None = None):
        """sliding_window: the window of every layer (None: full context); local_window: hybrid
        models' window for their sliding layers (the full layers then see everything)."""
        self.model = model
        self.kv = kv
        self.device = device
        self.sliding_window = sliding_window
        self.local_window = local_window
        self.eos_token_ids = list(eos_token_ids)
        self.proposer = proposer  # speculative decoding; None: off
        self._generators: dict[int, torch.Generator] = {}  # seq_id -> its sampling generator
        self._draft_q: dict[int, torch.Tensor] = {}  # seq_id -> the draft's probabilities of its proposals
        self.grammar: GrammarMasks | None = None  # structured outputs' matchers and masks (set by the engine)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.greedy:
            return None
        gen = self._generators.get(seq.seq_id)
        if gen is None:
            gen = self._generators[seq.seq_id] = torch.Generator(device=self.device).manual_seed(seq.seed)
        return gen

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for seq_id in out.finished_seq_ids:
            self._generators.pop(seq_id, None)
            self._draft_q.pop(seq_id, None)
            if self.grammar is not None:
                self.grammar.forget(seq_id)
            if self.proposer is not None:
                self.proposer.forget(seq_id)
        for src, dst in out.blocks_to_copy:
            self.kv.copy_block(src, dst)
            if isinstance(self.proposer, DraftModel):
                self.proposer.kv.copy_block(src, dst)
        result = ModelRunnerOutput()
        if not out.seqs:
            return result

        input_ids: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        samples = []  # (sequence, index into logit_rows)
        spec = []  # (scheduled item, index of its first row in logit_rows)
        prompt_lp = []  # (sequence, first index into logit_rows, first position, count)
        row = 0
        for item in out.seqs:
            seq, start, n = item.seq, item.start, item.num_new_tokens
            tokens = seq.token_ids + item.spec_token_ids if item.spec_token_ids else seq.token_ids
            input_ids.extend(tokens[start:start + n])
            positions.extend(range(start, start + n))
            if item.prompt_logprobs is not None:
                first, last = item.prompt_logprobs
                prompt_lp.append((seq, len(logit_rows), first, last - first))
                logit_rows.extend(range(row + first - start, row + last - start))
            if item.spec_token_ids:
                spec.append((item, len(logit_rows)))
                logit_rows.extend(range(row, row + n))
            elif item.sample:
                samples.append((seq, len(logit_rows)))
                logit_rows.append(row + n - 1)
            row += n
        for item in out.seqs:  # forked samples draw from their parent's row
            if item.fork_candidates:
                parent_row = next(r for s, r in samples if s is item.seq)
                samples.extend((child, parent_row) for child in item.fork_candidates)
        masks = self._start_masks(samples, spec)  # computed in a worker thread while the forward runs


        # A speculative sequence's k + 1 positions attend as k + 1 decode rows over its block table:
        # every position's K/V is written before attention, so row j sees the positions up to its
        # own, and the decode kernel (the one plain decoding uses) computes it.
        tables, starts, lens = [], [], []
        for item in out.seqs:
            n = item.num_new_tokens if item.spec_token_ids else 1
            tables += [item.seq.block_table] * n
            starts += range(item.start, item.start + n)
            lens += [1] * n if item.spec_token_ids else [item.num_new_tokens]
        shared = (out.shared_prefixes, out.own_start_blocks) if out.shared_prefixes else None
        bs = self.kv.block_size
        meta = build_metadata(tables, starts, lens, bs, self.sliding_window, self.device,
                              dtype=self.model.dtype, shared=shared, local_window=self.local_window)
        dev = self.device
        ids_t, pos_t = torch.tensor(input_ids, device=dev), torch.tensor(positions, device=dev)
        logits = self.model.forward(ids_t, pos_t, meta, self.kv, torch.tensor(logit_rows, dtype=torch.long, device=dev))
        if isinstance(self.proposer, DraftModel):
            self.proposer.run_step(ids_t, pos_t, meta)

        for seq, first_row, first_pos, count in prompt_lp:
            result.prompt_logprobs[seq.seq_id] = self._prompt_logprobs(
                seq, logits[first_row:first_row + count], first_pos + 1)
        if samples:
            seqs = [s for s, _ in samples]
            rows = [SampleRow(s.params, s.token_ids, s.num_prompt_tokens, self._generator(s)) for s in seqs]
            sample_logits = logits[torch.tensor([r for _, r in samples], device=dev)]
            dead = self._apply_masks(masks, "sample", sample_logits, list(range(len(seqs))), seqs, result)
            sampled = sample(sample_logits, rows, self.eos_token_ids)
            for seq, tok, lp in zip(seqs, sampled.token_ids, sampled.logprobs):
                if seq.seq_id in dead:  # no token is allowed: the engine ends it (finish_reason "grammar_error")
                    continue
                result.sampled[seq.seq_id] = [tok]
                if lp is not None:
                    result.logprobs[seq.seq_id] = [(tok, *lp)]
        if spec:
            self._verify(logits, spec, result, masks)
        if out.num_spec_tokens and self.proposer is not None:
            self._propose(out, result)
        return result

    def _start_masks(self, samples: list[tuple[Sequence, int]], spec: list[tuple[ScheduledSeq, int]]):
        """([("sample" | "spec", index into samples or spec)], pending masks) of the constrained
        rows, or None. A speculative sequence gets a mask for each of its rows."""
        if self.grammar is None:
            return None
        where, rows = [], []
        for j, (s, _) in enumerate(samples):
            if s.params.structured_outputs is not None:
                where.append(("sample", j))
                rows.append(MaskRequest(s.seq_id, s.params.structured_outputs, s.token_ids, s.num_prompt_tokens))
        for k, (item, _) in enumerate(spec):
            s = item.seq
            if s.params.structured_outputs is not None:
                where.append(("spec", k))
                rows.append(MaskRequest(s.seq_id, s.params.structured_outputs, s.token_ids, s.num_prompt_tokens,
                                        list(item.spec_token_ids)))
        return (where, self.grammar.start(rows)) if rows else None

    def _apply_masks(self, masks, kind: str, logits: torch.Tensor, starts: list[int], seqs: list[Sequence],
                     result: ModelRunnerOutput) -> set[int]:
        """Disallowed tokens of the constrained rows of `kind` to -inf, in place (logprobs are then
        those of the masked distribution, as in vLLM). Item j's rows start at logits[starts[j]].
        Returns the seq ids whose grammar allows nothing (reported in result.grammar_errors)."""
        if masks is None:
            return set()
        where, pending = masks
        res = self.grammar.result(pending)
        sel, bias, dead = [], [], set()
        for r, (k, j) in enumerate(where):
            if k != kind:
                continue
            rows = res.rows(r)
            sel += range(starts[j], starts[j] + rows.shape[0])
            bias.append(rows)
            if r in res.errors:
                result.grammar_errors[seqs[j].seq_id] = res.errors[r]
                dead.add(seqs[j].seq_id)
        if sel:  # + 0 where allowed, + -inf elsewhere
            logits.index_add_(0, torch.tensor(sel, device=logits.device), torch.cat(bias).to(logits.device, logits.dtype))
        return dead

    def _verify(self, logits: torch.Tensor, spec: list[tuple[ScheduledSeq, int]], result: ModelRunnerOutput,
                masks=None) -> None:
        rows, groups, index = [], [], []
        for item, first in spec:
            seq, gen = item.seq, self._generator(item.seq)
            context = seq.token_ids + item.spec_token_ids
            # row j predicts the token after the j-th proposal: its context ends there
            rows += [SampleRow(seq.params, context[:seq.num_tokens + j], seq.num_prompt_tokens, gen)
                     for j in range(len(item.spec_token_ids) + 1)]
            q = self._draft_q.pop(seq.seq_id, None)
            groups.append(SpecRows(len(index), item.spec_token_ids,
                                   q[:len(item.spec_token_ids)] if q is not None else None))
            index += range(first, first + len(item.spec_token_ids) + 1)
        spec_logits = logits[torch.tensor(index, device=logits.device)]
        # constrained rows verify against the masked target distribution: refused proposals are rejected
        dead = self._apply_masks(masks, "spec", spec_logits, [g.first for g in groups], [i.seq for i, _ in spec], result)
        verified = verify(spec_logits, rows, groups, self.eos_token_ids)
        for (item, _), v in zip(spec, verified):
            if item.seq.seq_id in dead:
                continue
            result.sampled[item.seq.seq_id] = v.token_ids
            if v.logprobs is not None:
                result.logprobs[item.seq.seq_id] = [(t, *lp) for t, lp in zip(v.token_ids, v.logprobs)]

    def _propose(self, out: SchedulerOutput, result: ModelRunnerOutput) -> None:
        """Proposals for the next step of every sequence that sampled (its context: the tokens so
        far and those just emitted). Forked samples start proposing after their first decode."""
        k = out.num_spec_tokens
        items = [item for item in out.seqs if item.sample and item.seq.seq_id in result.sampled]
        if isinstance(self.proposer, NgramProposer):
            for item in items:
                seq = item.seq
                proposal = self.proposer.propose(seq.seq_id, seq.token_ids + result.sampled[seq.seq_id], k)
                if proposal:
                    result.spec_token_ids[seq.seq_id] = proposal
            return
        rows, ids, seeds, tables = [], [], [], []
        for item in items:
            seq = item.seq
            rows.append(SampleRow(seq.params, seq.token_ids + result.sampled[seq.seq_id], seq.num_prompt_tokens))
            ids.append(seq.seq_id)
            seeds.append(seq.seed)
            tables.append(seq.block_table)
        for seq_id, (proposal, q) in zip(ids, self.proposer.propose(rows, ids, seeds, tables, k, self.eos_token_ids)):
            if proposal:
                result.spec_token_ids[seq_id] = proposal
                if q is not None:
                    self._draft_q[seq_id] = q

    @staticmethod
    def _prompt_logprobs(seq, logits: torch.Tensor, pos0: int) -> list[TokenLogprobs]:
        """Logprobs of prompt tokens pos0 .. pos0 + len(logits) - 1 (row j predicts token pos0 + j)."""
        k = seq.params.prompt_logprobs
        lp = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(seq.token_ids[pos0:pos0 + lp.shape[0]])
        chosen = lp.gather(1, targets.unsqueeze(1).to(lp.device)).squeeze(1)
        ranks = (lp > chosen.unsqueeze(1)).sum(-1) + 1
        top_vals, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        return [(tok, lp_j, rank, ids, vals) for tok, lp_j, rank, ids, vals in
                zip(targets.tolist(), chosen.tolist(), ranks.tolist(), top_ids.tolist(), top_vals.tolist())]
