"""Automatic prefix caching, Hydragen and parallel-sampling forks: same outputs, shared blocks, no leaks.

Exact equality is checked on dequantized float32 weights (quantization="none"): with block-quantized
weights the activations are rounded to 8 bits, so a float-summation-order change elsewhere (another
chunking of the same prompt) can flip a rounding; test_quantized_engine.py checks that path."""

from __future__ import annotations

import pytest

from ridgeline import LLM, SamplingParams
from ridgeline.core.kv_blocks import BlockAllocator

from .prompts import LONG

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
SYSTEM = "You are a careful assistant. Answer briefly and precisely. " + LONG[:900]
QUESTIONS = ["What is the main idea?", "Name one tool.", "Who climbed first?", "Summarise in five words.",
             "What changed over time?", "Is it dangerous?"]
# Shared-prefix prompts interleaved with unrelated ones.
MIXED = [SYSTEM + "\nQ: " + q for q in QUESTIONS[:3]] + ["The quick brown fox", "def add(a, b):"] + \
        [SYSTEM + "\nQ: " + q for q in QUESTIONS[3:]] + [LONG[:400] + " Finally,"]


def assert_no_leak(llm: LLM) -> None:
    alloc = llm.engine._blocks.allocator
    assert all(c == 0 for c in alloc.ref_counts), "a block is still referenced"
    assert alloc.num_used == 0 and alloc.num_free == alloc.num_blocks and alloc.num_shared == 0
    assert len(alloc.free_blocks) + len(alloc.evictable) == alloc.num_blocks
    assert not llm.engine._scheduler.running and not llm.engine._scheduler.waiting
    assert not llm.engine._scheduler.pending_prefix


def token_ids(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


@pytest.fixture(scope="module")
def uncached():
    """Reference engine with prefix caching and Hydragen off."""
    llm = LLM(dtype="float32", quantization="none", max_model_len=1024, kv_cache_memory="256MiB", enable_prefix_caching=False,
              enable_hydragen=False)
    return llm, token_ids(llm.generate(MIXED, GREEDY, use_tqdm=False))


def test_prefix_caching_and_hydragen_give_identical_outputs(uncached):
    ref_llm, reference = uncached
    assert ref_llm.engine.get_stats().prefix_cache_hits == 0 and ref_llm.engine.get_stats().hydragen_steps == 0
    # the PyTorch-attention break-even, low enough for these ~300-token shared prompts to engage Hydragen
    llm = LLM(dtype="float32", quantization="none", max_model_len=1024, kv_cache_memory="256MiB", hydragen_min_saved_tokens=512)
    first = llm.generate(MIXED, GREEDY, use_tqdm=False)
    stats = llm.engine.get_stats()
    assert stats.hydragen_steps > 0, "the six system-prompt requests should decode with a shared prefix"
    prefix_blocks = len(llm.get_tokenizer().encode(SYSTEM)) // 16
    # the five later system-prompt requests waited for the first to compute the shared blocks
    assert stats.prefix_cache_hits >= 5 * prefix_blocks * 16
    assert token_ids(first) == reference
    hits_before = stats.prefix_cache_hits
    second = llm.generate(MIXED, GREEDY, use_tqdm=False)  # everything is cached now
    assert token_ids(second) == reference
    tok = llm.get_tokenizer()
    assert llm.engine.get_stats().prefix_cache_hits - hits_before == sum((len(tok.encode(p)) - 1) // 16 * 16 for p in MIXED)
    assert_no_leak(llm)


def test_eviction_under_memory_pressure_keeps_outputs(uncached):
    _, reference = uncached
    # 32 blocks of 16 tokens: about two of these prompts with their outputs at once.
    llm = LLM(dtype="float32", quantization="none", max_model_len=512, num_kv_blocks=32, max_num_seqs=4)
    for _ in range(2):
        assert token_ids(llm.generate(MIXED, GREEDY, use_tqdm=False)) == reference
    alloc = llm.engine._blocks.allocator
    assert alloc.num_evictions > 0, "the small pool should have evicted cached blocks"
    assert llm.engine.get_stats().prefix_cache_hits > 0
    assert_no_leak(llm)

    # Aborting mid-flight (some requests running, some forked, some waiting) frees everything too.
    engine = llm.engine
    ids = [engine.add_request(p, SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=30)) for p in MIXED]
    for _ in range(6):
        engine.step()
    assert alloc.num_used > 0
    for rid in ids:
        engine.abort_request(rid)
    assert_no_leak(llm)


def test_n16_forks_share_the_prompt_blocks():
    llm = LLM(dtype="float32", quantization="none", max_model_len=2048, kv_cache_memory="256MiB")
    engine = llm.engine
    tok = llm.get_tokenizer()
    tail = tok.encode(" Now write something completely different, a list of your own favourite things:")
    prompt = tok.encode(LONG * 3)[:1000 - len(tail)] + tail
    params = SamplingParams(n=16, temperature=1.2, seed=42, max_tokens=6, ignore_eos=True)
    rid = engine.add_request({"prompt_token_ids": prompt}, params)
    req = engine._requests[rid]
    while req.seqs[0].num_computed_tokens < len(prompt):
        engine.step()
    alloc = engine._blocks.allocator
    full, partial = divmod(len(prompt), 16)
    assert partial, "the prompt should end in a partly filled block"
    # 62 full blocks held once (by all 16 samples) + one private copy of the last block per sample,
    # where computing the prompt per sample would hold 16 x 63.
    assert alloc.num_used == full + 16
    assert all(alloc.ref_counts[b] == 16 for b in req.seqs[0].block_table[:full])
    assert alloc.num_shared == full
    assert engine.get_stats().prompt_tokens == len(prompt)
    assert all(len(s.output_token_ids) == 1 for s in req.seqs)
    done = None
    while done is None:
        done = next((o for o in engine.step() if o.request_id == rid and o.finished), None)
    assert len({tuple(c.token_ids) for c in done.outputs}) > 1, "samples should differ"
    assert_no_leak(llm)
    # Seeded forks are reproducible.
    again = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in done.outputs]


def test_hash_collision_never_matches():
    alloc = BlockAllocator(4)
    block = alloc.allocate()
    alloc.register(block, 12345, (1, 2, 3))
    assert alloc.lookup(12345, (1, 2, 3)) == block
    assert alloc.lookup(12345, (1, 2, 4)) is None  # same hash, other tokens
    alloc.release(block)
    assert alloc.num_free == 4 and block in alloc.evictable
    for _ in range(4):  # the cached block is evicted last, and then forgotten
        alloc.allocate()
    assert alloc.lookup(12345, (1, 2, 3)) is None and alloc.num_evictions == 1
