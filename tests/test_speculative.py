"""Speculative decoding (issue 13): outputs and request behaviour as without it, and no KV leaks.

Acceptance 1 (lossless greedy): with n-gram prompt lookup and with a draft model, k = 1..8, greedy
outputs are token-identical to the non-speculative engine's, alone and in a batch of 16 mixed-length
prompts, with chunked prefill and with preemption forced by a tiny KV pool. Checked on the default
model (dequantized float32: exact, see test_scheduling.py) and on a tiny random Llama with a tiny
random draft of its vocabulary (one layer instead of two, sharing the target's first layer, so it
agrees with the target most of the time but not always).

Acceptance 3 (same behaviour): stop strings and stop token ids completed inside the accepted tokens
of one speculative step, max_tokens / max_model_len falling inside a step, logprobs of every emitted
token, n > 1 (greedy and seeded), min_tokens with EOS, abort in the middle of speculative steps.

And no KV block leaks after 200 mixed speculative requests with aborts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from ridgeline import LLM, SamplingParams
from ridgeline.loader import default_model_path
from ridgeline.tokenizer import load_tokenizer

from .prompts import LONG, MIXED_PROMPTS
from .tiny_models import COMMON, VOCAB, hf_greedy, randomize_, save_checkpoint, top2_margin

DEFAULT = dict(dtype="float32", quantization="none", max_model_len=1024, kv_cache_memory="128MiB")
TINY = dict(dtype="float32", quantization="none", max_model_len=512, kv_cache_memory="16MiB")
# always propose K, and from 1-gram matches too (the tiny models' outputs repeat short n-grams)
NOADAPT = dict(speculative_adaptive=False, prompt_lookup_min=1)
LOGPROB_TOL = 1e-4

CODE = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n"
CODE2 = ("class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
         "class Vector:\n    def __init__(self, x, y):\n")
# n-gram lookup finds matches in these (repeated code and text)
DEFAULT_ALONE = [CODE, LONG[:600], CODE2]
# 16 mixed lengths; two short ones swapped for code so that lookup has matches beside the long text
DEFAULT_BATCH = [CODE if i == 1 else CODE2 if i == 10 else p for i, p in enumerate(MIXED_PROMPTS)]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=kw.pop("ignore_eos", True), **kw)


def wrap(prompt):
    """A prompt for LLM.generate's batch form (a bare token list would read as one prompt)."""
    return {"prompt_token_ids": prompt} if isinstance(prompt, list) else prompt


def token_ids(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([wrap(p) for p in prompts], params, use_tqdm=False)]


def alone(llm: LLM, prompts, params) -> list[list[int]]:
    return [token_ids(llm, [p], params)[0] for p in prompts]


def spec_counts(llm: LLM) -> tuple[int, int, int]:
    s = llm.get_stats()
    return s.spec_decode_num_drafts, s.spec_decode_num_draft_tokens, s.spec_decode_num_accepted_tokens


def delta(after, before):
    return tuple(a - b for a, b in zip(after, before))


def run_traced(llm: LLM, prompt, params: SamplingParams):
    """Run one request alone by stepping the engine; returns its final RequestOutput and, per step
    that emitted tokens, how many sample 0 gained."""
    engine = llm.engine
    rid = engine.add_request(prompt, params)
    steps, final, seen = [], None, 0
    for _ in range(10_000):
        if final is not None:
            break
        for out in engine.step():
            if out.request_id != rid:
                continue
            n = len(out.outputs[0].token_ids)
            if n > seen:
                steps.append(n - seen)
                seen = n
            if out.finished:
                final = out
    assert final is not None, "the request did not finish"
    return final, steps


def inside_step_positions(steps: list[int]) -> list[int]:
    """Output positions emitted by a step that emitted more tokens after them (not a step's last)."""
    pos, first = [], 0
    for n in steps:
        pos += range(first, first + n - 1)
        first += n
    return pos


def record_proposals(llm: LLM) -> list[tuple[list[int], list[int]]]:
    """From now on, log each proposal the engine's proposer makes, with the context it extends."""
    runner = llm.engine.runner
    original = runner._propose
    log = []

    def propose(out, result):
        original(out, result)
        for item in out.seqs:
            seq = item.seq
            if seq.seq_id in result.spec_token_ids and seq.params.greedy:
                log.append((seq.token_ids + result.sampled[seq.seq_id], list(result.spec_token_ids[seq.seq_id])))

    runner._propose = propose
    return log


