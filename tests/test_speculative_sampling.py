"""Speculative sampling is lossless (issue 13, acceptance 2): with a deliberately poor draft model,
and with n-gram proposals (q a point mass), the first sampled tokens are distributed exactly as
the target's own distribution.

The target is a tiny random Llama with a 16-token vocabulary (tests/small_vocab.py) whose
next-token distributions are far from one-hot (~2.3 nats, top token ~0.2-0.3), so the joint
distribution of the first three tokens spreads over ~800 cells expected 5+ times in 20,000
samples. That joint is enumerated exactly with transformers on the same checkpoint
(small_vocab.exact_joint, with the sampling params written out independently of ridgeline's
sampler), and N seeded completions (seeds 0..N-1, one request each, all through one generate
call) are tested against it with Pearson's chi-square (cells expected < 5 times pooled). The
draft is another random model (total variation ~0.4-0.55 per token, ~0.8 over three tokens).

Token 1 is sampled at prefill; tokens 2 and 3 come out of verification (the scheduler verifies at
most max_tokens - 2 proposals in the second step, so max_tokens is K + 2): with K = 1 token 3 is
the bonus draw from p_1 when token 2 was accepted, with K >= 2 it is the second proposal's
verdict; every branch of the rule (accept, residual draw, bonus) shapes the tested joint. "plain"
(no speculation) checks the test itself against the engine's ordinary sampling.

The same test must reject a broken rule: `_accept_sampled` is swapped for variants that accept
every proposal, accept with p(d) ignoring q, treat the n-gram point mass as uniform, redraw from p
instead of the residual, or draw the bonus token from the previous row. Everything is seeded, so
the p-values are fixed numbers. Observed (N = 20,000): plain 0.245, draft_k1 0.607, draft_k3
0.028, draft_k2_top_k_penalties 0.327, ngram_k3 0.0071, ngram_k2_top_p 0.047 (> ALPHA = 1e-4;
at N = 100,000 on other seeds ngram_k3 0.95, draft_k3 0.21, plain 0.66); broken rules on 5,000
samples: 0 (accept_all), 1.6e-38, 1.6e-63, 7.3e-14 (bonus off by one), 0, 0, 4.8e-29 (< 1e-9).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from ridgeline import LLM, SamplingParams
from ridgeline.sampler import draw
from ridgeline.spec_decode import verify as verify_mod

from .small_vocab import build_model, chi_square, exact_joint, save

ALPHA = 1e-4  # the correct rule must not be rejected at this level
N = 20_000  # samples per correct-rule case
N_BROKEN = 5_000  # samples per broken-rule case
BROKEN_P = 1e-9  # a broken rule's p-value must fall below this
LENGTH = 3  # tokens whose joint distribution is tested
# every token of the vocabulary occurs in the prompt, so n-gram lookup always proposes
PROMPT = [11, 4, 0, 9, 14, 2, 7, 13, 5, 1, 15, 8, 3, 12, 6, 10, 4, 9, 2, 13, 1, 8, 12, 10]

# name -> (speculative ("draft", "ngram" or None), K, max_tokens, sampling params)
CASES = {
    "plain": (None, 0, LENGTH, {}),
    "draft_k1": ("draft", 1, LENGTH, {}),
    "draft_k3": ("draft", 3, 5, {}),
    "draft_k2_top_k_penalties": ("draft", 2, 4, dict(top_k=8, repetition_penalty=1.3, presence_penalty=0.5)),
    "ngram_k3": ("ngram", 3, 5, {}),
    "ngram_k2_top_p": ("ngram", 2, 4, dict(top_p=0.8)),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_vocab")
    target = build_model(seed=1)
    # a poor draft: other weights, sharper logits (total variation from the target's next-token
    # distributions ~0.4-0.55)
    draft = build_model(seed=2, embed_std=0.16)
    return target, save(target, root / "target"), save(draft, root / "draft")


@pytest.fixture(scope="module")
def engines(checkpoints):
    _, target_dir, draft_dir = checkpoints
    made: dict[tuple, LLM] = {}

    def get(spec: str | None, k: int) -> LLM:
        if (spec, k) not in made:
            kw = {}
            if spec is not None:
                kw = dict(speculative=str(draft_dir) if spec == "draft" else "ngram",
                          num_speculative_tokens=k, speculative_adaptive=False, prompt_lookup_min=1)
            made[spec, k] = LLM(str(target_dir), dtype="float32", kv_cache_memory="32MiB", **kw)
        return made[spec, k]

    return get


@pytest.fixture(scope="module")
def exact(checkpoints):
    target = checkpoints[0]
    cache: dict[tuple, dict] = {}

    def get(params: dict) -> dict:
        key = tuple(sorted(params.items()))
        if key not in cache:
            cache[key] = exact_joint(target, PROMPT, LENGTH, **params)
        return cache[key]

    return get


def run_case(name: str, engines, exact, n: int) -> tuple[float, int, float, int, float]:
    """Sample case `name` n times (seeds 0..n-1) and test the first LENGTH tokens against the exact
    joint: (chi-square statistic, degrees of freedom, p-value, sequences that verified proposals,
    acceptance rate of the proposals)."""
    spec, k, max_tokens, params = CASES[name]
    llm = engines(spec, k)
    before = llm.get_stats()
    sps = [SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=i, **params)
           for i in range(n)]
    outs = llm.generate([PROMPT] * n, sps, use_tqdm=False)
    after = llm.get_stats()
    counts = Counter(tuple(o.outputs[0].token_ids[:LENGTH]) for o in outs)
    assert sum(counts.values()) == n and all(len(s) == LENGTH for s in counts)
    stat, df, p = chi_square(counts, exact(params))
    drafts = after.spec_decode_num_drafts - before.spec_decode_num_drafts
    proposed = after.spec_decode_num_draft_tokens - before.spec_decode_num_draft_tokens
    accepted = after.spec_decode_num_accepted_tokens - before.spec_decode_num_accepted_tokens
    rate = accepted / proposed if proposed else float("nan")
    print(f"\n{name} (n={n}): chi2={stat:.1f} df={df} p={p:.3g} acceptance={rate:.3f}")
    return stat, df, p, drafts, rate


@pytest.mark.parametrize("name", list(CASES))
def test_first_tokens_follow_the_targets_distribution(name, engines, exact):
    stat, df, p, drafts, rate = run_case(name, engines, exact, N)
    assert p > ALPHA, f"{name}: chi2={stat:.1f} on {df} df, p={p:.3g}: the samples are not the target's distribution"
    if CASES[name][0] is not None:
        # every request verified proposals at least once (in its second step), and the proposals
        # are poor (acceptance per proposed token ~0.22-0.36 for the draft, ~0.03-0.05 for n-gram
        # lookup, whose first proposal is accepted ~9% of the time): the rule's accept and reject
        # branches both shaped thousands of samples
        assert drafts >= N, (name, drafts)
        assert 0.01 < rate < 0.6, (name, rate)


# ---------------------------------------------------------------- broken acceptance rules

def _broken_rule(accept: str, on_reject: str, bonus_row: int = 0, vocab: int = 16):
    """`_accept_sampled` with the acceptance test and the draw after a rejection chosen:
    accept "ratio": u < p(d) / q(d), the correct test; "all": always; "p": u < p(d), q ignored;
    "uniform_q": u < p(d) * vocab, as if a point mass were uniform. on_reject "residual":
    max(0, p - q), the correct draw; "p": p itself. bonus_row: after k acceptances the bonus
    token is drawn from row k + bonus_row (0: p_k, the correct row; -1: an off-by-one).

    A correction draw that comes out equal to the rejected proposal counts as accepting it (the
    scheduler counts a proposal as accepted when the token at its position equals it; with the
    correct rule the residual gives d no mass, so this never happens)."""

    def rule(g, probs, gen):
        tokens = []
        for j, d in enumerate(g.drafts):
            p = probs[g.first + j]
            q_d = float(g.q[j, d]) if g.q is not None else 1.0
            u = float(torch.rand((), generator=gen, device=p.device))
            if {"ratio": u * q_d < float(p[d]), "all": True, "p": u < float(p[d]),
                    "uniform_q": u < float(p[d]) * vocab}[accept]:
                tokens.append(d)
                continue
            if on_reject == "p":
                residual = p
            elif g.q is not None:
                residual = (p - g.q[j]).clamp_min(0)
            else:
                residual = p.clone()
                residual[d] = 0
            t = draw(residual if float(residual.sum()) > 0 else p, gen)
            tokens.append(t)
            if t == d:
                continue
            return tokens
        tokens.append(draw(probs[g.first + len(g.drafts) + bonus_row], gen))
        return tokens

    return rule


BROKEN = {
    "accept_all": ("all", "residual"),
    "accept_with_p_ignoring_q": ("p", "residual"),
    "point_mass_as_uniform_q": ("uniform_q", "residual"),
    "redraw_from_p_after_rejection": ("ratio", "p"),
    "bonus_from_previous_row": ("ratio", "residual", -1),
}


@pytest.mark.parametrize("name,rule", [
    ("draft_k3", "accept_all"),
    ("draft_k1", "accept_with_p_ignoring_q"),
    ("draft_k3", "redraw_from_p_after_rejection"),
    ("draft_k1", "bonus_from_previous_row"),  # K = 1: token 3 is the bonus after an acceptance
    ("ngram_k3", "accept_all"),
    ("ngram_k3", "point_mass_as_uniform_q"),
    ("ngram_k3", "redraw_from_p_after_rejection"),
])
def test_broken_rule_fails_the_test(name, rule, engines, exact, monkeypatch):
    """The same test on a quarter of the samples rejects each broken rule by a wide margin."""
    monkeypatch.setattr(verify_mod, "_accept_sampled", _broken_rule(*BROKEN[rule]))
    stat, df, p, _, _ = run_case(name, engines, exact, N_BROKEN)
    assert p < BROKEN_P, f"{name} with {rule}: chi2={stat:.1f} on {df} df, p={p:.3g}: the test misses a broken rule"


def test_reference_rule_matches_ridgelines():
    """The broken rules' template with the correct settings is ridgeline's rule, draw for draw (so
    the broken variants differ from it only where they say)."""
    from ridgeline.spec_decode.verify import SpecRows

    g = torch.Generator().manual_seed(0)
    probs = {i: torch.rand(16, generator=g).softmax(0) for i in range(4)}
    q = torch.rand(3, 16, generator=g).softmax(-1)
    correct = _broken_rule("ratio", "residual")
    for drafts in ([3, 7, 1], [0, 15, 2], [5, 5, 5]):
        for qq in (q, None):
            for seed in range(50):
                group = SpecRows(0, drafts, qq)
                a = verify_mod._accept_sampled(group, probs, torch.Generator().manual_seed(seed))
                b = correct(group, probs, torch.Generator().manual_seed(seed))
                assert a == b, (drafts, qq is None, seed)


def test_correction_equal_to_the_rejected_proposal_does_not_stall(checkpoints, monkeypatch):
    """verify() returns "accepted proposals, then the token after them", and the scheduler counts
    the accepted proposals from that length, not by comparing tokens: a correction token equal to
    the proposal it replaces (reachable only through verify's `residual = p` fallback) once made
    num_computed_tokens pass the new token, and the sequence was never scheduled again. A rule
    that always rejects and corrects to d must still finish."""
    _, target_dir, _ = checkpoints
    llm = LLM(str(target_dir), dtype="float32", kv_cache_memory="8MiB", speculative="ngram",
              num_speculative_tokens=1, speculative_adaptive=False, prompt_lookup_min=1)
    monkeypatch.setattr(verify_mod, "_accept_sampled", lambda g, probs, gen: [g.drafts[0]])
    engine = llm.engine
    rid = engine.add_request({"prompt_token_ids": PROMPT},
                             SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, seed=0))
    finished = False
    for _ in range(20):  # 4 tokens take at most 1 + 3 steps
        if any(o.finished for o in engine.step()):
            finished = True
            break
    if not finished:
        engine.abort_request(rid)
    assert finished, "the request stalled: it is running but never scheduled"
