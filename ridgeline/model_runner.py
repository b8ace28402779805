"""ModelRunner: owns the model, the KV pool and the sampler's generators; runs one SchedulerOutput.

It turns the scheduler's plain data into tensors (the flat batch of new tokens, their
positions, the attention metadata), copies the blocks of forked samples, runs the model once,
samples every row that caught up with its sequence and computes prompt logprobs, and returns
plain results (core.scheduler.ModelRunnerOutput). It never changes scheduling state.
"""

from __future__ import annotations

import torch

from .attention import build_metadata
from .core.scheduler import ModelRunnerOutput, SchedulerOutput, TokenLogprobs
from .kv_cache import KVCachePool
from .model import Transformer
from .sampler import sample


class ModelRunner:
    def __init__(self, model: Transformer, kv: KVCachePool, device: torch.device, sliding_window: int | None,
                 eos_token_ids: list[int]):
        self.model = model
        self.kv = kv
        self.device = device
        self.sliding_window = sliding_window
        self.eos_token_ids = list(eos_token_ids)
        self._generators: dict[int, torch.Generator] = {}  # seq_id -> its sampling generator

    def _generator(self, seq) -> torch.Generator:
        gen = self._generators.get(seq.seq_id)
        if gen is None:
            gen = self._generators[seq.seq_id] = torch.Generator(device=self.device).manual_seed(seq.seed)
        return gen

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for seq_id in out.finished_seq_ids:
            self._generators.pop(seq_id, None)
        for src, dst in out.blocks_to_copy:
            self.kv.copy_block(src, dst)
        result = ModelRunnerOutput()
        if not out.seqs:
            return result

        input_ids: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        samples = []  # (sequence, index into logit_rows)
        prompt_lp = []  # (sequence, first index into logit_rows, first position, count)
        row = 0
        for item in out.seqs:
            seq, start, n = item.seq, item.start, item.num_new_tokens
            input_ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            if item.prompt_logprobs is not None:
                first, last = item.prompt_logprobs
                prompt_lp.append((seq, len(logit_rows), first, last - first))
                logit_rows.extend(range(row + first - start, row + last - start))
            if item.sample:
                samples.append((seq, len(logit_rows)))
                logit_rows.append(row + n - 1)
            row += n
        for item in out.seqs:  # forked samples draw from their parent's row
            if item.fork_candidates:
                parent_row = next(r for s, r in samples if s is item.seq)
                samples.extend((child, parent_row) for child in item.fork_candidates)

        bs = self.kv.block_size
        shared = (out.shared_prefixes, out.own_start_blocks) if out.shared_prefixes else None
        meta = build_metadata([s.seq.block_table for s in out.seqs], [s.start for s in out.seqs],
                              [s.num_new_tokens for s in out.seqs], bs, self.sliding_window, self.device,
                              dtype=self.model.dtype, shared=shared)
        dev = self.device
        logits = self.model.forward(
            torch.tensor(input_ids, device=dev), torch.tensor(positions, device=dev), meta, self.kv,
            torch.tensor(logit_rows, dtype=torch.long, device=dev))

        for seq, first_row, first_pos, count in prompt_lp:
            result.prompt_logprobs[seq.seq_id] = self._prompt_logprobs(
                seq, logits[first_row:first_row + count], first_pos + 1)
        if samples:
            rows = torch.tensor([r for _, r in samples], device=dev)
            seqs = [s for s, _ in samples]
            sampled = sample(logits[rows], seqs, [self._generator(s) if not s.params.greedy else None
                                                  for s in seqs], self.eos_token_ids)
            for seq, tok, lp in zip(seqs, sampled.token_ids, sampled.logprobs):
                result.sampled[seq.seq_id] = [tok]
                if lp is not None:
                    result.logprobs[seq.seq_id] = [(tok, *lp)]
        return result

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
