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


WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                          "properties": {"city": {"type": "string", "maxLength": 20}}}}
TIME = {"type": "function", "name": "get_time", "description": "Current time in a timezone",
        "parameters": {"type": "object", "required": ["tz"], "additionalProperties": False,
                       "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}}}}


def _calls(r) -> list[tuple[str, dict]]:
    return [(o.name, json.loads(o.arguments)) for o in r.output if o.type == "function_call"]


def test_required_and_named_tool_calls(client, model_id):
    kw = dict(model=model_id, input="What is the weather in Paris?", tools=[WEATHER, TIME],
              max_output_tokens=96, temperature=0)
    r = client.responses.create(tool_choice="required", **kw)
    calls = _calls(r)
    assert r.status == "completed" and calls and all(name in ("get_weather", "get_time") for name, _ in calls)
    for name, args in calls:
        assert (set(args) == {"city"} and isinstance(args["city"], str)) if name == "get_weather" else \
            args in ({"tz": "UTC"}, {"tz": "CET"})
    assert all(o.call_id.startswith("call_") and o.status == "completed" for o in r.output if o.type == "function_call")
    named = client.responses.create(tool_choice={"type": "function", "name": "get_time"}, parallel_tool_calls=False,
                                    **kw)
    assert [name for name, _ in _calls(named)] == ["get_time"] and named.parallel_tool_calls is False
    # streamed: the same items; each call's argument deltas concatenate to its arguments
    events = list(client.responses.create(tool_choice="required", stream=True, **kw))
    done = events[-1].response
    assert events[-1].type == "response.completed" and _calls(done) == calls
    for item in (o for o in done.output if o.type == "function_call"):
        deltas = [e.delta for e in events
                  if e.type == "response.function_call_arguments.delta" and e.item_id == item.id]
        [fin] = [e for e in events if e.type == "response.function_call_arguments.done" and e.item_id == item.id]
        assert "".join(deltas) == fin.arguments == item.arguments
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == [o.type for o in done.output]
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_auto_tools_and_a_follow_up_turn_match_chat(client, model_id):
    """tools with tool_choice auto, and a conversation holding a function call and its output,
    answer as the same chat completion does (same engine path, same rendering and parsing)."""
    chat_tool = {"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}
    r = client.responses.create(model=model_id, input="What is the weather in Paris?", tools=[WEATHER],
                                max_output_tokens=48, temperature=0)
    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content":
                                                                     "What is the weather in Paris?"}],
                                          tools=[chat_tool], max_tokens=48, temperature=0).choices[0].message
    assert _calls(r) == [(c.function.name, json.loads(c.function.arguments)) for c in chat.tool_calls or []]
    assert (r.output_text or None) == chat.content
    items = [{"role": "user", "content": "What is the weather in Paris?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"}]
    r = client.responses.create(model=model_id, input=items, tools=[WEATHER], max_output_tokens=24, temperature=0)
    chat = client.chat.completions.create(
        model=model_id, tools=[chat_tool], max_tokens=24, temperature=0,
        messages=[{"role": "user", "content": "What is the weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "call_1", "type": "function",
                       "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}])
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert (r.output_text or None) == chat.choices[0].message.content


@pytest.mark.parametrize("body,param", [
    ({"input": "hi", "previous_response_id": "resp_123"}, "previous_response_id"),
    ({"input": "hi", "conversation": "conv_1"}, "conversation"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools.0.type"),
    ({"input": "hi", "tools": [{"type": "function", "name": "a b"}]}, "tools.0.name"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {"type": "nonsense"}}]},
     "tools.0.parameters"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f", "strict": "yes"}]}, "tools.0.strict"),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}},
     "tool_choice.name"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f"}], "tool_choice": "required",
      "text": {"format": {"type": "json_object"}}}, "tool_choice"),
    ({"input": [{"type": "function_call_output", "call_id": "c1", "output": ""}]}, "input.0.output"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input.0.call_id"),
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
    ({"input": [{"type": "reasoning", "summary": []}]}, "input.0.type"),
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
                   "previous_response_id", "tools", "metadata", "model", "user", "background", "conversation",
                   "tool_choice", "parallel_tool_calls"]


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
                    item = rng.choice([{"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
                                       {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                                       {"type": "function_call_output", "call_id": "c", "output": "ok"}])
                    key = rng.choice(["role", "content", "type", "extra", "call_id", "name", "arguments", "output"])
                    item[key] = rng.choice(junk_values(rng) + ["assistant", "message", "function_call"])
                    body["input"] = [{"role": "user", "content": "hi"}, item]
                    continue
                if name == "tools" and rng.random() < 0.5:
                    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
                    tool[rng.choice(["type", "name", "description", "parameters", "strict"])] = rng.choice(
                        junk_values(rng))
                    body["tools"] = [tool]
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
