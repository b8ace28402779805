"""The OpenAI-compatible server, run as a real `ridgeline serve` subprocess on 127.0.0.1.

Driven with the official `openai` package (and raw httpx where the wire format itself is
checked). Greedy outputs are compared with `LLM.generate` on the session's float32 model.
Three servers start: the main one (API key set), the same with n-gram speculative decoding
(`server` is parametrized: each test that takes it runs on both, except those pinned to
"plain"; greedy outputs must not change under speculation), and a tiny one (one sequence at
a time, a queue of one) for the full-queue and SIGTERM cases.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

from ridgeline import SamplingParams

from .prompts import MIXED_PROMPTS

API_KEY = "test-key-123"
# float32 with dequantized weights: the same numerics as the `llm_fp32` reference, whatever the
# engine's default quantization is.
ENGINE = ["--dtype", "float32", "--quantization", "none", "--max-model-len", "512", "--kv-cache-memory", "64MiB",
          "--log-level", "warning"]
PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Name three colors."}]


def _command() -> list[str]:
    script = Path(sys.executable).parent / "ridgeline"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ridgeline.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `ridgeline serve` subprocess; ready once /health answers 200. Its output goes to a file:
    a pipe nobody reads fills up (64 KiB of warnings) and blocks the server."""

    def __init__(self, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._final_log: str | None = None
        fd, self._log_path = tempfile.mkstemp(prefix="ridgeline-serve-", suffix=".log")
        os.close(fd)
        with open(self._log_path, "ab") as out:  # append mode: reading it never moves the writer
            self.proc = subprocess.Popen(_command() + ["serve", "--port", str(self.port), *ENGINE, *args],
                                         stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not become healthy in 180 s")
            time.sleep(0.2)

    def log(self) -> str:
        """Everything the server printed so far."""
        if self._final_log is not None:
            return self._final_log
        return Path(self._log_path).read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Unlabelled view of /metrics: series name -> value (labels dropped, last one wins)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.eE+-]+|NaN)$", line)
            if m:
                out[m.group(1)] = float(m.group(3))
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._final_log is None:
            self._final_log = self.log()
            Path(self._log_path).unlink(missing_ok=True)
        return self.proc.returncode


# The speculative server always proposes 4 tokens (not adaptive: every step is a speculative one,
# and no machine probe at start), looked up in the sequence's context.
SPECULATIVE = ["--speculative", "ngram", "--num-speculative-tokens", "4", "--prompt-lookup-min", "1",
               "--no-speculative-adaptive"]
SERVERS = {"plain": [], "ngram": SPECULATIVE}
plain_only = pytest.mark.parametrize("server", ["plain"], indirect=True)
ngram_only = pytest.mark.parametrize("server", ["ngram"], indirect=True)


@pytest.fixture(scope="module", params=list(SERVERS))
def server(request):
    srv = Server("--api-key", API_KEY, *SERVERS[request.param])
    srv.speculative = request.param != "plain"
    yield srv
    assert srv.stop() == 0, srv.log()[-2000:]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


def _offline(llm, prompt, **kw):
    return llm.generate(prompt, SamplingParams(temperature=0, **kw), use_tqdm=False)[0]


def _offline_chat(llm, messages, **kw):
    return llm.chat(messages, SamplingParams(temperature=0, **kw), use_tqdm=False)[0]


