"""Batch invariance, chunked prefill and preemption: outputs identical to an unconstrained run.

Exact equality is checked on dequantized float32 weights (quantization="none"): with block-quantized
weights the activations are rounded to 8 bits, so a float-summation-order change elsewhere (another
chunking of the same prompt) can flip a rounding; test_quantized_engine.py checks that path."""

from __future__ import annotations

import pytest

from ridgeline import LLM, SamplingParams

from .prompts import MIXED_PROMPTS

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(llm_fp32):
    """Each prompt generated alone."""
    return [llm_fp32.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in MIXED_PROMPTS]


def test_batch_invariance(llm_fp32, reference):
    batch = llm_fp32.generate(MIXED_PROMPTS, GREEDY, use_tqdm=False)
    assert len(MIXED_PROMPTS) == 16
    for prompt, alone, out in zip(MIXED_PROMPTS, reference, batch):
        assert out.outputs[0].token_ids == alone, prompt[:40]


def test_chunked_prefill_and_preemption_match(reference):
    # A 16-token budget forces every prompt through many prefill chunks mixed with decodes;
    # a pool of 20 blocks x 16 tokens cannot hold all 16 sequences, so some are preempted
    # and recomputed.
    llm = LLM(dtype="float32", quantization="none", max_model_len=320, num_kv_blocks=20, block_size=16,
              max_num_batched_tokens=16, max_num_seqs=16)
    outs = llm.generate(MIXED_PROMPTS, GREEDY, use_tqdm=False)
    engine = llm.engine
    assert engine.get_stats().num_preemptions > 0, "the tiny pool should have forced preemption"
    for prompt, alone, out in zip(MIXED_PROMPTS, reference, outs):
        assert out.outputs[0].token_ids == alone, prompt[:40]
    assert engine._blocks.allocator.num_used == 0
    assert not engine._scheduler.running and not engine._scheduler.waiting


def test_long_prompt_chunked_while_others_decode(llm_fp32):
    """A long prompt arriving with short ones: everyone finishes, outputs unchanged."""
    engine = llm_fp32.engine
    long_prompt = MIXED_PROMPTS[12] * 3
    alone = llm_fp32.generate([long_prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    old = engine._scheduler.config.max_num_batched_tokens
    engine._scheduler.config.max_num_batched_tokens = 64
    try:
        outs = llm_fp32.generate(MIXED_PROMPTS[:3] + [long_prompt], GREEDY, use_tqdm=False)
    finally:
        engine._scheduler.config.max_num_batched_tokens = old
    assert outs[3].outputs[0].token_ids == alone