def assert_draft_proposals(draft_model, log, limit: int = 250) -> None:
    """Greedy proposals are the draft model's own greedy continuation of their context (transformers,
    full recompute): the draft's paged KV was right at every position it attended to."""
    assert log
    for context, proposal in log[::max(1, len(log) // limit)]:
        tokens, lps = hf_greedy(draft_model, context, len(proposal))
        for j, (got, want) in enumerate(zip(proposal, tokens)):
            if got != want:
                gap = float(lps[j].max() - lps[j][got])
                assert gap < 1e-4, f"proposal {proposal} for context of {len(context)}: draft's greedy is {tokens}"
                break


def assert_clean(llm: LLM) -> None:
    """Nothing left: no blocks referenced, no sequences, no per-sequence state in the runner."""
    engine = llm.engine
    engine.step()  # hands the last finished ids to the runner
    alloc, sched = engine._blocks.allocator, engine._scheduler
    assert alloc.num_used == 0
    assert all(rc == 0 for rc in alloc.ref_counts)
    assert len(alloc.free_blocks) + len(alloc.evictable) == alloc.num_blocks
    assert set(alloc.free_blocks) | set(alloc.evictable) == set(range(alloc.num_blocks))
    assert not sched.running and not sched.waiting and not sched.pending_prefix
    assert not engine._requests and not engine.outputs.requests
    runner = engine.runner
    assert not runner._generators and not runner._draft_q
    proposer = runner.proposer
    assert not getattr(proposer, "_indexes", {}) and not getattr(proposer, "_generators", {})


# ---------------------------------------------------------------- models


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_path())


# The tiny target's greedy choices are confined to these tokens (its other lm_head rows are scaled
# down): its outputs repeat themselves, so n-gram lookup finds matches. EOS (2) is among them.
def _keep_ids() -> list[int]:
    g = torch.Generator().manual_seed(5)
    ids = [t for t in torch.randperm(VOCAB, generator=g)[:40].tolist() if t != 2][:31]
    return sorted(ids + [2])


def _tiny_llama(seed: int, layers: int, std: float = 0.3):
    import transformers
    from transformers import AutoModelForCausalLM

    cfg = transformers.LlamaConfig(**{**COMMON, "num_hidden_layers": layers, "tie_word_embeddings": False,
                                      "bos_token_id": 1, "eos_token_id": 2})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize_(model, seed, std)
    return model.eval()


def _confine_(model, keep: list[int]) -> None:
    """Scale down the lm_head rows of all tokens but `keep`: greedy outputs repeat themselves."""
    scale = torch.full((VOCAB, 1), 0.2)
    scale[keep] = 1.0
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)


def _first_layers_draft(target, layers: int = 1):
    """A smaller model: the target's first `layers` layers, embeddings, final norm and head."""
    from transformers import AutoModelForCausalLM

    cfg = target.config.__class__(**{**target.config.to_dict(), "num_hidden_layers": layers})
    draft = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    sd = target.state_dict()
    draft.load_state_dict({k: sd[k] for k in draft.state_dict()})
    return draft


@dataclass
class Tiny:
    target_path: str
    draft_path: str
    target: object  # the transformers models
    draft: object
    prompts: list[list[int]]  # 16 mixed lengths
    keep: list[int]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer) -> Tiny:
    keep = _keep_ids()
    target = _tiny_llama(0, layers=2)
    with torch.no_grad():
        for name, p in target.model.layers[1].named_parameters():  # a weaker second layer
            if not name.endswith("norm.weight"):
                p.mul_(0.5)
    _confine_(target, keep)
    # the draft: one layer (the target's first), hidden 64; the same embeddings, norm and head
    draft = _first_layers_draft(target)
    root = tmp_path_factory.mktemp("spec_tiny")
    tp = save_checkpoint(target, root / "target", tokenizer)
    dp = save_checkpoint(draft, root / "draft", tokenizer)

    g = torch.Generator().manual_seed(1)
    lens = (3, 5, 8, 12, 17, 21, 26, 31, 40, 47, 55, 64, 80, 96, 110, 130)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lens]
    prompts[7] = prompts[7][:8] * 4  # a repeated 8-gram
    prompts[13] = prompts[12][:64] + prompts[13][:16]  # a shared 64-token prefix (prefix cache hits)
    return Tiny(str(tp), str(dp), target, draft, prompts, keep)


TINY_TOKENS = 40


@pytest.fixture(scope="module")
def tiny_ref(tiny) -> LLM:
    return LLM(tiny.target_path, **TINY)


@pytest.fixture(scope="module")
def tiny_reference(tiny, tiny_ref) -> list[list[int]]:
    """Each tiny prompt alone without speculation; checked against transformers and for near ties, so
    an exactness failure below is not a tie broken the other way."""
    refs = alone(tiny_ref, tiny.prompts, greedy(TINY_TOKENS))
    for ids, ref in zip(tiny.prompts, refs):
        hf_tokens, hf_lps = hf_greedy(tiny.target, ids, TINY_TOKENS)
        assert ref == hf_tokens
        assert top2_margin(hf_lps) > 1e-3, "near tie in the tiny target's greedy outputs: pick other seeds"
        assert len(set(ref)) >= 8, "degenerate tiny outputs"
    return refs


def tiny_spec(tiny: Tiny, method: str, k: int, **kw) -> LLM:
    spec = "ngram" if method == "ngram" else tiny.draft_path
    return LLM(tiny.target_path, **{**TINY, **kw}, speculative=spec, num_speculative_tokens=k, **NOADAPT)


@pytest.fixture(scope="module")
def default_ref(llm_fp32) -> LLM:
    return llm_fp32


@pytest.fixture(scope="module")
def default_ngram4() -> LLM:
    return LLM(**DEFAULT, speculative="ngram", num_speculative_tokens=4, **NOADAPT)


