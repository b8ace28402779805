"""Sampling semantics: seeds, n, stop strings / ids, max_tokens, logprobs, prompt logprobs."""

from __future__ import annotations

import math

import pytest

from ridgeline import SamplingParams

PROMPT = "Write a list of five fruits:"


def texts(outs):
    return [c.text for o in outs for c in o.outputs]


def test_seeded_sampling_is_reproducible_regardless_of_batch(llm_fp32):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24)
    alone = llm_fp32.generate([PROMPT], p, use_tqdm=False)[0].outputs[0].token_ids
    again = llm_fp32.generate([PROMPT], p, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=30, seed=7)] * 3
    batch = llm_fp32.generate(["Hi", PROMPT, "Once upon a time", "2+2="], [others[0], p, others[1], others[2]],
                              use_tqdm=False)
    assert alone == again == batch[1].outputs[0].token_ids
    other_seed = llm_fp32.generate([PROMPT], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=24),
                                   use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_samples(llm_fp32):
    p = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=16)
    out = llm_fp32.generate([PROMPT], p, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1, "samples should differ"
    again = llm_fp32.generate([PROMPT], p, use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in again.outputs]


def test_restrictive_filters_equal_greedy(llm_fp32):
    greedy = llm_fp32.generate([PROMPT], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    for p in (SamplingParams(temperature=0.7, top_k=1, max_tokens=16, seed=1),
              SamplingParams(temperature=0.7, top_p=1e-6, max_tokens=16, seed=2),
              SamplingParams(temperature=0.7, min_p=1.0, max_tokens=16, seed=3)):
        assert texts(llm_fp32.generate([PROMPT], p, use_tqdm=False)) == texts(greedy)


def test_max_tokens_and_length_finish(llm_fp32):
    out = llm_fp32.generate([PROMPT], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"


def test_stop_string_is_cut_and_not_leaked(llm_fp32):
    base = llm_fp32.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].text
    stop = base[12:15]
    assert stop.strip(), base
    cut = base[:base.find(stop)]
    out = llm_fp32.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, stop=[stop, "@@never@@"]),
                            use_tqdm=False)[0].outputs[0]
    assert out.text == cut and stop not in out.text
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm_fp32.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, stop=stop,
                                                      include_stop_str_in_output=True),
                             use_tqdm=False)[0].outputs[0]
    assert kept.text == cut + stop


def test_streamed_text_never_shows_stop_string(llm_fp32):
    base = llm_fp32.generate([PROMPT], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].text
    stop = base[12:15]
    pieces = list(llm_fp32.stream(PROMPT, SamplingParams(temperature=0, max_tokens=40, stop=stop)))
    assert "".join(pieces) == base[:base.find(stop)]


def test_stop_token_ids(llm_fp32):
    base = llm_fp32.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0].token_ids
    stop_id = base[5]
    out = llm_fp32.generate([PROMPT], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id]),
                            use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base[:base.index(stop_id) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_logprobs_shape_and_consistency(llm_fp32):
    out = llm_fp32.generate([PROMPT], SamplingParams(temperature=0.8, seed=3, max_tokens=10, logprobs=3),
                            use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    total = 0.0
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and 3 <= len(entry) <= 4
        ranked = sorted((lp.rank, lp.logprob) for t, lp in entry.items() if t != tok or lp.rank <= 3)
        assert [lp for _, lp in ranked] == sorted([lp for _, lp in ranked], reverse=True)
        assert all(lp.logprob <= 0 for lp in entry.values())
        total += entry[tok].logprob
    assert math.isclose(out.cumulative_logprob, total, rel_tol=1e-6)


def test_prompt_logprobs_agree_with_generation(llm_fp32):
    tok = llm_fp32.get_tokenizer()
    first = llm_fp32.generate([PROMPT], SamplingParams(temperature=0, max_tokens=1, logprobs=0),
                              use_tqdm=False)[0].outputs[0]
    ids = tok.encode(PROMPT) + first.token_ids
    out = llm_fp32.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=2),
                            use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    last = out.prompt_logprobs[-1][ids[-1]]
    assert abs(last.logprob - first.logprobs[0][ids[-1]].logprob) < 1e-4 and last.rank == 1
    for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert ids[pos] in entry and len(entry) <= 3


def test_utf8_never_broken(llm_fp32):
    prompt = "日本語で自己紹介をしてください。私は"
    p = SamplingParams(temperature=0.9, seed=11, max_tokens=40, ignore_eos=True)
    pieces = list(llm_fp32.stream(prompt, p))
    full = llm_fp32.generate([prompt], p, use_tqdm=False)[0].outputs[0]
    assert "".join(pieces) == full.text
    assert "\ufffd" not in full.text
    # A sequence cut by max_tokens may end inside a character: that partial tail is withheld.
    reference = llm_fp32.get_tokenizer().decode(full.token_ids, skip_special_tokens=True)
    assert full.text == reference.rstrip("\ufffd") and "\ufffd" not in reference.rstrip("\ufffd")


def test_penalties_change_output(llm_fp32):
    prompt = "Repeat after me: the the the the the"
    plain = llm_fp32.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0].token_ids
    for p in (SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.8),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, frequency_penalty=2.0),
              SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, presence_penalty=2.0)):
        out = llm_fp32.generate([prompt], p, use_tqdm=False)[0].outputs[0].token_ids
        assert out != plain
        assert max(out.count(t) for t in set(out)) <= max(plain.count(t) for t in set(plain))
