"""Tokenizer endpoints (/tokenize, /detokenize, /tokenizer_info) and prompt scoring
(max_tokens=0 with echo) on a real `ridgeline serve` subprocess.

References: the model's own tokenizer loaded here (encode, chat template, decode) and
transformers' GGUF model for the prompt tokens' logprobs. One server for the file.
"""

from __future__ import annotations

import json
import random

import httpx
import openai
import pytest
import torch

from ridgeline.loader import default_model_path
from ridgeline.tokenizer import cache_dir, load_tokenizer

from .test_server import CHAT, PROMPT, Server
from .test_server_fuzz import junk_values, to_json

KEY = "tok-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXTS = ["Hello world", "  café, naïve — 東京\n\ttabs", "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def server():
    srv = Server("--api-key", KEY)
    yield srv
    assert srv.stop() == 0, srv.log()[-2000:]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_tokenize_prompt_matches_the_tokenizer(http, tok):
    for text in TEXTS:
        for special in (None, True, False):
            body = {"prompt": text, "return_token_strs": True}
            if special is not None:
                body["add_special_tokens"] = special
            r = http.post("/tokenize", json=body)
            assert r.status_code == 200, r.text
            want = tok.encode(text, add_special_tokens=special is not False)
            assert r.json() == {"count": len(want), "max_model_len": 512, "tokens": want,
                                "token_strs": tok.convert_ids_to_tokens(want)}
    r = http.post("/tokenize", json={"prompt": PROMPT}).json()
    assert "token_strs" not in r and r["tokens"] == tok.encode(PROMPT)


def test_tokenize_messages_applies_the_chat_template(http, tok):
    for gen in (True, False):
        r = http.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": gen})
        assert r.status_code == 200, r.text
        text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
        assert r.json()["tokens"] == tok.encode(text, add_special_tokens=False)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name "}, {"type": "text", "text": "a color."}]}]
    plain = [{"role": "user", "content": "Name a color."}]
    assert (http.post("/tokenize", json={"messages": parts}).json()
            == http.post("/tokenize", json={"messages": plain}).json())
    with_bos = http.post("/tokenize", json={"messages": plain, "add_special_tokens": True}).json()["tokens"]
    text = tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    assert with_bos == tok.encode(text, add_special_tokens=True)


def test_detokenize_round_trips(http, tok):
    for text in TEXTS:
        ids = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
        r = http.post("/detokenize", json={"tokens": ids})
        assert r.status_code == 200, r.text
        assert r.json() == {"prompt": tok.decode(ids)} and r.json()["prompt"] == text
    assert http.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}
    eos = tok.eos_token_id
    assert http.post("/detokenize", json={"tokens": [eos]}).json()["prompt"] == tok.eos_token


def test_tokenizer_info_has_what_lm_eval_reads(http, tok, server):
    r = http.get("/tokenizer_info")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["eos_token"] == tok.eos_token == "<|im_end|>" and info["bos_token"] == tok.bos_token
    assert info["eos_token_id"] == tok.eos_token_id and info["chat_template"] == tok.chat_template
    assert info["model_max_length"] == info["max_model_len"] == 512
    assert isinstance(info["tokenizer_class"], str) and info["tokenizer_class"]
    # lm-eval's remote tokenizer takes the EOS id as encode(eos_token)[0]
    enc = http.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert enc["tokens"] == [tok.eos_token_id]
    # no server paths (the converted tokenizer's cache directory, the model file's folder)
    assert str(cache_dir()) not in r.text and str(default_model_path().parent) not in r.text
    assert "name_or_path" not in info