def wait_for(cond, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# ---------------------------------------------------------------------- basics


def test_models_health_and_metrics(server, client, model_id):
    assert model_id == "SmolLM2-135M-Instruct.Q4_1"
    card = client.models.retrieve(model_id)
    assert card.id == model_id and card.object == "model"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    m = server.metrics()
    for name in ("ridgeline:num_requests_running", "ridgeline:num_requests_waiting", "ridgeline:kv_cache_usage_perc",
                 "ridgeline:kv_cache_blocks_used", "ridgeline:prompt_tokens_total", "ridgeline:generation_tokens_total",
                 "ridgeline:num_preemptions_total", "ridgeline:time_to_first_token_seconds_count",
                 "ridgeline:time_per_output_token_seconds_count", "ridgeline:e2e_request_latency_seconds_count",
                 "ridgeline:prefix_cache_queries_total", "ridgeline:prefix_cache_hits_total",
                 "ridgeline:prefix_cache_hit_rate", "ridgeline:kv_cache_blocks_shared",
                 "ridgeline:spec_decode_num_drafts_total", "ridgeline:spec_decode_num_draft_tokens_total",
                 "ridgeline:spec_decode_num_accepted_tokens_total", "ridgeline:spec_decode_acceptance_rate",
                 "ridgeline:spec_decode_mean_accepted_length"):
        assert name in m, name
    assert m["ridgeline:kv_cache_blocks_total"] > 0
    if not server.speculative:
        assert m["ridgeline:spec_decode_num_draft_tokens_total"] == 0


@ngram_only
def test_spec_decode_metrics(server, client, model_id, llm_fp32):
    """After a few greedy completions of repetitive text, /metrics counts the drafts, and the
    outputs are the offline (non-speculative) greedy ones."""
    before = server.metrics()
    prompts = ["one two three four five one two three four five one two three",
               "The cat sat on the mat. The cat sat on the mat. The cat",
               "a b c a b c a b c a b"]
    refs = llm_fp32.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    for prompt, ref in zip(prompts, refs):
        r = client.completions.create(model=model_id, prompt=prompt, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == ref.outputs[0].text and r.usage.completion_tokens == 16
    m = server.metrics()
    drafts = m["ridgeline:spec_decode_num_drafts_total"] - before["ridgeline:spec_decode_num_drafts_total"]
    proposed = (m["ridgeline:spec_decode_num_draft_tokens_total"]
                - before["ridgeline:spec_decode_num_draft_tokens_total"])
    accepted = (m["ridgeline:spec_decode_num_accepted_tokens_total"]
                - before["ridgeline:spec_decode_num_accepted_tokens_total"])
    assert drafts > 0 and proposed > 0 and accepted > 0, m
    assert drafts <= proposed <= 4 * drafts and accepted <= proposed
    # the gauges are the totals' ratios since start
    total_proposed = m["ridgeline:spec_decode_num_draft_tokens_total"]
    total_accepted = m["ridgeline:spec_decode_num_accepted_tokens_total"]
    assert m["ridgeline:spec_decode_acceptance_rate"] == pytest.approx(total_accepted / total_proposed)
    assert m["ridgeline:spec_decode_mean_accepted_length"] == pytest.approx(
        1 + total_accepted / m["ridgeline:spec_decode_num_drafts_total"])
    # accepted proposals: a speculative row yields more than the one token a plain step does
    assert m["ridgeline:spec_decode_mean_accepted_length"] > 1


def test_completion_matches_offline_greedy(client, model_id, llm_fp32):
    ref = _offline(llm_fp32, PROMPT, max_tokens=12, ignore_eos=True)
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == model_id
    assert r.created > 1_600_000_000
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0 and c.finish_reason == "length" and c.logprobs is None
    assert c.text == ref.outputs[0].text and c.text.strip()
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_completion_stream_matches_and_reports_usage(client, model_id, llm_fp32):
    ref = _offline(llm_fp32, PROMPT, max_tokens=10, ignore_eos=True)
    chunks = list(client.completions.create(model=model_id, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert len(chunks) >= 3
    assert len({c.id for c in chunks}) == 1 and all(c.object == "text_completion" for c in chunks)
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == ref.outputs[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert all(c.usage is None for c in text_chunks)
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 10
    assert usage.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_stream_wire_format_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"prompt": PROMPT, "max_tokens": 4, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert set(first) >= {"id", "object", "created", "model", "choices", "system_fingerprint"}
    assert set(first["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}


def test_chat_matches_offline_greedy_stream_and_not(client, model_id, llm_fp32):
    ref = _offline_chat(llm_fp32, CHAT, max_tokens=16)
    r = client.chat.completions.create(model=model_id, messages=CHAT, max_completion_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == ref.outputs[0].text and msg.content.strip()
    assert r.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)

    chunks = list(client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == ref.outputs[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [ref.outputs[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_n_samples(client, model_id):
    r = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=8, n=2, temperature=1.0,
                                  seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 16
    again = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=8, n=2, temperature=1.0,
                                      seed=7, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in r.choices]  # seeded: reproducible

    chat = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=6, n=2, temperature=0)
    assert sorted(c.index for c in chat.choices) == [0, 1]
    chunks = list(client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=6, n=2, temperature=0,
                                                 stream=True))
    texts = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts[0] == chat.choices[0].message.content and texts[1] == chat.choices[1].message.content


def test_completion_logprobs(client, model_id, llm_fp32):
    ref = _offline(llm_fp32, PROMPT, max_tokens=6, ignore_eos=True, logprobs=2).outputs[0]
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    for tok, got, top, entry in zip(ref.token_ids, lp.token_logprobs, lp.top_logprobs, ref.logprobs):
        assert got == pytest.approx(entry[tok].logprob, abs=1e-3)
        assert 2 <= len(top) <= 3 and max(top.values()) == pytest.approx(max(v.logprob for v in entry.values()), abs=1e-3)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])

    # streamed logprobs cover the same tokens
    chunks = list(client.completions.create(model=model_id, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1,
                                            stream=True, extra_body={"ignore_eos": True}))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-3)


def test_chat_logprobs(client, model_id):
    r = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert bytes(t.bytes).decode("utf-8") == t.token
    plain = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


def test_stop_sequences(client, model_id, llm_fp32):
    full = _offline(llm_fp32, PROMPT, max_tokens=16, ignore_eos=True).outputs[0].text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    expected = full[:full.index(stop)]
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop, "@@@"],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=model_id, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_echo_and_token_prompts(client, model_id, llm_fp32):
    ref = _offline(llm_fp32, PROMPT, max_tokens=5, ignore_eos=True)
    r = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=5, temperature=0, echo=True,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == PROMPT + ref.outputs[0].text
    # echo + logprobs: one entry per prompt and completion token (the first prompt token's is null),
    # identical when the prompt's KV is already in the prefix cache.
    long_prompt = MIXED_PROMPTS[4][:300]
    runs = [client.completions.create(model=model_id, prompt=long_prompt, max_tokens=3, temperature=0, echo=True,
                                      logprobs=1, extra_body={"ignore_eos": True}) for _ in range(2)]
    for run in runs:
        lp = run.choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == run.usage.prompt_tokens + 3
        assert lp.token_logprobs[0] is None and all(v is not None for v in lp.token_logprobs[1:])
        assert "".join(lp.tokens) == run.choices[0].text and run.choices[0].text.startswith(long_prompt)
    assert runs[1].choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        runs[0].choices[0].logprobs.token_logprobs[1:], abs=1e-3)
    ids = list(ref.prompt_token_ids)
    r2 = client.completions.create(model=model_id, prompt=ids, max_tokens=5, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert r2.choices[0].text == ref.outputs[0].text and r2.usage.prompt_tokens == len(ids)
    multi = client.completions.create(model=model_id, prompt=[PROMPT, "Hello"], max_tokens=3, n=2, temperature=0)
    assert sorted(c.index for c in multi.choices) == [0, 1, 2, 3]
    assert multi.choices[0].text == multi.choices[1].text


# ---------------------------------------------------------------------- load


def test_64_concurrent_streams_match_offline(server, model_id, llm_fp32):
    prompts = [f"Note {i}. " + MIXED_PROMPTS[i % len(MIXED_PROMPTS)][:160] for i in range(64)]
    refs = llm_fp32.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)

    async def one(prompt: str) -> tuple[str, str | None, int]:
        stream = await aclient.completions.create(model=model_id, prompt=prompt, max_tokens=10, temperature=0,
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
        text, finish, n = "", None, 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                n = chunk.usage.completion_tokens
        return text, finish, n

    async def main():
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()

    results = asyncio.run(main())
    assert len(results) == 64
    for prompt, ref, (text, finish, n) in zip(prompts, refs, results):
        assert text == ref.outputs[0].text, prompt[:30]
        assert finish == "length" and n == 10
    wait_for(lambda: server.metrics()["ridgeline:num_requests_running"] == 0, what="running == 0")
    m = server.metrics()
    assert m["ridgeline:num_requests_running"] == 0
    assert m["ridgeline:num_requests_waiting"] == 0
    assert m["ridgeline:kv_cache_blocks_used"] == 0 and m["ridgeline:kv_cache_blocks_shared"] == 0
    assert m["ridgeline:kv_cache_usage_perc"] == 0
    assert m["ridgeline:generation_tokens_total"] >= 640


def test_client_disconnect_frees_blocks(server):
    before = server.metrics()
    assert before["ridgeline:kv_cache_blocks_used"] == 0
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"prompt": PROMPT, "max_tokens": 450, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", server.url + "/v1/completions", headers=headers, json=body) as r:
            lines = r.iter_lines()
            got = 0
            for line in lines:
                if line.startswith("data: {"):
                    got += 1
                    if got == 3:
                        break
            during = server.metrics()
            assert during["ridgeline:num_requests_running"] == 1
            assert during["ridgeline:kv_cache_blocks_used"] > 0
        # leaving the blocks closes the connection mid-stream
    wait_for(lambda: server.metrics()["ridgeline:kv_cache_blocks_used"] == 0, timeout=10, what="blocks freed")
    after = server.metrics()
    assert after["ridgeline:num_requests_running"] == 0
    assert after["ridgeline:request_aborted_total"] == before["ridgeline:request_aborted_total"] + 1
    # it was cut short: far fewer than 450 tokens were generated
    assert after["ridgeline:generation_tokens_total"] - before["ridgeline:generation_tokens_total"] < 400

    # A non-streaming request whose client gives up is aborted as well.
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", headers=headers, timeout=1.5,
                   json={"prompt": PROMPT, "max_tokens": 450, "ignore_eos": True})
    wait_for(lambda: server.metrics()["ridgeline:kv_cache_blocks_used"] == 0, timeout=10, what="blocks freed")
    last = server.metrics()
    assert last["ridgeline:num_requests_running"] == 0
    assert last["ridgeline:request_aborted_total"] == after["ridgeline:request_aborted_total"] + 1
    assert last["ridgeline:generation_tokens_total"] - after["ridgeline:generation_tokens_total"] < 400


# ---------------------------------------------------------------------- bad input

_LONG = "word " * 700
BAD_INPUTS = [
    # (name, path, body (dict, or raw str), headers override, status, param)
    ("invalid json", "/v1/completions", "{not json", None, 400, None),
    ("body not an object", "/v1/completions", "[1, 2]", None, 400, None),
    ("missing prompt", "/v1/completions", {"max_tokens": 4}, None, 400, "prompt"),
    ("max_tokens as string", "/v1/completions", {"prompt": "hi", "max_tokens": "4"}, None, 400, "max_tokens"),
    ("max_tokens zero", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, None, 400, "max_tokens"),
    ("temperature negative", "/v1/completions", {"prompt": "hi", "temperature": -1}, None, 400, "temperature"),
    ("top_p zero", "/v1/completions", {"prompt": "hi", "top_p": 0}, None, 400, "top_p"),
    ("n too large", "/v1/completions", {"prompt": "hi", "n": 1000}, None, 400, "n"),
    ("logprobs too large", "/v1/completions", {"prompt": "hi", "logprobs": 50}, None, 400, "logprobs"),
    ("stop wrong type", "/v1/completions", {"prompt": "hi", "stop": 5}, None, 400, "stop"),
    ("stream not bool", "/v1/completions", {"prompt": "hi", "stream": "yes"}, None, 400, "stream"),
    ("presence_penalty range", "/v1/completions", {"prompt": "hi", "presence_penalty": 3}, None, 400,
     "presence_penalty"),
    ("repetition_penalty zero", "/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, None, 400,
     "repetition_penalty"),
    ("min_tokens over max", "/v1/completions", {"prompt": "hi", "max_tokens": 2, "min_tokens": 5}, None, 400,
     "min_tokens"),
    ("empty prompt list", "/v1/completions", {"prompt": []}, None, 400, "prompt"),
    ("empty prompt string", "/v1/completions", {"prompt": ""}, None, 400, "prompt"),
    ("token id out of range", "/v1/completions", {"prompt": [1, 2, 10**9]}, None, 400, "prompt"),
    ("prompt over context", "/v1/completions", {"prompt": _LONG}, None, 400, "prompt"),
    ("max_tokens over context", "/v1/completions", {"prompt": "hi", "max_tokens": 600}, None, 400, "max_tokens"),
    ("unknown model", "/v1/completions", {"prompt": "hi", "model": "gpt-17"}, None, 404, "model"),
    ("missing api key", "/v1/completions", {"prompt": "hi"}, {}, 401, None),
    ("wrong api key", "/v1/completions", {"prompt": "hi"}, {"Authorization": "Bearer nope"}, 401, None),
    ("chat missing messages", "/v1/chat/completions", {"max_tokens": 4}, None, 400, "messages"),
    ("chat empty messages", "/v1/chat/completions", {"messages": []}, None, 400, "messages"),
    ("chat bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, None, 400,
     "messages.0.role"),
    ("chat content wrong type", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, None, 400,
     "messages.0.content"),
    ("chat top_logprobs without logprobs", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, None, 400, "top_logprobs"),
    ("chat logprobs not bool", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "logprobs": 3}, None, 400, "logprobs"),
    ("chat over context", "/v1/chat/completions", {"messages": [{"role": "user", "content": _LONG}]}, None, 400,
     "messages"),
    ("chat unknown model", "/v1/chat/completions",
     {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, None, 404, "model"),
    ("unknown route", "/v1/embeddings", {"input": "x"}, None, 404, None),
    ("seed beyond int64", "/v1/completions", {"prompt": "hi", "seed": 2**70}, None, 400, "seed"),
    ("temperature NaN", "/v1/completions", '{"prompt": "hi", "temperature": NaN}', None, 400, "temperature"),
    ("top_k huge", "/v1/completions", {"prompt": "hi", "top_k": 2**40, "temperature": 1}, None, 400, "top_k"),
    ("stop token id beyond vocab", "/v1/completions", {"prompt": "hi", "stop_token_ids": [10**12]}, None, 400,
     "stop_token_ids"),
    ("too many sequences", "/v1/completions", {"prompt": ["a"] * 10, "n": 30}, None, 400, "prompt"),
    ("deeply nested JSON", "/v1/completions", "[" * 50000 + "]" * 50000, None, 400, None),
]


def test_bad_inputs_get_openai_errors_while_a_valid_request_runs(server, llm_fp32):
    ref = _offline(llm_fp32, "Once upon a time", max_tokens=48, ignore_eos=True).outputs[0].text
    auth = {"Authorization": f"Bearer {API_KEY}"}
    failures = []
    with httpx.Client(base_url=server.url, timeout=60) as c, httpx.Client(base_url=server.url, timeout=60) as v:
        body = {"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, "ignore_eos": True, "stream": True}
        with v.stream("POST", "/v1/completions", json=body, headers=auth) as valid:
            events = valid.iter_lines()
            pieces = [json.loads(next(e for e in events if e.startswith("data: {"))[6:])["choices"][0]["text"]]
            # The valid request is mid-stream while every bad one is sent.
            for name, path, bad, headers, status, param in BAD_INPUTS:
                h = dict(auth if headers is None else headers)
                if isinstance(bad, str):
                    r = c.post(path, content=bad, headers={**h, "Content-Type": "application/json"})
                else:
                    r = c.post(path, json=bad, headers=h)
                try:
                    err = r.json()["error"]
                    ok = (r.status_code == status and set(err) == {"message", "type", "param", "code"}
                          and isinstance(err["message"], str) and err["message"]
                          and err["param"] == param and (param is None or param.split(".")[0] in err["message"]))
                except (ValueError, KeyError, TypeError):
                    ok = False
                if not ok:
                    failures.append(f"{name}: {r.status_code} {r.text[:200]}")
            for e in events:
                if e.startswith("data: {"):
                    pieces.append(json.loads(e[6:])["choices"][0]["text"])
    assert not failures, "\n".join(failures)
    assert "".join(pieces) == ref
    assert httpx.get(server.url + "/health").status_code == 200
    wait_for(lambda: server.metrics()["ridgeline:kv_cache_blocks_used"] == 0, what="blocks freed")


def test_openai_client_raises_typed_errors(server, model_id):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as exc:
        good.completions.create(model=model_id, prompt="hi", temperature=9)
    assert exc.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        good.completions.create(model="nope", prompt="hi")


# ---------------------------------------------------------------------- benchmark client end to end


@plain_only
def test_bench_serve_against_the_server(server, tmp_path):
    out = tmp_path / "bench.json"
    plot = tmp_path / "cdf.png"
    proc = subprocess.run(
        _command() + ["bench", "serve", "--base-url", server.url, "--api-key", API_KEY,
                      "--dataset", "prefix-repetition", "--num-prompts", "6", "--max-concurrency", "3",
                      "--prefix-repetition-prefix-len", "24", "--prefix-repetition-suffix-len", "4",
                      "--prefix-repetition-num-prefixes", "2", "--prefix-repetition-output-len", "5",
                      "--ignore-eos", "--slo", "ttft:60000", "tpot:60000", "--result-file", str(out),
                      "--plot", str(plot), "--disable-tqdm"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Successful requests:" in proc.stdout and "Median TTFT (ms):" in proc.stdout
    data = json.loads(out.read_text())["metrics"]
    assert data["completed"] == 6 and data["failed"] == 0
    assert data["total_output_tokens"] == 30
    assert data["goodput"] == pytest.approx(data["request_throughput"])
    assert 1 <= data["max_concurrent_requests"] <= 3
    assert data["ttft_ms"]["median"] > 0 and data["tpot_ms"]["median"] > 0
    assert plot.stat().st_size > 10_000


# ---------------------------------------------------------------------- full queue and shutdown


SHUTDOWN_TIMEOUT_S = 12  # the short request's 4 tokens have 11 s; the long one's 8,000 cannot finish in 12


@pytest.fixture(scope="module")
def small_server():
    # The full context (8,192 tokens) so that the long requests below stay unfinished however fast
    # the machine is, and a generous shutdown window so that the short one finishes however slow.
    srv = Server("--max-num-seqs", "1", "--max-num-batched-tokens", "256", "--max-queue", "1",
                 "--max-model-len", "8192", "--kv-cache-memory", "384MiB",
                 "--shutdown-timeout", str(SHUTDOWN_TIMEOUT_S))
    yield srv
    srv.stop(signal.SIGKILL if srv.proc.poll() is None else signal.SIGTERM)


def test_full_queue_is_503_and_sigterm_exits_cleanly(small_server):
    srv = small_server
    url = srv.url
    long_body = {"prompt": PROMPT, "max_tokens": 8000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as a_client, httpx.Client(timeout=60) as b_client:
        with a_client.stream("POST", url + "/v1/completions", json=long_body) as a:
            a_lines = a.iter_lines()
            assert next(line for line in a_lines if line.startswith("data: {"))  # A is running
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
            with b_client.stream("POST", url + "/v1/chat/completions", json=chat) as b:  # B waits behind A
                assert b.status_code == 200
                wait_for(lambda: srv.metrics()["ridgeline:num_requests_waiting"] == 1, timeout=60, what="B waiting")
                r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
                assert r.status_code == 503
                err = r.json()["error"]
                assert err["code"] == "queue_full" and "queue" in err["message"]
                assert srv.metrics()["ridgeline:num_requests_running"] == 1
    # Both clients left: their requests are aborted and the queue drains.
    wait_for(lambda: srv.metrics()["ridgeline:kv_cache_blocks_used"] == 0, timeout=60, what="blocks freed")
    wait_for(lambda: srv.metrics()["ridgeline:num_requests_waiting"] == 0, timeout=60, what="queue drained")
    ok = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200

    # SIGTERM with two requests in flight: the short one finishes; the long one (queued behind it)
    # is aborted just before the shutdown deadline and its stream ends with an error event.
    # Then the server exits 0. Neither outcome depends on the machine's speed (see small_server).
    short_lines: list[str] = []
    long_lines: list[str] = []
    with httpx.Client(timeout=60) as c, httpx.Client(timeout=60) as c2:
        with c.stream("POST", url + "/v1/completions",
                      json={"prompt": PROMPT, "max_tokens": 4, "ignore_eos": True, "stream": True}) as r:
            it = r.iter_lines()
            short_lines.append(next(line for line in it if line.startswith("data: {")))
            long_chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8000, "ignore_eos": True,
                         "stream": True}
            with c2.stream("POST", url + "/v1/chat/completions", json=long_chat) as r2:
                assert r2.status_code == 200
                srv.proc.send_signal(signal.SIGTERM)
                short_lines.extend(line for line in it if line)
                long_lines.extend(line for line in r2.iter_lines() if line)
    assert short_lines[-1] == "data: [DONE]"
    assert json.loads(short_lines[-2][6:])["choices"][0]["finish_reason"] == "length"
    assert long_lines[-1] == "data: [DONE]"
    err = json.loads(long_lines[-2][6:])["error"]
    assert err["code"] == "service_unavailable" and "shutting down" in err["message"]
    assert srv.proc.wait(60) == 0
    log = srv.log()
    assert "Traceback" not in log, log[-2000:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)


@plain_only
def test_cli_usage_errors_fail_fast(server):
    busy = subprocess.run(_command() + ["serve", "--port", str(server.port)], capture_output=True, text=True,
                          timeout=60)
    assert busy.returncode == 2 and busy.stderr.startswith("error: cannot listen on 127.0.0.1:")
    slo = subprocess.run(_command() + ["bench", "serve", "--base-url", server.url, "--slo", "latency:5"],
                         capture_output=True, text=True, timeout=60)
    assert slo.returncode == 2 and slo.stderr.startswith("error: --slo")
    url = subprocess.run(_command() + ["bench", "serve", "--base-url", "localhost:1"], capture_output=True, text=True,
                         timeout=60)
    assert url.returncode == 2 and "--base-url" in url.stderr
