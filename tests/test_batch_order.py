"""Prefix-aware batch ordering (BatchLLM): groups, decode-share priority, same outputs as FCFS."""

from __future__ import annotations

from ridgeline import SamplingParams
from ridgeline.core.batch_order import BatchItem, prefix_aware_order

from .test_prefix_cache import GREEDY, MIXED, token_ids


def test_groups_are_contiguous_and_decode_heavy_first():
    a, b = [1] * 20, [2] * 20
    items = [BatchItem(a + [5], 4), BatchItem(b + [6], 50), BatchItem([9, 9, 9], 4), BatchItem(a + [7, 7], 4),
             BatchItem(b + [8], 50), BatchItem(a + [3], 4)]
    order = prefix_aware_order(items, min_shared_tokens=16)
    assert order[:2] == [1, 4]  # the b-group: 50 new tokens on 21-token prompts
    assert order[2] == 2  # the lone 3-token prompt: 4 / 7 decode share
    assert set(order[3:]) == {0, 3, 5}  # the a-group, contiguous
    assert order[3:][-1] == 3  # longest prompt in the group: the smallest decode share


def test_prefix_aware_generate_matches_fcfs(llm_fp32):
    shuffled = MIXED[::-1]
    fcfs = llm_fp32.generate(shuffled, GREEDY, use_tqdm=False, prefix_aware=False)
    ordered = llm_fp32.generate(shuffled, GREEDY, use_tqdm=False)
    assert token_ids(ordered) == token_ids(fcfs)
    assert [o.prompt for o in ordered] == shuffled  # outputs in input order, prompt text kept
    params = [SamplingParams(temperature=0, max_tokens=4 + i, ignore_eos=True) for i in range(len(shuffled))]
    outs = llm_fp32.generate(shuffled, params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [4 + i for i in range(len(shuffled))]