BAD = [
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": CHAT}, 400, "prompt"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
    ("/tokenize", {"prompt": "a", "return_token_strs": 1}, 400, "return_token_strs"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("/tokenize", {"messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content"),
    ("/tokenize", {"messages": CHAT, "continue_final_message": True}, 400, "continue_final_message"),
    ("/tokenize", {"prompt": "a", "model": "other"}, 404, "model"),
    ("/detokenize", {}, 400, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
    ("/detokenize", {"tokens": [1, "2"]}, 400, "tokens.1"),
    ("/detokenize", {"tokens": [1, True]}, 400, "tokens.1"),
    ("/detokenize", {"tokens": [1, 2.0]}, 400, "tokens.1"),
    ("/detokenize", {"tokens": [1, -1]}, 400, "tokens.1"),
    ("/detokenize", {"tokens": [0, 49152]}, 400, "tokens.1"),
    ("/detokenize", {"tokens": [10 ** 30]}, 400, "tokens.0"),
]


@pytest.mark.parametrize("route,body,status,param", BAD)
def test_bad_input_is_an_error_naming_the_field(http, route, body, status, param):
    r = http.post(route, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"], err


def test_wire_errors_and_api_key(http, server):
    r = http.post("/tokenize", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    assert http.post("/tokenize", content=b'{"prompt": "a"}', headers={"Content-Type": "text/plain"}).status_code == 415
    for method, route in (("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/tokenizer_info")):
        r = httpx.request(method, server.url + route, json={"prompt": "a", "tokens": [1]}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert http.get("/tokenize").status_code == 405


# ---------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def hf_logprobs(hf_default_model):
    def score(ids: list[int]) -> list[float]:
        with torch.no_grad():
            lp = hf_default_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        return [lp[j - 1, ids[j]].item() for j in range(1, len(ids))]
    return score


def test_max_tokens_zero_scores_the_prompt(client, http, tok, hf_logprobs):
    model = client.models.list().data[0].id
    text = "The quick brown fox jumps over the lazy dog. " + PROMPT
    ids = tok.encode(text)
    for prompt in (text, ids):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
        c = r.choices[0]
        assert c.text == text and c.finish_reason == "length"
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
        lp = c.logprobs
        assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == text
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx(hf_logprobs(ids), abs=2e-3)
        # the top entry holds the most likely token; a greedy token's logprob is that maximum
        for chosen, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
            assert chosen <= max(top.values()) + 1e-6
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    # without logprobs: only the text; several prompts keep their order
    r = client.completions.create(model=model, prompt=[text, "Hello"], max_tokens=0, echo=True)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [text, "Hello"]
    assert all(c.logprobs is None for c in r.choices) and r.usage.completion_tokens == 0
    # streaming: one chunk with the same choice, then usage
    body = {"model": model, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1, "stream": True,
            "stream_options": {"include_usage": True}}
    chunks = []
    with http.stream("POST", "/v1/completions", json=body) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    assert len(chunks) == 2 and chunks[1]["choices"] == [] and chunks[1]["usage"]["completion_tokens"] == 0
    streamed = chunks[0]["choices"][0]
    assert streamed["text"] == text and streamed["finish_reason"] == "length"
    assert streamed["logprobs"]["token_logprobs"][1:] == pytest.approx(hf_logprobs(ids), abs=2e-3)


def test_max_tokens_zero_needs_echo(http):
    for body, param in (({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
                        ({"prompt": "hi", "max_tokens": 0, "echo": True, "min_tokens": 1}, "min_tokens"),
                        ({"prompt": "hi", "max_tokens": -1, "echo": True}, "max_tokens")):
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def _stream_choices(http, body: dict) -> list[dict]:
    chunks = []
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.extend(json.loads(line[6:])["choices"])
    return chunks


def test_streamed_echo_logprobs_equal_the_whole_response(http, client):
    """A stream with echo and logprobs sends the prompt's logprobs (all of them, once known) and then
    the completion's, with the same offsets as the non-streamed response."""
    model = client.models.list().data[0].id
    body = {"model": model, "prompt": [PROMPT, "One, two, three,"], "max_tokens": 4, "temperature": 0,
            "echo": True, "logprobs": 2, "ignore_eos": True}
    whole = http.post("/v1/completions", json=body).json()["choices"]
    chunks = _stream_choices(http, body)
    for choice in whole:
        mine = [c for c in chunks if c["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        merged = {key: [v for c in mine for v in c["logprobs"][key]] for key in choice["logprobs"]}
        assert merged["tokens"] == choice["logprobs"]["tokens"]
        assert merged["text_offset"] == choice["logprobs"]["text_offset"]
        assert merged["token_logprobs"][0] is None
        assert merged["token_logprobs"][1:] == pytest.approx(choice["logprobs"]["token_logprobs"][1:], abs=1e-4)


def test_fuzzed_bodies_are_4xx_never_5xx(http):
    """Seeded junk in every field of /tokenize and /detokenize: a 200 or a 4xx in OpenAI's format."""
    rng = random.Random(20261204)
    statuses = []
    for _ in range(200):
        route = rng.choice(["/tokenize", "/detokenize"])
        if route == "/tokenize":
            body: dict = rng.choice([{"prompt": "Hello"}, {"messages": [{"role": "user", "content": "Hi"}]}])
            names = ["prompt", "messages", "add_special_tokens", "add_generation_prompt", "return_token_strs",
                     "continue_final_message", "model"]
        else:
            body, names = {"tokens": [1, 2, 3]}, ["tokens", "model"]
        for _ in range(rng.randint(1, 3)):
            name = rng.choice(names)
            body[name] = rng.choice(junk_values(rng))
        r = http.post(route, content=to_json(body), headers={"Content-Type": "application/json"})
        statuses.append(r.status_code)
        assert r.status_code == 200 or 400 <= r.status_code < 500, (route, body, r.text[:300])
        if r.status_code != 200:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text[:300]
    assert 200 in statuses and 400 in statuses, statuses


WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object", "required": ["city"],
                                                            "properties": {"city": {"type": "string"}}}}}]
TOOL_TURNS = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": "c1", "type": "function",
                   "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
              {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"}]


def test_tokenized_chat_is_the_prompt_chat_completions_run(http, client):
    """/tokenize renders a conversation (tool turns and tools included) as /v1/chat/completions does:
    its count is the completion's prompt_tokens."""
    model = client.models.list().data[0].id
    for messages, tools in ((CHAT, None), (TOOL_TURNS, None), (TOOL_TURNS, WEATHER), (CHAT, WEATHER)):
        body = {"messages": messages, **({"tools": tools} if tools else {})}
        r = http.post("/tokenize", json=body)
        assert r.status_code == 200, r.text
        chat = http.post("/v1/chat/completions", json={**body, "model": model, "max_tokens": 1})
        assert chat.status_code == 200, chat.text
        assert r.json()["count"] == chat.json()["usage"]["prompt_tokens"], (messages, tools)
    with_tools = http.post("/tokenize", json={"messages": CHAT, "tools": WEATHER}).json()["count"]
    assert with_tools > http.post("/tokenize", json={"messages": CHAT}).json()["count"]
    for body, param in (({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]},
                         "tools.0.function.name"),
                        ({"messages": CHAT, "tool_choice": "required"}, "tool_choice"),
                        ({"prompt": "hi", "tools": WEATHER}, "tools")):
        r = http.post("/tokenize", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
