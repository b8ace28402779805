"""Tool calling in chat completions: the parsers (hermes, llama3) streaming and not, the fallback
rendering for a template without tools, the call grammars against a real tokenizer, and a real
server with the openai client (required / named calls always parse and validate, auto parses a
call written in the parser's format, streamed deltas concatenate to the non-streamed call, a
`tool` message follow-up renders, bad tool fields are 400s)."""

from __future__ import annotations

import json

import httpx
import llguidance
import openai
import pytest

from ridgeline.server.tools import (FALLBACK_HERMES, Tool, ToolSetup, ToolStream, call_grammar, format_calls,
                                    parse_output, render_messages)
from ridgeline.structured import StructuredOutputsParams

from .test_server import API_KEY, Server
from .test_structured_outputs import SERVER_ARGS, validate

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Local time in a time zone",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
TOOL_OBJS = [Tool(t["function"]["name"], t["function"]["description"], t["function"]["parameters"]) for t in TOOLS]


# ---------------------------------------------------------------------- parsers and rendering


def test_hermes_parser_streaming_equals_whole():
    text = ('Let me check.  \n<tool_call>\n{"name": "get_weather", "arguments": {"city": "a</tool_call>b", '
            '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": '
            '"Europe/Paris"}}\n</tool_call>\nDone. <tool_call>{"name": "unknown", "arguments": {}}</tool_call>')
    content, calls = parse_output("hermes", TOOL_OBJS, text)
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "a</tool_call>b", "unit": "celsius"}
    assert content.startswith("Let me check.\nDone.") and "unknown" in content  # an unknown tool stays text
    for step in (1, 3, 7):
        ts = ToolStream("hermes", TOOL_OBJS)
        deltas = []
        for k in range(step, len(text) + step, step):
            deltas += ts.feed(text[:k], k >= len(text))
        assert "".join(d.get("content", "") for d in deltas) == content
        args = {}
        for d in deltas:
            for tc in d.get("tool_calls", []):
                args[tc["index"]] = args.get(tc["index"], "") + tc["function"]["arguments"]
        assert [args[i] for i in sorted(args)] == [c.arguments for c in calls]
    assert parse_output("hermes", TOOL_OBJS, "no calls here") == ("no calls here", [])


def test_llama3_parser():
    content, calls = parse_output("llama3", TOOL_OBJS, '{"name": "get_time", "parameters": {"zone": "Asia/Tokyo"}}; '
                                                       '{"name": "get_weather", "parameters": {"city": "Oslo", '
                                                       '"unit": "celsius"}}')
    assert content is None and [c.name for c in calls] == ["get_time", "get_weather"]
    assert parse_output("llama3", TOOL_OBJS, 'Sure: {"name": "get_time"}') == ('Sure: {"name": "get_time"}', [])
    assert parse_output("llama3", TOOL_OBJS, '{"name": "get_time", "parameters": {"zone": ')[1] == []


@pytest.mark.parametrize("parser", ["hermes", "llama3"])
def test_call_grammar_accepts_formatted_calls_only(parser):
    """The grammar that enforces required / named calls accepts what the parser parses, and refuses
    arguments that break the tool's schema (checked with the default model's tokenizer)."""
    from ridgeline.loader import default_model_path
    from ridgeline.tokenizer import load_tokenizer

    import llguidance.hf

    tok = load_tokenizer(default_model_path())
    lltok = llguidance.hf.from_tokenizer(tok, 49152)
    so = StructuredOutputsParams(grammar=call_grammar(parser, TOOL_OBJS, parallel=True))

    def accepts(text: str) -> bool:
        m = llguidance.LLMatcher(lltok, so.llg_grammar, log_level=0)
        ids = tok.encode(text, add_special_tokens=False)
        return m.validate_tokens(ids) == len(ids) and m.consume_tokens(ids) and m.is_accepting()

    good = format_calls(parser, [("get_weather", {"city": "Rome", "unit": "celsius"}),
                                 ("get_time", {"zone": "Europe/Rome"})])
    assert accepts(good)
    assert [c.name for c in parse_output(parser, TOOL_OBJS, good)[1]] == ["get_weather", "get_time"]
    assert not accepts(format_calls(parser, [("get_weather", {"city": "Rome", "unit": "kelvin"})]))
    assert not accepts(format_calls(parser, [("get_time", {"zone": "rome"})]))
    assert not accepts(format_calls(parser, [("delete_all", {})]))
    single = StructuredOutputsParams(grammar=call_grammar(parser, TOOL_OBJS[:1], parallel=False))
    m = llguidance.LLMatcher(lltok, single.llg_grammar, log_level=0)
    two = format_calls(parser, [("get_weather", {"city": "A", "unit": "celsius"})] * 2)
    ids = tok.encode(two, add_special_tokens=False)
    assert m.validate_tokens(ids) < len(ids)  # parallel_tool_calls=false: one call only