# ---------------------------------------------------------------- acceptance 1: lossless greedy


@pytest.fixture(scope="module")
def default_alone_ref(default_ref) -> list[list[int]]:
    return alone(default_ref, DEFAULT_ALONE, greedy(24))


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_default_ngram_alone_lossless(k, default_alone_ref, default_ngram4):
    params = greedy(24)
    ref = default_alone_ref
    llm = default_ngram4 if k == 4 else LLM(**DEFAULT, speculative="ngram", num_speculative_tokens=k, **NOADAPT)
    before = spec_counts(llm)
    got = alone(llm, DEFAULT_ALONE, params)
    drafts, proposed, accepted = delta(spec_counts(llm), before)
    for prompt, r, o in zip(DEFAULT_ALONE, ref, got):
        assert o == r, prompt[:40]
    assert proposed > 0 and accepted > 0, (drafts, proposed, accepted)
    assert accepted < proposed  # rejections happened too
    assert proposed <= k * drafts


def test_default_ngram_batch_chunked_preempted_lossless(default_ref):
    """16 mixed prompts in one batch: 24-token steps (chunked prefill, speculative rows cut to the
    budget) over a 20-block pool that cannot hold them all (preemption, recomputation). The reference
    is the batch without speculation and without limits (equal to each prompt alone:
    test_scheduling.py)."""
    params = greedy(20)
    ref = token_ids(default_ref, DEFAULT_BATCH, params)
    llm = LLM(**{**DEFAULT, "max_model_len": 320}, num_kv_blocks=20, block_size=16, max_num_batched_tokens=24,
              max_num_seqs=16, speculative="ngram", num_speculative_tokens=4, **NOADAPT)
    got = token_ids(llm, DEFAULT_BATCH, params)
    stats = llm.get_stats()
    assert stats.num_preemptions > 0, "the tiny pool should have forced preemption"
    assert stats.spec_decode_num_draft_tokens > 0 and stats.spec_decode_num_accepted_tokens > 0
    for prompt, r, o in zip(DEFAULT_BATCH, ref, got):
        assert o == r, prompt[:40]
    assert_clean(llm)


def test_default_with_tiny_draft_lossless(default_ref, tokenizer, tmp_path):
    """The default model verifying a tiny random draft's proposals (nearly all rejected)."""
    draft = _tiny_llama(3, layers=1)
    path = save_checkpoint(draft, tmp_path / "draft", tokenizer)
    params = greedy(16)
    ref = alone(default_ref, DEFAULT_ALONE[:2], params)
    llm = LLM(**DEFAULT, speculative=str(path), num_speculative_tokens=3, **NOADAPT)
    assert alone(llm, DEFAULT_ALONE[:2], params) == ref
    assert token_ids(llm, DEFAULT_ALONE[:2], params) == ref
    assert llm.get_stats().spec_decode_num_draft_tokens > 0


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("k", list(range(1, 9)))
def test_tiny_alone_lossless(method, k, tiny, tiny_reference):
    llm = tiny_spec(tiny, method, k)
    idx = [0, 5, 7, 12, 15]
    got = alone(llm, [tiny.prompts[i] for i in idx], greedy(TINY_TOKENS))
    for i, o in zip(idx, got):
        assert o == tiny_reference[i], f"prompt {i}"
    drafts, proposed, accepted = spec_counts(llm)
    assert proposed > 0 and 0 < accepted < proposed, (drafts, proposed, accepted)


@pytest.mark.parametrize("method", ["ngram", "draft"])
@pytest.mark.parametrize("k,block_size", [(k, (16, 8, 4)[k % 3]) for k in range(1, 9)])
def test_tiny_batch_chunked_preempted_lossless(method, k, block_size, tiny, tiny_reference):
    """All 16 tiny prompts at once, 24-token steps, a pool of 208 token slots (the batch needs ~1400)."""
    llm = tiny_spec(tiny, method, k, num_kv_blocks=208 // block_size, block_size=block_size,
                    max_num_batched_tokens=24, max_num_seqs=16, max_model_len=200)
    log = record_proposals(llm)
    got = token_ids(llm, tiny.prompts, greedy(TINY_TOKENS))
    stats = llm.get_stats()
    assert stats.num_preemptions > 0, "the tiny pool should have forced preemption"
    assert stats.spec_decode_num_draft_tokens > 0 and stats.spec_decode_num_accepted_tokens > 0
    for i, (r, o) in enumerate(zip(tiny_reference, got)):
        assert o == r, f"prompt {i}"
    if method == "draft":
        assert_draft_proposals(tiny.draft, log, limit=60)
    assert_clean(llm)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_tiny_batch_ample_budget_lossless(method, tiny, tiny_reference):
    """The batch with room for every sequence's proposals each step (no budget cuts), prefix caching on."""
    llm = tiny_spec(tiny, method, 6, max_num_batched_tokens=2048)
    got = token_ids(llm, tiny.prompts, greedy(TINY_TOKENS))
    assert got == tiny_reference
    assert llm.get_stats().prefix_cache_hits > 0
    assert llm.get_stats().spec_decode_num_accepted_tokens > 0
    assert_clean(llm)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_tiny_penalties_lossless(method, tiny, tiny_ref):
    """Greedy with repetition / frequency / presence penalties: each verification row is penalized
    over the tokens before it (the proposals ahead of it included)."""
    params = greedy(TINY_TOKENS, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2)
    prompts = [tiny.prompts[i] for i in (2, 7, 11)]
    ref = alone(tiny_ref, prompts, params)
    llm = tiny_spec(tiny, method, 4)
    assert alone(llm, prompts, params) == ref
    assert token_ids(llm, prompts, params) == ref
    assert llm.get_stats().spec_decode_num_draft_tokens > 0


