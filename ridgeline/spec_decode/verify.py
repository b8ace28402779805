"""Verification of proposed tokens against the target model's rows (lossless).

A sequence with proposals d_1..d_k contributes k + 1 rows: row j holds the target's logits for
the position after d_j (row 0: after the sequence's last token). Row j is processed exactly as
an ordinary decode would process it (penalties over the tokens before it, min_tokens, then
temperature / top-k / top-p / min-p), so:
- greedy: d_{j+1} is accepted while it is row j's argmax; the first row whose argmax differs
  gives the next token, and if all k are accepted row k gives one more (the outputs are those
  of plain greedy decoding);
- sampled: d_{j+1} is accepted with probability min(1, p_j(d) / q_j(d)), where q_j is the
  distribution the proposal was drawn from (a point mass for n-gram lookup); at the first
  rejection the token is drawn from max(0, p_j - q_j) renormalized, and after k acceptances from
  p_k. Each emitted token is then distributed exactly as p (Leviathan et al., Chen et al., 2023).
All draws come from the sequence's own generator, so a seeded request is reproducible whatever
batch it lands in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampler import RowLogprobs, SampleRow, draw, processed_logits, row_logprobs, sampling_probs


@dataclass
class SpecRows:
    """One sequence's verification rows: rows[first:first + len(drafts) + 1] of the batch."""
    first: int
    drafts: list[int]
    q: torch.Tensor | None = None  # [len(drafts), vocab] draft probabilities; None: point masses


@dataclass
class Verified:
    token_ids: list[int]  # accepted proposals, then the token after them
    logprobs: list[RowLogprobs] | None  # per emitted token, if asked for


def verify(logits: torch.Tensor, rows: list[SampleRow], groups: list[SpecRows],
           eos_ids: list[int]) -> list[Verified]:
    """Verify each group's proposals; `rows` describe every row of `logits` (params and the tokens
    before that row's position, proposals included)."""
    raw = torch.log_softmax(logits, dim=-1) if any(rows[g.first].params.logprobs is not None for g in groups) else None
    proc = processed_logits(logits, rows, eos_ids)
    greedy_ids = proc.argmax(dim=-1).tolist()
    sampled_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    probs = {}
    if sampled_rows:
        p = sampling_probs(proc[sampled_rows], [rows[i].params for i in sampled_rows])
        probs = {i: p[j] for j, i in enumerate(sampled_rows)}
    results = []
    for g in groups:
        params, gen = rows[g.first].params, rows[g.first].generator
        if params.greedy:
            tokens = _accept_greedy(g, greedy_ids)
        else:
            tokens = _accept_sampled(g, probs, gen)
        lps = None
        if raw is not None and params.logprobs is not None:
            sel = list(range(g.first, g.first + len(tokens)))
            lps = row_logprobs(raw[sel], torch.tensor(tokens, device=logits.device), [params.logprobs] * len(sel))
        results.append(Verified(tokens, lps))
    return results


def _accept_greedy(g: SpecRows, argmax: list[int]) -> list[int]:
    tokens = []
    for j, d in enumerate(g.drafts):
        t = argmax[g.first + j]
        tokens.append(t)
        if t != d:
            return tokens
    tokens.append(argmax[g.first + len(g.drafts)])
    return tokens


def _accept_sampled(g: SpecRows, probs: dict[int, torch.Tensor], gen: torch.Generator | None) -> list[int]:
    tokens = []
    for j, d in enumerate(g.drafts):
        p = probs[g.first + j]
        q_d = float(g.q[j, d]) if g.q is not None else 1.0
        u = float(torch.rand((), generator=gen, device=p.device))
        if q_d > 0 and u * q_d < float(p[d]):
            tokens.append(d)
            continue
        residual = (p - g.q[j]).clamp_min_(0) if g.q is not None else p.clone()
        if g.q is None:
            residual[d] = 0
        if float(residual.sum()) <= 0:  # p == q: nothing left to correct, p itself is exact
            residual = p
        tokens.append(draw(residual, gen))
        return tokens
    tokens.append(draw(probs[g.first + len(g.drafts)], gen))
    return tokens