def test_fallback_rendering_of_tools_and_history():
    setup = ToolSetup(TOOL_OBJS, "auto")
    history = [{"role": "system", "content": "Be brief."}, *ASK,
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'}]
    msgs, tools = render_messages(history, setup, "hermes", "{{ messages }}")  # a template without tools
    assert tools is None
    assert msgs[0]["role"] == "system" and msgs[0]["content"].startswith("Be brief.\n\n# Tools")
    assert '"name": "get_weather"' in msgs[0]["content"]
    assert msgs[2] == {"role": "assistant", "content": format_calls("hermes", [("get_weather", {"city": "Paris",
                                                                                              "unit": "celsius"})])}
    assert msgs[3] == {"role": "user", "content": '<tool_response>\n{"temp": 21}\n</tool_response>'}
    # a template that renders tools gets them as they are
    msgs, tools = render_messages(history, setup, "hermes", "{% for t in tools %}{{ t }}{% endfor %}")
    assert tools == [t.spec() for t in TOOL_OBJS] and msgs[3]["role"] == "tool"
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "celsius"}
    # tool_choice none: no tools rendered
    msgs, tools = render_messages(ASK, ToolSetup(TOOL_OBJS, "none"), "hermes", "{{ messages }}")
    assert msgs == ASK and tools is None
    assert "<tool_call>" in FALLBACK_HERMES


# ---------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def server():
    s = Server(*SERVER_ARGS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    c.model_name = c.models.list().data[0].id
    return c


def _check_calls(calls, names=None):
    assert calls, "expected tool calls"
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        assert c.function.name in (names or SCHEMAS)
        validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def test_required_and_named_calls_parse_and_validate(client):
    r = client.chat.completions.create(model=client.model_name, messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=150, n=3, temperature=1.0, seed=3, parallel_tool_calls=False)
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls", ch
        assert len(ch.message.tool_calls) == 1
        _check_calls(ch.message.tool_calls)
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(model=client.model_name, messages=ASK, tools=TOOLS, tool_choice=named,
                                       max_tokens=150, temperature=0)
    _check_calls(r.choices[0].message.tool_calls, ["get_time"])


def test_streamed_call_concatenates_to_the_non_streamed_one(client):
    kw = dict(model=client.model_name, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=150,
              temperature=0, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kw).choices[0]
    names, args, finish = {}, {}, None
    for chunk in client.chat.completions.create(**kw, stream=True):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        for tc in d.tool_calls or []:
            if tc.function.name:
                names[tc.index] = tc.function.name
            args[tc.index] = args.get(tc.index, "") + (tc.function.arguments or "")
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" == whole.finish_reason
    assert [(names[i], args[i]) for i in sorted(names)] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]


def test_auto_parses_a_call_and_follow_up_turn_renders(client):
    # the model writes a call in the parser's format (a regex makes sure of it): auto parses it
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    regex = call.replace("{", r"\{").replace("}", r"\}").replace(".", r"\.")
    r = client.chat.completions.create(model=client.model_name, messages=ASK, tools=TOOLS, max_tokens=60,
                                       temperature=0, extra_body={"guided_regex": regex})
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None
    _check_calls(ch.message.tool_calls, ["get_weather"])
    tc = ch.message.tool_calls[0]
    follow = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": tc.id, "type": "function", "function": {"name": tc.function.name, "arguments": tc.function.arguments}}]},
        {"role": "tool", "tool_call_id": tc.id, "content": '{"temperature": 21, "sky": "clear"}'}]
    r = client.chat.completions.create(model=client.model_name, messages=follow, tools=TOOLS, max_tokens=30,
                                       temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # tool_choice none: plain text, no calls
    r = client.chat.completions.create(model=client.model_name, messages=ASK, tools=TOOLS, tool_choice="none",
                                       max_tokens=10, temperature=0)
    assert r.choices[0].message.tool_calls in (None, []) and r.choices[0].message.content


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]},
     "tools.0.function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages.0.tool_calls"),
])
def test_bad_tool_fields_are_400(server, client, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": client.model_name, "messages": ASK, "max_tokens": 5, **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
