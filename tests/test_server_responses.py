"""`POST /v1/responses` on a real `ridgeline serve` subprocess, driven with the `openai` client's
`responses.create` / `responses.stream` / `responses.parse`. Reference: the same conversation as a
greedy chat completion (whose outputs test_server.py compares with LLM.generate); a JSON-schema
`text.format`'s outputs are checked against the schema. One server for the file.
"""

from __future__ import annotations

import json
import random
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel

from .test_server import API_KEY, CHAT, Server
from .test_server_fuzz import junk_values, to_json

EVENTS_HEAD = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added"]
EVENTS_TAIL = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def server():
    srv = Server("--api-key", API_KEY)
    yield srv
    assert srv.stop() == 0, srv.log()[-2000:]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


def _chat(client, model_id, messages, max_tokens):
    return client.chat.completions.create(model=model_id, messages=messages, max_tokens=max_tokens, temperature=0)


def _check_matches_chat(r, chat, model_id):
    ref = chat.choices[0]
    assert r.output_text == ref.message.content
    assert r.status == ("incomplete" if ref.finish_reason == "length" else "completed")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.id.startswith("resp_") and r.object == "response" and r.model == model_id
    [item] = r.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert [p.type for p in item.content] == ["output_text"]


@pytest.mark.parametrize("max_tokens", [12, 200])
def test_text_input_with_instructions_matches_chat(client, model_id, max_tokens):
    r = client.responses.create(model=model_id, instructions=CHAT[0]["content"], input=CHAT[1]["content"],
                                max_output_tokens=max_tokens, temperature=0)
    chat = _chat(client, model_id, CHAT, max_tokens)
    _check_matches_chat(r, chat, model_id)
    assert r.max_output_tokens == max_tokens and r.instructions == CHAT[0]["content"]
    assert r.status == ("incomplete" if max_tokens == 12 else "completed")


def test_message_items_match_chat(client, model_id):
    items = [{"role": "developer", "content": "Answer in one word."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Capital of "},
                                                            {"type": "input_text", "text": "France?"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Paris."}]},
             {"role": "user", "content": "And of Italy?"}]
    r = client.responses.create(model=model_id, input=items, max_output_tokens=16, temperature=0)
    chat = _chat(client, model_id, [{"role": "system", "content": "Answer in one word."},
                                    {"role": "user", "content": "Capital of France?"},
                                    {"role": "assistant", "content": "Paris."},
                                    {"role": "user", "content": "And of Italy?"}], 16)
    _check_matches_chat(r, chat, model_id)


@pytest.mark.parametrize("max_tokens", [12, 200])
def test_stream_events(client, model_id, max_tokens):
    kw = dict(model=model_id, instructions=CHAT[0]["content"], input=CHAT[1]["content"],
              max_output_tokens=max_tokens, temperature=0)
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    final = "response.incomplete" if whole.status == "incomplete" else "response.completed"
    deltas = kinds[len(EVENTS_HEAD):-len(EVENTS_TAIL) - 1]
    assert kinds[:len(EVENTS_HEAD)] == EVENTS_HEAD and kinds[-len(EVENTS_TAIL) - 1:] == EVENTS_TAIL + [final]
    assert deltas and set(deltas) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-4].text == events[-3].part.text
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {events[2].item.id}
    done = events[-1].response
    assert done.status == whole.status and done.output_text == text and done.usage.output_tokens == \
        whole.usage.output_tokens
    if whole.status == "completed":  # the client's stream helper accumulates the same response (it
        with client.responses.stream(**kw) as s:  # expects response.completed, as OpenAI's API sends)
            assert s.get_final_response().output_text == text


COLOR = {"type": "object", "additionalProperties": False, "required": ["color", "count"],
         "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]},
                        "count": {"type": "integer", "minimum": 1, "maximum": 9}}}


class Color(BaseModel):
    color: Literal["red", "green", "blue"]
    count: int


def _valid_color(text: str) -> bool:
    obj = json.loads(text)
    return (set(obj) == {"color", "count"} and obj["color"] in ("red", "green", "blue")
            and isinstance(obj["count"], int) and 1 <= obj["count"] <= 9)


