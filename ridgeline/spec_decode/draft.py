"""A draft model: a smaller checkpoint with the target's vocabulary proposes the next tokens.

It has its own paged KV pool with the target's block geometry and is indexed by the target's
block tables, so the scheduler's rules (admission, preemption, prefix caching, forks) cover its
KV too. Every step it runs the target's flat batch first, which keeps its KV equal to the
target's positions (rejected proposals' slots are rewritten as the target's are); then, for
each sequence that sampled, it decodes from the token just emitted, one position at a time,
k times. Those k positions lie in blocks the scheduler reserved (`num_lookahead_tokens`).
"""

from __future__ import annotations

import logging

import torch

from ..attention import AttentionMetadata, build_metadata
from ..kv_cache import KVCachePool
from ..loader import load_checkpoint
from ..model import Transformer
from ..sampler import SampleRow, draw, processed_logits, sampling_probs
from ..tokenizer import load_tokenizer

log = logging.getLogger("ridgeline")


class DraftModel:
    def __init__(self, path: str, dtype: torch.dtype, device: torch.device, num_blocks: int, block_size: int,
                 target_tokenizer, target_vocab_size: int, cpu_kernels: bool = True, quant_activation_bytes: int = 1):
        ckpt = load_checkpoint(path, dtype, "auto")
        if ckpt.config.vocab_size != target_vocab_size:
            raise ValueError(f"speculative: the draft model's vocabulary has {ckpt.config.vocab_size} tokens, "
                             f"the target's {target_vocab_size}; a draft must share the target's vocabulary")
        tokenizer = load_tokenizer(ckpt.path, ckpt.gguf_metadata)
        if tokenizer.get_vocab() != target_tokenizer.get_vocab():
            raise ValueError("speculative: the draft model's tokenizer maps tokens to other ids than the "
                             "target's; a draft must share the target's vocabulary")
        self.path = ckpt.path
        self.config = ckpt.config
        self.model = Transformer(ckpt.config, ckpt.weights, dtype, device, cpu_kernels, quant_activation_bytes)
        del ckpt
        self.kv = KVCachePool(self.config, num_blocks, block_size, dtype, device)
        self.device = device
        self._generators: dict[int, torch.Generator] = {}
        log.info("speculative: draft model %s (%d layers)", self.path.name, self.config.num_layers)

    def forget(self, seq_id: int) -> None:
        self._generators.pop(seq_id, None)

    def run_step(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> None:
        """The target's flat batch through the draft, for its KV (no logits)."""
        self.model.forward(input_ids, positions, meta, self.kv,
                           torch.zeros(0, dtype=torch.long, device=self.device))

    def propose(self, rows: list[SampleRow], seq_ids: list[int], seeds: list[int], tables: list[list[int]],
                k: int, eos_ids: list[int]) -> list[tuple[list[int], torch.Tensor | None]]:
        """k tokens per sequence from its context (rows[i].token_ids, last token not yet in the
        draft's KV), with the probabilities they were drawn from for sampled requests."""
        bs = self.kv.block_size
        n = len(rows)
        contexts = [list(r.token_ids) for r in rows]
        # at most as far as the reserved blocks reach
        limit = [min(k, len(t) * bs - (len(c) - 1)) for t, c in zip(tables, contexts)]
        drafts: list[list[int]] = [[] for _ in range(n)]
        qs: list[list[torch.Tensor]] = [[] for _ in range(n)]
        for step in range(max(limit, default=0)):
            live = [i for i in range(n) if step < limit[i]]
            if not live:
                break
            pos = [len(contexts[i]) - 1 for i in live]
            meta = build_metadata([tables[i] for i in live], pos, [1] * len(live), bs, self.config.uniform_window,
                                  self.device, dtype=self.model.dtype,
                                  local_window=self.config.sliding_window if self.config.hybrid_attention else None)
            ids = torch.tensor([contexts[i][-1] for i in live], device=self.device)
            logits = self.model.forward(ids, torch.tensor(pos, device=self.device), meta, self.kv,
                                        torch.arange(len(live), device=self.device))
            step_rows = [SampleRow(rows[i].params, contexts[i], rows[i].num_prompt_tokens) for i in live]
            proc = processed_logits(logits, step_rows, eos_ids)
            greedy = proc.argmax(dim=-1).tolist()
            sampled = [j for j, i in enumerate(live) if not rows[i].params.greedy]
            probs = sampling_probs(proc[sampled], [rows[live[j]].params for j in sampled]) if sampled else None
            prob_row = {j: r for r, j in enumerate(sampled)}
            for j, i in enumerate(live):
                if rows[i].params.greedy:
                    tok = greedy[j]
                else:
                    q = probs[prob_row[j]]
                    tok = draw(q, self._generator(seq_ids[i], seeds[i]))
                    qs[i].append(q)
                drafts[i].append(tok)
                contexts[i].append(tok)
        return [(d, torch.stack(q) if q else None) for d, q in zip(drafts, qs)]

    def _generator(self, seq_id: int, seed: int) -> torch.Generator:
        gen = self._generators.get(seq_id)
        if gen is None:
            # a stream of its own, apart from the target's draws for the same sequence
            gen = self._generators[seq_id] = torch.Generator(device=self.device).manual_seed(seed ^ 0x5DEECE66D)
        return gen
