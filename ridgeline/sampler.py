"""Batched token sampling: penalties, temperature, top-k / top-p / min-p, seeded draws, logprobs.

All rows are processed with tensor ops; the only per-row Python work is drawing the
exponential noise of seeded rows from their own generator, which is what makes a seeded
request reproducible whatever batch it lands in (sampling is argmax(probs / noise), the
exponential-race form of a categorical draw).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .core.request import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: (logprob of the chosen token, its rank, top-N ids, top-N logprobs); None if not requested.
    logprobs: list[tuple[float, int, list[int], list[float]] | None]


def _penalize(logits: torch.Tensor, seqs: list[Sequence], vocab: int) -> None:
    rows = [i for i, s in enumerate(seqs) if _has_penalty(s)]
    if not rows:
        return
    device = logits.device
    sub = logits[rows]
    out_counts = torch.zeros(len(rows), vocab, device=device)
    seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
    rep, pres, freq = [], [], []
    for j, i in enumerate(rows):
        s = seqs[i]
        p = s.request.params
        out_ids = torch.tensor(s.output_token_ids, dtype=torch.long, device=device)
        if len(out_ids):
            out_counts[j].index_add_(0, out_ids, torch.ones(len(out_ids), device=device))
        seen[j, torch.tensor(s.token_ids, dtype=torch.long, device=device)] = True
        rep.append(p.repetition_penalty)
        pres.append(p.presence_penalty)
        freq.append(p.frequency_penalty)
    rep_t = torch.tensor(rep, device=device).unsqueeze(1)
    # Repetition penalty (CTRL / HF semantics) over prompt and output tokens.
    penalized = torch.where(sub > 0, sub / rep_t, sub * rep_t)
    sub = torch.where(seen, penalized, sub)
    # OpenAI presence / frequency penalties over output tokens.
    sub = sub - torch.tensor(freq, device=device).unsqueeze(1) * out_counts
    sub = sub - torch.tensor(pres, device=device).unsqueeze(1) * (out_counts > 0)
    logits[rows] = sub


def _has_penalty(s: Sequence) -> bool:
    p = s.request.params
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _block_eos(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]) -> None:
    """min_tokens: the model may not stop (EOS or stop ids) before the minimum."""
    for i, s in enumerate(seqs):
        p = s.request.params
        if s.num_output_tokens < p.min_tokens:
            ids = list(p.stop_token_ids) + ([] if p.ignore_eos else eos_ids)
            if ids:
                logits[i, ids] = float("-inf")


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens outside top-k, the top-p nucleus and the min-p floor (all per row)."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    drop = ranks >= k
    # Nucleus: keep the smallest prefix whose mass reaches top_p (the token crossing it stays).
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p.unsqueeze(1)
    drop |= probs < (min_p.unsqueeze(1) * probs[:, :1])
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def sample(logits: torch.Tensor, seqs: list[Sequence], generators: list[torch.Generator | None],
           eos_ids: list[int]) -> SamplerOutput:
    """Choose one token per row of `logits` ([rows, vocab], float32) for the matching sequence,
    drawing a sampled row's noise from that sequence's generator."""
    vocab = logits.shape[-1]
    params = [s.request.params for s in seqs]
    want_lp = [p.logprobs is not None for p in params]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None

    logits = logits.clone()
    _penalize(logits, seqs, vocab)
    _block_eos(logits, seqs, eos_ids)

    greedy = [p.greedy for p in params]
    chosen = logits.argmax(dim=-1)
    if not all(greedy):
        rows = [i for i, g in enumerate(greedy) if not g]
        sub = logits[rows]
        temp = torch.tensor([params[i].temperature for i in rows], device=logits.device)
        sub = sub / temp.unsqueeze(1)
        top_k = torch.tensor([params[i].top_k for i in rows], device=logits.device)
        top_p = torch.tensor([params[i].top_p for i in rows], device=logits.device)
        min_p = torch.tensor([params[i].min_p for i in rows], device=logits.device)
        if bool((top_k > 0).any() | (top_p < 1).any() | (min_p > 0).any()):
            sub = _filter(sub, top_k, top_p, min_p)
        probs = sub.softmax(dim=-1)
        noise = torch.empty_like(probs)
        for j, i in enumerate(rows):
            noise[j].exponential_(generator=generators[i])
        chosen[rows] = (probs / noise).argmax(dim=-1)

    token_ids = chosen.tolist()
    lp_out: list[tuple[float, int, list[int], list[float]] | None] = [None] * len(seqs)
    if raw_logprobs is not None:
        rows = [i for i, w in enumerate(want_lp) if w]
        sub = raw_logprobs[rows]
        k = max(params[i].logprobs for i in rows)
        top_vals, top_ids = sub.topk(k, dim=-1) if k > 0 else (sub[:, :0], sub[:, :0].long())
        chosen_rows = chosen[rows]
        chosen_lp = sub.gather(1, chosen_rows.unsqueeze(1)).squeeze(1)
        ranks = (sub > chosen_lp.unsqueeze(1)).sum(dim=-1) + 1
        chosen_lp_l, ranks_l = chosen_lp.tolist(), ranks.tolist()
        top_ids_l, top_vals_l = top_ids.tolist(), top_vals.tolist()
        for j, i in enumerate(rows):
            n = params[i].logprobs
            lp_out[i] = (chosen_lp_l[j], ranks_l[j], top_ids_l[j][:n], top_vals_l[j][:n])
    return SamplerOutput(token_ids=token_ids, logprobs=lp_out)