def test_default_penalties_lossless(default_ref, default_ngram4):
    params = greedy(20, repetition_penalty=1.2, frequency_penalty=0.3)
    prompts = DEFAULT_ALONE[:2]
    ref = alone(default_ref, prompts, params)
    before = spec_counts(default_ngram4)
    assert alone(default_ngram4, prompts, params) == ref
    assert delta(spec_counts(default_ngram4), before)[1] > 0


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_tiny_up_to_max_model_len(method, tiny, tiny_ref):
    """No max_tokens: generation ends at max_model_len (= the model's context, 512), which falls
    inside a speculative step; the draft's lookahead must stay within the context."""
    prompt = (tiny.prompts[15] * 4)[:470]
    params = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    ref = tiny_ref.generate([wrap(prompt)], params, use_tqdm=False)[0].outputs[0]
    llm = tiny_spec(tiny, method, 8)
    out = llm.generate([wrap(prompt)], params, use_tqdm=False)[0].outputs[0]
    assert len(ref.token_ids) == 512 - 470
    assert (out.token_ids, out.finish_reason) == (ref.token_ids, "length")
    assert llm.get_stats().spec_decode_num_draft_tokens > 0
    assert_clean(llm)


def test_tiny_draft_proposals_schedule_independent(tiny, tiny_reference):
    """With every proposal verified in full (no budget cuts, no preemption), a greedy draft's
    proposals depend only on each sequence's tokens, provided its KV is right: so the proposal and
    acceptance counts of the batch, with prefix-cache hits, equal those of the prompts run one by one
    without prefix caching. With preemption (recomputation drops pending proposals, so counts
    differ) each proposal is checked against the draft model run by transformers."""
    params = greedy(TINY_TOKENS)
    one_by_one = tiny_spec(tiny, "draft", 4, enable_prefix_caching=False)
    assert alone(one_by_one, tiny.prompts, params) == tiny_reference
    batch = tiny_spec(tiny, "draft", 4, max_num_batched_tokens=4096)
    assert token_ids(batch, tiny.prompts, params) == tiny_reference
    assert batch.get_stats().prefix_cache_hits > 0
    assert spec_counts(batch)[1:] == spec_counts(one_by_one)[1:]
    small = tiny_spec(tiny, "draft", 4, num_kv_blocks=13, block_size=16, max_model_len=200,
                      max_num_batched_tokens=4096)
    log = record_proposals(small)
    assert token_ids(small, tiny.prompts, params) == tiny_reference
    assert small.get_stats().num_preemptions > 0
    assert_draft_proposals(tiny.draft, log)


def test_tiny_hydragen_groups_with_speculation(tiny, tiny_ref):
    """Hydragen forced on (any shared prefix is grouped): decode rows of samples sharing their prompt
    are grouped while other sequences verify proposals in the same step."""
    prompts = [tiny.prompts[12], tiny.prompts[13], tiny.prompts[7]]
    params = [greedy(TINY_TOKENS, n=4), greedy(TINY_TOKENS, n=2), greedy(TINY_TOKENS)]
    ref = tiny_ref.generate([wrap(p) for p in prompts], params, use_tqdm=False)
    llm = tiny_spec(tiny, "ngram", 4, hydragen_min_saved_tokens=1, hydragen_min_saved_fraction=0.0)
    got = llm.generate([wrap(p) for p in prompts], params, use_tqdm=False)
    for r, o in zip(ref, got):
        assert [c.token_ids for c in o.outputs] == [c.token_ids for c in r.outputs]
    stats = llm.get_stats()
    assert stats.hydragen_steps > 0 and stats.spec_decode_num_accepted_tokens > 0
    assert_clean(llm)


