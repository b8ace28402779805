"""Batched token sampling: penalties, temperature, top-k / top-p / min-p, seeded draws, logprobs.

All rows are processed with tensor ops; the only per-row Python work is drawing the
exponential noise of seeded rows from their own generator, which is what makes a seeded
request reproducible whatever batch it lands in (sampling is argmax(probs / noise), the
exponential-race form of a categorical draw). A row is one position to sample: its request's
parameters and the tokens before it (speculative decoding verifies several rows of one
sequence, each with the drafts before it in its context).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams

# (logprob of the chosen token, its rank, top-N ids, top-N logprobs)
RowLogprobs = tuple[float, int, list[int], list[float]]


@dataclass
class SampleRow:
    params: SamplingParams
    token_ids: list[int]  # the tokens before the sampled position (prompt + output so far)
    num_prompt_tokens: int
    generator: torch.Generator | None = None  # for sampled rows

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[RowLogprobs | None]  # per row; None if not requested


def _penalize(logits: torch.Tensor, rows: list[SampleRow], vocab: int) -> None:
    sel = [i for i, r in enumerate(rows) if _has_penalty(r.params)]
    if not sel:
        return
    device = logits.device
    sub = logits[sel]
    out_counts = torch.zeros(len(sel), vocab, device=device)
    seen = torch.zeros(len(sel), vocab, dtype=torch.bool, device=device)
    rep, pres, freq = [], [], []
    for j, i in enumerate(sel):
        r = rows[i]
        p = r.params
        out_ids = torch.tensor(r.output_token_ids, dtype=torch.long, device=device)
        if len(out_ids):
            out_counts[j].index_add_(0, out_ids, torch.ones(len(out_ids), device=device))
        seen[j, torch.tensor(r.token_ids, dtype=torch.long, device=device)] = True
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
    logits[sel] = sub


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _block_eos(logits: torch.Tensor, rows: list[SampleRow], eos_ids: list[int]) -> None:
    """min_tokens: the model may not stop (EOS or stop ids) before the minimum."""
    for i, r in enumerate(rows):
        p = r.params
        if r.num_output_tokens < p.min_tokens:
            ids = list(p.stop_token_ids) + ([] if p.ignore_eos else eos_ids)
            if ids:
                kept = logits[i, ids].clone()
                logits[i, ids] = float("-inf")
                if not bool(torch.isfinite(logits[i]).any()):  # a grammar that allows only EOS wins over min_tokens
                    logits[i, ids] = kept


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens outside top-k, then outside the top-p nucleus of what top-k kept (renormalized,
    as transformers and vLLM apply them) and under the min-p floor (all per row)."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Nucleus: keep the smallest prefix whose mass reaches top_p (the token crossing it stays).
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p.unsqueeze(1)
    drop |= probs < (min_p.unsqueeze(1) * probs[:, :1])
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def processed_logits(logits: torch.Tensor, rows: list[SampleRow], eos_ids: list[int]) -> torch.Tensor:
    """A copy of the rows' logits with penalties and the min_tokens block applied: their argmax is
    the greedy choice."""
    logits = logits.clone()
    _penalize(logits, rows, logits.shape[-1])
    _block_eos(logits, rows, eos_ids)
    return logits


def sampling_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The distribution sampled rows draw from: processed logits over temperature, then top-k /
    top-p / min-p."""
    dev = logits.device
    sub = logits / torch.tensor([p.temperature for p in params], device=dev).unsqueeze(1)
    top_k = torch.tensor([p.top_k for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    min_p = torch.tensor([p.min_p for p in params], device=dev)
    if bool((top_k > 0).any() | (top_p < 1).any() | (min_p > 0).any()):
        sub = _filter(sub, top_k, top_p, min_p)
    return sub.softmax(dim=-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from (unnormalized) probs: the exponential race with the row's generator."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int((probs / noise).argmax())


def row_logprobs(raw_logprobs: torch.Tensor, chosen: torch.Tensor, num_top: list[int]) -> list[RowLogprobs]:
    """Logprob and rank of each row's chosen token and its top num_top[i] alternatives."""
    k = max(num_top)
    top_vals, top_ids = raw_logprobs.topk(k, dim=-1) if k > 0 else (raw_logprobs[:, :0], raw_logprobs[:, :0].long())
    chosen_lp = raw_logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
    ranks = (raw_logprobs > chosen_lp.unsqueeze(1)).sum(dim=-1) + 1
    top_ids_l, top_vals_l = top_ids.tolist(), top_vals.tolist()
    return [(lp, rank, top_ids_l[j][:n], top_vals_l[j][:n])
            for j, (lp, rank, n) in enumerate(zip(chosen_lp.tolist(), ranks.tolist(), num_top))]


def sample(logits: torch.Tensor, rows: list[SampleRow], eos_ids: list[int]) -> SamplerOutput:
    """Choose one token per row of `logits` ([rows, vocab], float32), drawing a sampled row's
    noise from its generator."""
    params = [r.params for r in rows]
    want_lp = [p.logprobs is not None for p in params]
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_lp) else None

    logits = processed_logits(logits, rows, eos_ids)
    chosen = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        probs = sampling_probs(logits[sampled], [params[i] for i in sampled])
        noise = torch.empty_like(probs)
        for j, i in enumerate(sampled):
            noise[j].exponential_(generator=rows[i].generator)
        chosen[sampled] = (probs / noise).argmax(dim=-1)

    token_ids = chosen.tolist()
    lp_out: list[RowLogprobs | None] = [None] * len(rows)
    if raw_logprobs is not None:
        sel = [i for i, w in enumerate(want_lp) if w]
        for i, lp in zip(sel, row_logprobs(raw_logprobs[sel], chosen[sel], [params[i].logprobs for i in sel])):
            lp_out[i] = lp
    return SamplerOutput(token_ids=token_ids, logprobs=lp_out)
