"""A KV pool far smaller than the load: `ridgeline serve` with 32 blocks (512 tokens, exactly one
full context) under 32 concurrent long requests. Every request must complete with the greedy
text of an offline run (sequences are preempted and recomputed, never corrupted or dropped),
and a request that can never fit is refused with a 400 at admission instead of waiting forever.

A recomputed sequence's KV comes from a prefill instead of decode steps, so float32 rounding
differs slightly; where two tokens are within NEAR_TIE nats the greedy choice may flip. So the
server's text must equal the offline one up to its first difference, and that difference must
be such a near tie (the offline model itself ranks the server's token within NEAR_TIE of its
own). Corrupted or misplaced KV blocks give a wrong token at a clear margin and fail.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from ridgeline import SamplingParams

from .prompts import MIXED_PROMPTS
from .test_server import Server, wait_for

POOL_BLOCKS = 32
KV_BYTES = POOL_BLOCKS * 16 * 46080  # 16 tokens x 30 layers x (K + V) x 3 heads x 64 dims x 4 bytes
NUM_REQUESTS = 32
MAX_TOKENS = 40
NEAR_TIE = 0.02  # nats; rounding differences between prefill and decode are ~1e-5


@pytest.fixture(scope="module")
def tiny_kv_server():
    srv = Server("--kv-cache-memory", str(KV_BYTES))
    yield srv
    assert srv.stop() == 0
    assert "Traceback" not in srv.log(), srv.log()[-3000:]


def test_tiny_kv_pool_under_32_concurrent_long_requests(tiny_kv_server, llm_fp32):
    srv = tiny_kv_server
    before = srv.metrics()
    assert before["ridgeline:kv_cache_blocks_total"] == POOL_BLOCKS
    # ~40-token prompts + 40 new tokens: 5 blocks each, so about 6 fit at once and 32 compete.
    prompts = [f"Note {i}. " + MIXED_PROMPTS[4][i * 7:i * 7 + 160] for i in range(NUM_REQUESTS - 1)]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2)
    refs = [r.outputs[0] for r in llm_fp32.generate(prompts, params, use_tqdm=False)]
    sampled_prompt = "Note 99. " + MIXED_PROMPTS[12][:160]
    sampled_ref = llm_fp32.generate(sampled_prompt, params, use_tqdm=False)[0].outputs[0]
    model = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
    client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=600)

    async def one(prompt: str, n: int = 1) -> list:
        r = await client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, n=n,
                                            logprobs=1, extra_body={"ignore_eos": True})
        return sorted(r.choices, key=lambda c: c.index)

    async def never_fits() -> list[tuple[int, str | None, float]]:
        """Sent while the pool is full: refused at once, not queued behind the others."""
        await asyncio.sleep(0.5)
        cases = [{"prompt": "word " * 400, "max_tokens": 200},  # fits the context alone, not with its output
                 {"prompt": "word " * 600, "max_tokens": 1},  # the prompt alone is longer than the pool
                 {"prompt": [7] * 512, "max_tokens": 1}]
        out = []
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            for body in cases:
                t0 = time.monotonic()
                r = await c.post("/v1/completions", json=body)
                out.append((r.status_code, r.json()["error"]["param"], time.monotonic() - t0))
        return out

    async def main():
        try:
            # The 6 samples of the last request (5 blocks each) cannot all hold KV at once either.
            return await asyncio.gather(asyncio.gather(*(one(p) for p in prompts)), one(sampled_prompt, n=6),
                                        never_fits())
        finally:
            await client.close()

    start = time.monotonic()
    results, sampled, refusals = asyncio.run(main())
    elapsed = time.monotonic() - start
    failures, exact = [], 0
    for prompt, ref, choices in [*zip(prompts, refs, results), (sampled_prompt, sampled_ref, sampled)]:
        assert len(choices) == (6 if prompt is sampled_prompt else 1)
        for c in choices:
            assert c.finish_reason == "length" and len(c.logprobs.tokens) == MAX_TOKENS
            problem = _divergence(c.logprobs.tokens, ref)
            exact += c.text == ref.text
            if problem:
                failures.append(f"{prompt[:30]!r}: {problem}")
    assert not failures, "\n".join(failures)
    assert exact >= NUM_REQUESTS // 2, exact  # near ties are the exception
    assert [(status, param) for status, param, _ in refusals] == [(400, "max_tokens"), (400, "prompt"),
                                                                   (400, "prompt")]
    assert all(seconds < elapsed / 2 for _, _, seconds in refusals), (refusals, elapsed)

    after = srv.metrics()
    assert after["ridgeline:num_preemptions_total"] > before["ridgeline:num_preemptions_total"]  # it was tight
    wait_for(lambda: srv.metrics()["ridgeline:kv_cache_blocks_used"] == 0, timeout=60, what="blocks freed")
    final = srv.metrics()
    assert final["ridgeline:num_requests_running"] == 0 and final["ridgeline:num_requests_waiting"] == 0
    assert final["ridgeline:request_aborted_total"] == before["ridgeline:request_aborted_total"]


def _divergence(tokens: list[str], ref) -> str | None:
    """None if the server's tokens equal the offline greedy ones up to a first difference that is
    a near tie; else where and how they differ."""
    for j, (tok, entry) in enumerate(zip(ref.token_ids, ref.logprobs)):
        want, got = entry[tok].decoded_token, tokens[j]
        if got == want:
            continue
        alt = [lp for lp in entry.values() if lp.decoded_token == got]
        gap = entry[tok].logprob - alt[0].logprob if alt else float("inf")
        if gap <= NEAR_TIE:
            return None
        return f"token {j}: server {got!r}, offline {want!r} (gap {gap:.4f} nats) after {''.join(tokens[:j])!r}"
    return None