@pytest.fixture(scope="module")
def tiny_mistral(tmp_path_factory, tokenizer, tiny):
    """A sliding-window (24) tiny Mistral and its one-layer draft."""
    from .tiny_models import build_model

    target = build_model("mistral", seed=2)
    _confine_(target, tiny.keep)
    draft = _first_layers_draft(target)
    root = tmp_path_factory.mktemp("spec_mistral")
    return (str(save_checkpoint(target, root / "target", tokenizer)),
            str(save_checkpoint(draft, root / "draft", tokenizer)), target)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_tiny_sliding_window_lossless(method, tiny, tiny_mistral):
    """Verification rows and draft steps past a 24-token window, 8-token blocks, chunked prefill."""
    target_path, draft_path, hf_model = tiny_mistral
    prompts = [tiny.prompts[i] for i in (1, 8, 14)]
    engine = dict(TINY, block_size=8, max_num_batched_tokens=32, max_num_seqs=8)
    ref = alone(LLM(target_path, **engine), prompts, greedy(TINY_TOKENS))
    for ids, r in zip(prompts, ref):
        hf_tokens, hf_lps = hf_greedy(hf_model, ids, TINY_TOKENS)
        assert r == hf_tokens and top2_margin(hf_lps) > 1e-3
    spec = "ngram" if method == "ngram" else draft_path
    llm = LLM(target_path, **engine, speculative=spec, num_speculative_tokens=5, **NOADAPT)
    assert alone(llm, prompts, greedy(TINY_TOKENS)) == ref
    assert token_ids(llm, prompts, greedy(TINY_TOKENS)) == ref
    assert llm.get_stats().spec_decode_num_accepted_tokens > 0


# ---------------------------------------------------------------- acceptance 3: same behaviour


@dataclass
class Setup:
    name: str
    spec: LLM
    ref: LLM
    prompt: str | list[int]  # one whose speculative steps accept several tokens


@pytest.fixture(scope="module", params=["default-ngram", "tiny-draft"])
def setup(request) -> Setup:
    if request.param == "default-ngram":
        return Setup("default-ngram", request.getfixturevalue("default_ngram4"),
                     request.getfixturevalue("default_ref"), LONG[:600])
    tiny = request.getfixturevalue("tiny")
    return Setup("tiny-draft", tiny_spec(tiny, "draft", 4), request.getfixturevalue("tiny_ref"), tiny.prompts[9])


def _pieces(llm: LLM, prompt, ids: list[int]) -> list[str]:
    """The text each output token added, as the output processor sees it (a stop-free run)."""
    from ridgeline.tokenizer import IncrementalDetokenizer

    engine = llm.engine
    prompt_ids = engine.inputs.prompt(prompt).token_ids
    detok = IncrementalDetokenizer(engine.tokenizer, prompt_ids, True)
    return [detok.step(t) for t in ids]


def _stop_candidates(setup: Setup, n_tokens: int, width: int):
    """(position j, stop string) pairs whose string first completes at output token j, with j inside
    a speculative step that emitted more tokens after it."""
    params = greedy(n_tokens)
    traced, steps = run_traced(setup.spec, setup.prompt, params)
    ref = setup.ref.generate([wrap(setup.prompt)], params, use_tqdm=False)[0].outputs[0]
    assert traced.outputs[0].token_ids == ref.token_ids
    pieces = _pieces(setup.ref, setup.prompt, ref.token_ids)
    text = ["".join(pieces[:j]) for j in range(len(pieces) + 1)]
    out = []
    for j in inside_step_positions(steps):
        if j + 1 < width:
            continue
        stop = text[j + 1][len(text[j + 1 - width]):]
        if stop.strip() and stop not in text[j] and stop in text[j + 1]:
            out.append((j, stop))
    return out


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("width", [1, 2])
def test_stop_string_inside_step(setup, include, width):
    """A stop string (of one or two tokens' text) completed by an accepted token in the middle of a
    speculative step: text, token_ids, logprobs and finish reason as without speculation."""
    cands = _stop_candidates(setup, 32, width)
    assert cands, "no stop string completes inside a speculative step: the test needs other prompts"
    for j, stop in cands[:3]:
        params = greedy(32, stop=[stop], include_stop_str_in_output=include, logprobs=2)
        ref = setup.ref.generate([wrap(setup.prompt)], params, use_tqdm=False)[0].outputs[0]
        assert len(ref.token_ids) == j + 1 and ref.finish_reason == "stop", (j, stop)
        gen_before = setup.spec.get_stats().generation_tokens
        out, _ = run_traced(setup.spec, setup.prompt, params)
        got = out.outputs[0]
        appended = setup.spec.get_stats().generation_tokens - gen_before
        assert appended > len(got.token_ids), "the stop was not inside a step: nothing was cut"
        assert got.token_ids == ref.token_ids, (j, stop)
        assert got.text == ref.text
        assert (got.finish_reason, got.stop_reason) == ("stop", stop)
        assert len(got.logprobs) == len(got.token_ids)
        assert abs(got.cumulative_logprob - ref.cumulative_logprob) < LOGPROB_TOL * len(got.token_ids)
        assert got.text.endswith(stop) == include


def test_stop_token_id_inside_step(setup):
    params = greedy(32)
    traced, steps = run_traced(setup.spec, setup.prompt, params)
    ids = traced.outputs[0].token_ids
    cands = [j for j in inside_step_positions(steps) if ids[j] not in ids[:j]]
    assert cands, "no first occurrence of a token inside a speculative step"
    for j in cands[:3]:
        p = greedy(32, stop_token_ids=[ids[j]])
        ref = setup.ref.generate([wrap(setup.prompt)], p, use_tqdm=False)[0].outputs[0]
        got, _ = run_traced(setup.spec, setup.prompt, p)
        got = got.outputs[0]
        assert got.token_ids == ref.token_ids == ids[:j + 1]
        assert (got.finish_reason, got.stop_reason, got.text) == ("stop", ids[j], ref.text)


