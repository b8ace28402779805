"""Server hardening against a real `ridgeline serve` on 127.0.0.1: huge prompts refused without
stalling other streams, long prompts tokenized off the engine thread, half-open connections
closed on the header timeout, the connection cap, Content-Type and Host checks, UTF-8 API keys.

Timing checks run on a shared 2-core VM, so each is a few attempts: a real stall shows in every
attempt, a noisy neighbour in one. Streams are measured by the gaps between their chunks, the
median over the whole stream against the longest gap while a hostile request was in flight; the
hostile requests come from another process (tests/utf8_client.py), so that encoding them does not
hold this process's GIL while it times the stream. The server computes on one thread (`--threads 1`)
so that the hostile client has a core of its own, as a client on another machine would: with the
server on both cores of a 2-core VM, the client's own 20-60 ms of CPU per 5 MB request (encoding,
loopback copies) doubles the server's step times while it runs, whatever the server does (measured
on a Sapphire Rapids VM: longest gaps 1.9-2.2x the median with 2 threads, 1.0-1.1x with 1).
Everything the server does with a hostile request still competes with the stream's steps.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from .test_server import Server
from .utf8_client import utf8_client

API_KEY = "sécret-ключ-🔑"  # non-ASCII: compared as UTF-8 bytes
HEADER_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 240
CONTEXT = 8192  # the default model's full context: its longest possible prompt string is long
ATTEMPTS = 3


@pytest.fixture(scope="module")
def hard_server():
    srv = Server("--threads", "1", "--api-key", API_KEY, "--header-timeout", str(HEADER_TIMEOUT_S), "--max-connections",
                 str(MAX_CONNECTIONS), "--max-model-len", str(CONTEXT), "--kv-cache-memory", "384MiB")
    yield srv
    assert srv.stop() == 0
    log = srv.log()
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]


def _client(srv: Server, api_key: str = API_KEY) -> openai.OpenAI:
    return utf8_client(srv.url + "/v1", api_key)


@pytest.fixture(scope="module")
def client(hard_server) -> openai.OpenAI:
    return _client(hard_server)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


AUTH = {"Authorization": ("Bearer " + API_KEY).encode()}


# ---------------------------------------------------------------------- streams under a hostile request


class Stream(threading.Thread):
    """A greedy stream through the openai client that records when each text chunk arrives."""

    def __init__(self, client: openai.OpenAI, model: str, max_tokens: int):
        super().__init__(daemon=True)
        self.client, self.model, self.max_tokens = client, model, max_tokens
        self.times: list[float] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            stream = self.client.completions.create(model=self.model, prompt="Once upon a time", temperature=0,
                                                    max_tokens=self.max_tokens, stream=True,
                                                    extra_body={"ignore_eos": True})
            with stream:
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].text:
                        self.times.append(time.monotonic())
                    if self.stop.is_set():
                        break
        except BaseException as exc:  # noqa: BLE001  (reported by finish())
            self.error = exc

    def wait_for(self, chunks: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.times) < chunks:
            assert self.is_alive() and time.monotonic() < deadline, f"stream stalled: {self.error!r}"
            time.sleep(0.01)

    def finish(self, more_chunks: int = 5) -> list[float]:
        """Let it run a little past the hostile requests, then close it; the chunk times."""
        self.wait_for(len(self.times) + more_chunks)
        self.stop.set()
        self.join(60)
        assert self.error is None, repr(self.error)
        return self.times


class Burst:
    """tests/utf8_client.py in a subprocess, ready (client made, text built) before `run()` fires it."""

    def __init__(self, srv: Server, model: str, kind: str, chars: int, repeat: int):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.utf8_client", srv.url + "/v1", model, kind,
                                      str(chars), str(repeat)], cwd=Path(__file__).parent.parent,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8",
                                     env={**os.environ, "PYTHONUTF8": "1"})
        self.proc.stdin.write(API_KEY + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ready"

    def run(self) -> list[dict]:
        """Each request's {"start", "end", "status", "error"}."""
        self.proc.stdin.write("\n")
        self.proc.stdin.close()
        results = [json.loads(line) for line in self.proc.stdout]
        assert self.proc.wait(60) == 0
        return results


def _gaps_during(times: list[float], start: float, end: float) -> list[float]:
    """Gaps between consecutive chunks that overlap [start, end]."""
    return [b - a for a, b in zip(times, times[1:]) if b >= start and a <= end]


def _retry(attempt: Callable[[], str | None]) -> None:
    """Run a timing check up to ATTEMPTS times; it passes once an attempt reports no problem."""
    problems = []
    for _ in range(ATTEMPTS):
        problem = attempt()
        if problem is None:
            return
        problems.append(problem)
    pytest.fail(f"in all {ATTEMPTS} attempts:\n" + "\n".join(problems))


def _ms(values: list[float]) -> list[int]:
    return [round(v * 1000) for v in values]