def test_json_schema_text_format(client, model_id):
    fmt = {"type": "json_schema", "name": "color", "schema": COLOR, "strict": True}
    kw = dict(model=model_id, input="Pick a color and a count.", max_output_tokens=64, text={"format": fmt})
    for temperature in (0, 1):
        r = client.responses.create(temperature=temperature, **kw)
        assert r.status == "completed" and _valid_color(r.output_text), r.output_text
        assert r.text.format.type == "json_schema" and r.text.format.name == "color"
    events = list(client.responses.create(temperature=0, stream=True, **kw))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == client.responses.create(temperature=0, **kw).output_text
    obj = client.responses.create(model=model_id, input='Reply with the JSON {"answer": "yes"}.', max_output_tokens=48,
                                  text={"format": {"type": "json_object"}}, temperature=0)
    assert obj.status == "completed" and isinstance(json.loads(obj.output_text), dict), obj.output_text
    # the client's parse helper sends the schema of a pydantic model and validates the output with it
    parsed = client.responses.parse(model=model_id, input="Pick a color.", text_format=Color,
                                    max_output_tokens=64, temperature=0)
    assert isinstance(parsed.output_parsed, Color)


@pytest.mark.parametrize("body,param", [
    ({"input": "hi", "previous_response_id": "resp_123"}, "previous_response_id"),
    ({"input": "hi", "conversation": "conv_1"}, "conversation"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}},
     "text.format.schema"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x",
                                         "schema": {"type": "string", "minLength": 5, "maxLength": 2}}}},
     "text.format.schema"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": 3, "schema": {}}}}, "text.format.name"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "schema": {}, "strict": "yes"}}},
     "text.format.strict"),
    ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"input": "hi", "text": {"format": "json"}}, "text.format"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": []}, "input"),
    ({"input": 5}, "input"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}", "call_id": "c"}]}, "input.0.type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.content.0.type"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input.0.role"),
    ({"input": [{"role": "user", "content": 3}]}, "input.0.content"),
    ({"input": ["hi"]}, "input.0"),
    ({"input": "hello " * 700}, "input"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "max_output_tokens": 10_000}, "max_output_tokens"),
    ({"input": "hi", "temperature": "1"}, "temperature"),
    ({"input": "hi", "top_p": 0}, "top_p"),
    ({"input": "hi", "stream": "yes"}, "stream"),
])
def test_bad_requests_are_400s_naming_the_field(client, model_id, body, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=model_id, **body)
    assert info.value.status_code == 400 and info.value.body["param"] == param, info.value.body


def test_unknown_model_and_missing_key(client, server):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="hi")
    r = httpx.post(server.url + "/v1/responses", json={"input": "hi"}, timeout=30)
    assert r.status_code == 401
    r = httpx.post(server.url + "/v1/responses", content=b'{"input": "hi"}', timeout=30,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = httpx.post(server.url + "/v1/responses", content=b'{"input": ', timeout=30,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"]


RESPONSE_FIELDS = ["input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "text",
                   "previous_response_id", "tools", "metadata", "model", "user", "background", "conversation"]


def test_fuzzed_bodies_are_4xx_never_5xx(server, model_id):
    """Seeded junk in every field (huge and non-finite numbers, lone surrogates, nesting, wrong
    types) and in message items: each answer is a 200 or a 4xx in OpenAI's error format."""
    rng = random.Random(20261204)
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    statuses = []
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as c:
        for _ in range(150):
            body: dict = {"model": model_id, "input": "Hi", "max_output_tokens": 1}
            for _ in range(rng.randint(1, 3)):
                name = rng.choice(RESPONSE_FIELDS)
                if name == "input" and rng.random() < 0.5:
                    item = {"role": "user", "content": [{"type": "input_text", "text": "hi"}]}
                    key = rng.choice(["role", "content", "type", "extra"])
                    item[key] = rng.choice(junk_values(rng) + ["assistant", "message", "function_call"])
                    body["input"] = [item]
                    continue
                values = junk_values(rng)
                if name == "max_output_tokens":  # None means "up to the context": keep each case short
                    values = [v for v in values if v is not None]
                body[name] = rng.choice(values)
            r = c.post("/v1/responses", content=to_json(body))
            statuses.append(r.status_code)
            assert r.status_code == 200 or 400 <= r.status_code < 500, (body, r.text[:300])
            if r.status_code != 200:
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"], r.text[:300]
    assert 200 in statuses and 400 in statuses, statuses  # junk was refused, and some bodies still ran