def test_max_tokens_inside_step(setup):
    """max_tokens ending where an unconstrained speculative step would have emitted more."""
    n = 16
    traced, steps = run_traced(setup.spec, setup.prompt, greedy(n))
    full = traced.outputs[0].token_ids
    inside = [j + 1 for j in inside_step_positions(steps)]
    assert len(inside) >= 2, steps
    for m in sorted(set(inside[:6] + [1, 2, n])):
        ref = setup.ref.generate([wrap(setup.prompt)], greedy(m), use_tqdm=False)[0].outputs[0]
        got, _ = run_traced(setup.spec, setup.prompt, greedy(m))
        got = got.outputs[0]
        assert got.token_ids == ref.token_ids == full[:m], m
        assert got.text == ref.text
        assert got.finish_reason == "length"


def _assert_logprobs_match(got, ref, where=""):
    """Same tokens; per position the same entries (chosen token and top-N ids) with the same ranks,
    logprobs within LOGPROB_TOL."""
    assert got.token_ids == ref.token_ids, where
    assert len(got.logprobs) == len(ref.logprobs) == len(got.token_ids), where
    for pos, (g, r) in enumerate(zip(got.logprobs, ref.logprobs)):
        assert set(g) == set(r), (where, pos)
        for t in r:
            assert g[t].rank == r[t].rank, (where, pos, t)
            assert abs(g[t].logprob - r[t].logprob) < LOGPROB_TOL, (where, pos, t, g[t].logprob, r[t].logprob)
    assert abs(got.cumulative_logprob - ref.cumulative_logprob) < LOGPROB_TOL * max(1, len(got.token_ids)), where


def test_logprobs_every_token(setup):
    """logprobs=5 for every emitted token (the accepted proposals and the token after them), in
    float32 within 1e-4 of the non-speculative run with the same top-5 ids, alone and in a batch."""
    params = greedy(24, logprobs=5)
    other = DEFAULT_ALONE[0] if setup.name.startswith("default") else [5, 6, 7] * 6
    prompts = [setup.prompt, other]
    refs = [setup.ref.generate([wrap(p)], params, use_tqdm=False)[0].outputs[0] for p in prompts]
    before = spec_counts(setup.spec)
    alone_outs = [setup.spec.generate([wrap(p)], params, use_tqdm=False)[0].outputs[0] for p in prompts]
    batch_outs = [o.outputs[0] for o in setup.spec.generate([wrap(p) for p in prompts], params, use_tqdm=False)]
    assert delta(spec_counts(setup.spec), before)[2] > 0
    for i, (r, a, b) in enumerate(zip(refs, alone_outs, batch_outs)):
        _assert_logprobs_match(a, r, f"alone {i}")
        _assert_logprobs_match(b, r, f"batch {i}")


def test_logprobs_mixed_batch(setup):
    """A batch where one request asks for logprobs and another does not, both speculating."""
    with_lp, without = greedy(24, logprobs=3), greedy(24)
    other = CODE if setup.name.startswith("default") else setup.prompt[::-1]
    prompts = [setup.prompt, other]
    refs = [setup.ref.generate([wrap(p)], sp, use_tqdm=False)[0].outputs[0]
            for p, sp in zip(prompts, [with_lp, without])]
    outs = [o.outputs[0] for o in setup.spec.generate([wrap(p) for p in prompts], [with_lp, without],
                                                       use_tqdm=False)]
    _assert_logprobs_match(outs[0], refs[0])
    assert outs[1].token_ids == refs[1].token_ids and outs[1].logprobs is None


def test_prompt_logprobs(setup):
    params = greedy(12, prompt_logprobs=2)
    ref = setup.ref.generate([wrap(setup.prompt)], params, use_tqdm=False)[0]
    got = setup.spec.generate([wrap(setup.prompt)], params, use_tqdm=False)[0]
    assert got.outputs[0].token_ids == ref.outputs[0].token_ids
    assert len(got.prompt_logprobs) == len(ref.prompt_logprobs)
    for g, r in zip(got.prompt_logprobs[1:], ref.prompt_logprobs[1:]):
        assert set(g) == set(r)
        assert all(abs(g[t].logprob - r[t].logprob) < LOGPROB_TOL for t in r)


def test_n_greedy(setup):
    params = greedy(20, n=3)
    ref = setup.ref.generate([wrap(setup.prompt)], params, use_tqdm=False)[0]
    before = spec_counts(setup.spec)
    setup.spec.generate([wrap(setup.prompt)], greedy(20), use_tqdm=False)
    mid = spec_counts(setup.spec)
    got = setup.spec.generate([wrap(setup.prompt)], params, use_tqdm=False)[0]
    one, three = delta(mid, before)[0], delta(spec_counts(setup.spec), mid)[0]
    assert one > 0 and three > 2 * one, ("the forked samples should speculate too", one, three)
    single = setup.ref.generate([wrap(setup.prompt)], greedy(20), use_tqdm=False)[0].outputs[0].token_ids
    assert [o.index for o in got.outputs] == [0, 1, 2]
    assert [o.token_ids for o in got.outputs] == [o.token_ids for o in ref.outputs] == [single] * 3
    assert [o.text for o in got.outputs] == [o.text for o in ref.outputs]