def test_5mb_prompt_is_refused_in_100ms_while_a_stream_keeps_its_pace(hard_server, client, model_id):
    def attempt() -> str | None:
        burst = Burst(hard_server, model_id, "prompt", 5_000_000, repeat=3)
        stream = Stream(client, model_id, max_tokens=400)
        stream.start()
        stream.wait_for(15)
        results = burst.run()
        times = stream.finish()
        for r in results:
            err = r["error"]
            assert r["status"] == 413 and err["code"] == "request_too_large", r
            assert "--max-request-bytes" in err["message"] and set(err) == {"message", "type", "param", "code"}
        median = statistics.median(b - a for a, b in zip(times, times[1:]))
        near = [max(_gaps_during(times, r["start"], r["end"])) for r in results]
        refusals = [r["end"] - r["start"] for r in results]
        print(f"\n5 MB prompt refused in {_ms(refusals)} ms; stream gaps median {median * 1000:.0f} ms, "
              f"longest around each refusal {_ms(near)} ms")
        if max(refusals) < 0.1 and max(near) < 2 * median:
            return None
        return f"refusals {_ms(refusals)} ms, longest gaps {_ms(near)} ms, median gap {median * 1000:.0f} ms"

    _retry(attempt)


def test_long_prompts_are_tokenized_off_the_engine_thread(hard_server, client, model_id):
    # Under the pre-tokenization bound (longest token x context: 81 x 8192 characters), so they are
    # tokenized: ~135k tokens, 0.4-0.5 s of work that, in the engine thread, would be one gap of
    # that length (9x the median) in every stream in flight.
    def attempt() -> str | None:
        bursts = {kind: Burst(hard_server, model_id, kind, 600_000, repeat=1) for kind in ("prompt", "messages")}
        stream = Stream(client, model_id, max_tokens=2000)
        stream.start()
        stream.wait_for(10)
        results = {kind: burst.run()[0] for kind, burst in bursts.items()}
        times = stream.finish()
        for kind, r in results.items():
            err = r["error"]
            assert r["status"] == 400 and err["param"] == kind, r
            assert f"maximum context length is {CONTEXT} tokens" in err["message"], err
        median = statistics.median(b - a for a, b in zip(times, times[1:]))
        near = [max(_gaps_during(times, r["start"], r["end"])) for r in results.values()]
        print(f"\n600k-character prompt and message refused after "
              f"{_ms([r['end'] - r['start'] for r in results.values()])} ms; stream gaps median "
              f"{median * 1000:.0f} ms, longest during each {_ms(near)} ms")
        if max(near) < 4 * median:
            return None
        return f"longest gaps {_ms(near)} ms while tokenizing, median gap {median * 1000:.0f} ms"

    _retry(attempt)


# ---------------------------------------------------------------------- connections


async def _hold_open(port: int, heads: list[bytes], timeout: float,
                     all_sent: asyncio.Event | None = None) -> list[tuple[float, bytes, bool]]:
    """Open one connection per head, send it, then wait for the server to close each; returns
    (seconds from our send to the close, what the server sent, closed by the server)."""
    pending = len(heads)

    async def one(head: bytes) -> tuple[float, bytes, bool]:
        nonlocal pending
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)
        await writer.drain()
        sent = time.monotonic()
        pending -= 1
        if pending == 0 and all_sent is not None:
            all_sent.set()
        try:
            data = await asyncio.wait_for(reader.read(), timeout)  # until EOF
            closed = True
        except asyncio.TimeoutError:
            data, closed = b"", False
        except ConnectionError:
            data, closed = b"", True
        writer.close()
        return time.monotonic() - sent, data, closed

    tasks = [asyncio.ensure_future(one(h)) for h in heads]
    return await asyncio.gather(*tasks)


def _error_code(reply: bytes) -> str | None:
    head, _, body = reply.partition(b"\r\n\r\n")
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def test_200_half_open_connections_close_on_the_header_timeout(hard_server, client, model_id):
    partial = [b"", b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"POST /v1/comp",
               b"GET / HTTP/1.1\r\nX-Slow: aaaa"]
    heads = [partial[i % len(partial)] for i in range(200)]
    result: dict = {}

    def normal_request() -> None:  # while all 200 are open: the server still serves
        start = time.monotonic()
        r = client.completions.create(model=model_id, prompt="Hello", max_tokens=4, temperature=0)
        result["normal"] = (time.monotonic() - start, r.choices[0].finish_reason)

    async def run() -> list:
        opened, all_sent = time.monotonic(), asyncio.Event()
        held = asyncio.ensure_future(_hold_open(hard_server.port, heads, HEADER_TIMEOUT_S + 20, all_sent))
        await all_sent.wait()
        await asyncio.to_thread(normal_request)
        result["normal_at"] = time.monotonic() - opened
        return await held

    start = time.monotonic()
    closes = asyncio.run(run())
    elapsed = time.monotonic() - start
    took, finish = result["normal"]
    assert finish == "length" and result["normal_at"] < HEADER_TIMEOUT_S, result  # answered while they were open
    late = [(round(s, 2), d[:40]) for s, d, closed in closes
            if not (closed and d.startswith(b"HTTP/1.1 408") and _error_code(d) == "request_timeout"
                    and HEADER_TIMEOUT_S - 0.5 <= s <= HEADER_TIMEOUT_S + 2)]
    print(f"\n200 half-open connections closed with 408 after {min(s for s, _, _ in closes):.2f}-"
          f"{max(s for s, _, _ in closes):.2f} s (header timeout {HEADER_TIMEOUT_S:g} s); a completion during "
          f"them took {took * 1000:.0f} ms")
    assert not late, f"{len(late)} of 200 not closed with a 408 on time: {late[:5]}"
    assert elapsed < HEADER_TIMEOUT_S + 5