def test_n_sampled_seeded(setup):
    """Sampled n > 1 with a seed completes with the right shapes; a seeded request gives the same
    samples run again, and inside a batch (its draws come from its own generators)."""
    params = SamplingParams(n=3, temperature=0.8, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True, logprobs=1)
    first = setup.spec.generate([wrap(setup.prompt)], params, use_tqdm=False)[0]
    assert first.finished and [o.index for o in first.outputs] == [0, 1, 2]
    for o in first.outputs:
        assert len(o.token_ids) == 16 and len(o.logprobs) == 16 and o.finish_reason == "length"
        assert all(o.logprobs[i][t].logprob <= 0 for i, t in enumerate(o.token_ids))
    again = setup.spec.generate([wrap(setup.prompt)], params, use_tqdm=False)[0]
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in first.outputs]
    other = CODE if setup.name.startswith("default") else setup.prompt[:20]
    batch = setup.spec.generate([wrap(other), wrap(setup.prompt)], [greedy(16, logprobs=1), params],
                               use_tqdm=False)[1]
    assert [o.token_ids for o in batch.outputs] == [o.token_ids for o in first.outputs]


@pytest.fixture(scope="module")
def tiny_eos(tmp_path_factory, tokenizer, tiny):
    """The tiny target with its EOS logit raised (a row of lm_head scaled by 1.6), so that greedy
    outputs stop early, and its one-layer draft; (reference LLM, speculative LLM, prompts stopping
    early)."""
    import copy

    target = copy.deepcopy(tiny.target)
    with torch.no_grad():
        target.lm_head.weight[2].mul_(1.6)
    root = tmp_path_factory.mktemp("spec_eos")
    tp = save_checkpoint(target, root / "target", tokenizer)
    dp = save_checkpoint(_first_layers_draft(target), root / "draft", tokenizer)
    ref = LLM(str(tp), **TINY)
    spec = LLM(str(tp), **TINY, speculative=str(dp), num_speculative_tokens=4, **NOADAPT)
    outs = alone(ref, tiny.prompts, greedy(40, ignore_eos=False))
    prompts = [p for p, o in zip(tiny.prompts, outs) if 2 < len(o) < 30]
    assert len(prompts) >= 4, [len(o) for o in outs]
    return ref, spec, prompts


def test_min_tokens_with_eos(setup, request):
    """EOS blocked until min_tokens (each verification row by its own output count, the draft's
    proposals too), then the request stops at EOS, as without speculation; including EOS at the
    first position min_tokens allows."""
    if setup.name.startswith("default"):
        ref_llm, spec_llm = setup.ref, setup.spec
        chat = spec_llm.render_chat([{"role": "user", "content": "What is 2+2? Answer with a number only."}])
        prompts, extra = [chat, "Q: What is 12 + 30?\nA:"], (2,)
    else:
        ref_llm, spec_llm, prompts = request.getfixturevalue("tiny_eos")
        extra = range(1, 9)
    eos = spec_llm.engine.eos_token_ids
    boundaries = 0
    for prompt in prompts:
        plain = ref_llm.generate([wrap(prompt)], greedy(40, ignore_eos=False), use_tqdm=False)[0].outputs[0]
        assert plain.finish_reason == "stop" and len(plain.token_ids) < 30, plain.text
        got = spec_llm.generate([wrap(prompt)], greedy(40, ignore_eos=False), use_tqdm=False)[0].outputs[0]
        assert (got.token_ids, got.finish_reason, got.text) == (plain.token_ids, "stop", plain.text)
        todo = [len(plain.token_ids) + e for e in extra]
        done = set()
        while todo:
            min_tokens = todo.pop()
            done.add(min_tokens)
            params = greedy(48, ignore_eos=False, min_tokens=min_tokens)
            ref = ref_llm.generate([wrap(prompt)], params, use_tqdm=False)[0].outputs[0]
            got = spec_llm.generate([wrap(prompt)], params, use_tqdm=False)[0].outputs[0]
            assert got.token_ids == ref.token_ids, min_tokens
            assert (got.finish_reason, got.text) == (ref.finish_reason, ref.text)
            assert len(got.token_ids) > min_tokens
            assert not any(t in eos for t in got.token_ids[:min_tokens])
            if ref.finish_reason == "stop" and len(ref.token_ids) - 1 not in done:
                todo.append(len(ref.token_ids) - 1)  # again, with EOS right at the first position allowed
            boundaries += ref.finish_reason == "stop" and len(ref.token_ids) == min_tokens + 1
    assert boundaries >= (1 if setup.name.startswith("default") else 3), boundaries
    assert spec_counts(spec_llm)[2] > 0