def test_connections_over_the_cap_get_503_and_close(hard_server, client, model_id):
    n = MAX_CONNECTIONS + 20
    closes = asyncio.run(_hold_open(hard_server.port, [b""] * n, HEADER_TIMEOUT_S + 20))
    refused = [(s, d) for s, d, _ in closes if d.startswith(b"HTTP/1.1 503")]
    timed_out = [(s, d) for s, d, _ in closes if d.startswith(b"HTTP/1.1 408")]
    assert len(refused) + len(timed_out) == n
    assert len(refused) >= n - MAX_CONNECTIONS and len(timed_out) <= MAX_CONNECTIONS
    assert all(_error_code(d) == "too_many_connections" and s < 1.0 for s, d in refused), refused[:3]
    # Once the idle ones are gone the server accepts again.
    assert client.completions.create(model=model_id, prompt="Hello", max_tokens=2).choices[0].text is not None


# ---------------------------------------------------------------------- cross-site and Host


def test_post_routes_require_application_json(hard_server, model_id):
    url = hard_server.url
    body = json.dumps({"model": model_id, "prompt": "Hello", "max_tokens": 1,
                       "messages": [{"role": "user", "content": "Hi"}]}).encode()
    with httpx.Client(base_url=url, timeout=60) as c:
        for path in ("/v1/completions", "/v1/chat/completions"):
            # what a web page can send cross-origin without a preflight, and a JSON of another charset
            for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                          None, "application/json; charset=utf-16", "application/jsonp"):
                headers = dict(AUTH) if ctype is None else {**AUTH, "Content-Type": ctype}
                r = c.post(path, content=body, headers=headers)
                err = r.json()["error"]
                assert r.status_code == 415 and err["code"] == "unsupported_media_type", (path, ctype, r.text)
                assert err["message"].startswith("Content-Type:") and "application/json" in err["message"]
            r = c.post(path, content=body, headers={**AUTH, "Content-Type": "application/json; charset=UTF-8"})
            assert r.status_code == 200, r.text


def test_foreign_host_is_refused(hard_server):
    port = hard_server.port
    with httpx.Client(base_url=hard_server.url, timeout=30) as c:
        for path in ("/health", "/metrics", "/v1/models"):
            for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil"):
                r = c.get(path, headers={**AUTH, "Host": host})
                err = r.json()["error"]
                assert r.status_code == 421 and err["code"] == "misdirected_request", (path, host, r.text)
                assert err["message"].startswith("Host:") and "--allowed-hosts" in err["message"]
            for host in (f"localhost:{port}", "LOCALHOST", f"127.0.0.1:{port}", f"[::1]:{port}"):
                assert c.get(path, headers={**AUTH, "Host": host}).status_code == 200, (path, host)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # two Host headers: ambiguous
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400") and _error_code(reply) in ("invalid_host", None), reply[:300]


# ---------------------------------------------------------------------- API keys and the model card


def test_non_ascii_api_key_works_with_the_openai_client(hard_server, client, model_id):
    card = client.models.list().data[0]
    root = card.model_extra["root"]
    assert root == "SmolLM2-135M-Instruct.Q4_1.gguf" and not os.path.isabs(root) and os.sep not in root
    r = client.chat.completions.create(model=model_id, max_tokens=3, messages=[{"role": "user", "content": "Hi"}])
    assert r.choices[0].message.content is not None
    with pytest.raises(openai.AuthenticationError):
        _client(hard_server, API_KEY + "x").models.list()
    with pytest.raises(openai.AuthenticationError):  # a prefix of the key's bytes
        _client(hard_server, API_KEY[:-1]).models.list()
    with httpx.Client(base_url=hard_server.url, timeout=30) as c:
        # The key's UTF-8 bytes read as latin-1 and encoded again (what the server once compared with)
        mojibake = ("Bearer " + API_KEY).encode().decode("latin-1").encode()
        assert c.get("/v1/models", headers={"Authorization": mojibake}).status_code == 401
        twice = c.get("/v1/models", headers=[("Authorization", AUTH["Authorization"]),
                                              ("Authorization", AUTH["Authorization"])])
        err = twice.json()["error"]
        assert twice.status_code == 400 and err["message"].startswith("Authorization:"), twice.text
        assert c.get("/v1/models", headers=AUTH).status_code == 200