def test_abort_mid_speculation(setup):
    """Abort a request between speculative steps (proposals pending, draft probabilities held):
    the others finish as without speculation and nothing is left behind."""
    llm, engine = setup.spec, setup.spec.engine
    params = greedy(40)
    other = DEFAULT_ALONE[0] if setup.name.startswith("default") else [9, 8, 7, 6] * 5
    ref_other = setup.ref.generate([wrap(other)], params, use_tqdm=False)[0].outputs[0].token_ids
    victim = engine.add_request(setup.prompt, params)
    keeper = engine.add_request(other, params)
    seq = engine._requests[victim].seqs[0]
    before = spec_counts(llm)[0]
    aborted, finished = False, {}
    for _ in range(500):
        outs = engine.step()
        for o in outs:
            assert o.request_id != victim or not aborted
            if o.finished:
                finished[o.request_id] = o
        if not aborted:
            assert victim not in finished, "the victim finished before it could be aborted"
            if spec_counts(llm)[0] - before >= 4 and seq.spec_token_ids:
                assert engine.abort_request(victim)
                assert not engine.abort_request(victim)
                assert seq.finished and seq.finish_reason == "abort" and not seq.block_table
                aborted = True
        if not engine.has_unfinished_requests():
            break
    assert aborted
    assert set(finished) == {keeper}
    assert finished[keeper].outputs[0].token_ids == ref_other
    assert_clean(llm)


# ---------------------------------------------------------------- no leaks


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_no_block_leaks_200_requests_with_aborts(method, tiny, tokenizer):
    """200 mixed speculative requests (lengths, greedy and seeded, n = 2, stop strings) arriving
    over time into a small pool, every 7th aborted mid-flight and every 13th while it waits: at
    the end no block is referenced and no sequence state is left. The greedy ones that ran to
    the end match the engine without speculation."""
    llm = tiny_spec(tiny, method, 4, num_kv_blocks=48, block_size=8, max_num_seqs=12, max_num_batched_tokens=48,
                    max_model_len=256)
    engine = llm.engine
    rng = random.Random(0)
    stop_word = next(s for s in (tokenizer.decode([t]) for t in tiny.keep) if len(s.strip()) >= 2)
    requests = []
    for i in range(200):
        if i % 9 == 0:
            prompt = tiny.prompts[12][:rng.randint(17, 64)] + [rng.randrange(VOCAB) for _ in range(3)]  # shared prefix
        else:
            prompt = [rng.randrange(VOCAB) for _ in range(rng.choice([1, 2, 5, 9, 16, 17, 33, 60, 100]))]
        kind = i % 5
        kw = dict(max_tokens=rng.randint(1, 30), ignore_eos=rng.random() < 0.7)
        if kind in (1, 3):
            kw.update(temperature=rng.choice([0.7, 1.0]), seed=i, top_k=rng.choice([0, 20]))
        else:
            kw.update(temperature=0)
        if kind == 3 or i % 11 == 0:
            kw.update(n=2)
        if kind in (2, 4):
            kw.update(stop=[stop_word])
        requests.append((f"r{i}", prompt, SamplingParams(**kw)))

    submitted = seen = 0
    steps_seen: dict[str, int] = {}
    outputs, aborted = {}, set()
    while submitted < len(requests) or engine.has_unfinished_requests():
        for _ in range(3):
            if submitted < len(requests):
                rid, prompt, params = requests[submitted]
                engine.add_request(prompt, params, request_id=rid)
                submitted += 1
                if submitted % 13 == 0 and engine.abort_request(rid):  # aborted while waiting
                    aborted.add(rid)
        for out in engine.step():
            steps_seen[out.request_id] = steps_seen.get(out.request_id, 0) + 1
            if out.finished:
                outputs[out.request_id] = out
        for rid in list(engine.request_ids()):
            i = int(rid[1:])
            if i % 7 == 0 and steps_seen.get(rid, 0) >= 3 and rid not in aborted:
                assert engine.abort_request(rid)
                aborted.add(rid)
        seen += 1
        assert seen < 20000

    assert len(outputs) + len(aborted) == 200 and not set(outputs) & aborted
    assert len([r for r in aborted if int(r[1:]) % 7 == 0]) >= 10, "too few mid-flight aborts"
    for rid, out in outputs.items():
        params = requests[int(rid[1:])][2]
        assert len(out.outputs) == params.n
        for o in out.outputs:
            assert o.finish_reason in ("stop", "length") and 1 <= len(o.token_ids) <= params.max_tokens
    stats = llm.get_stats()
    assert stats.spec_decode_num_draft_tokens > 0 and stats.spec_decode_num_accepted_tokens > 0
    assert stats.num_preemptions > 0, "the small pool should have forced preemption"
    assert_clean(llm)

    # the greedy requests that finished: as without speculation (run here as one batch)
    done = [requests[int(rid[1:])] for rid in sorted(outputs) if requests[int(rid[1:])][2].greedy]
    ref = LLM(tiny.target_path, **{**TINY, "max_model_len": 256}).generate(
        [wrap(p) for _, p, _ in done], [sp for _, _, sp in done], use_tqdm=False)
    for (rid, _, _), r in zip(done, ref):
        assert [o.token_ids for o in outputs[rid].outputs] == [o.token_ids for o in r.outputs], rid
        assert [o.text for o in outputs[rid].outputs] == [o.text for o in r.outputs], rid
