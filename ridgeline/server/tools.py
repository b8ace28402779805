"""Tool calling for chat completions: `tools`, `tool_choice`, `parallel_tool_calls`.

Rendering: a chat template that knows tools (it mentions `tools`) gets them as
`apply_chat_template(tools=...)`, with the conversation's tool calls and `tool` messages as they
are. A template without a tool section (SmolLM2's) gets the fallback: the parser's instructions
and the tool signatures appended to the system message (FALLBACK_* below), earlier assistant tool
calls written back in the parser's format, and `tool` messages as user turns
(`<tool_response>...</tool_response>` for hermes).

Parsing: the output is split into content and tool calls by the server's `--tool-call-parser`:
`hermes` (Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks) or
`llama3` (Llama 3.1's JSON: `{"name": ..., "parameters": {...}}`, several joined by `;`). One
incremental parser (ToolStream) serves streaming and non-streaming answers, so a streamed
call's deltas concatenate to the non-streamed one.

Enforcement: `tool_choice` "required" or a named function constrains decoding with a grammar of
the parser's format whose arguments follow each tool's `parameters` schema (llguidance's %json),
so the arguments always parse and validate. "auto" leaves the model free and parses what it
wrote; "none" renders no tools and parses nothing.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..structured import StructuredOutputsParams
from ..structured.params import JSON_OPTIONS
from .protocol import APIError
from .structured_api import build, structured_outputs

PARSERS = ("hermes", "llama3")
MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")

FALLBACK_HERMES = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
    "</tool_call>")
FALLBACK_LLAMA3 = (
    "Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\n\nRespond in the format {{\"name\": function name, \"parameters\": "
    "dictionary of argument name and its value}}. Do not use variables.\n\n{tools}")


@dataclass
class Tool:
    name: str
    description: str | None
    parameters: dict

    def spec(self) -> dict:
        fn: dict[str, Any] = {"name": self.name}
        if self.description:
            fn["description"] = self.description
        fn["parameters"] = self.parameters
        return {"type": "function", "function": fn}


@dataclass
class ToolSetup:
    """What a chat request's tool fields amount to."""

    tools: list[Tool]  # rendered and parsed (empty: tool calling is off)
    choice: str  # "none" | "auto" | "required" | "named"
    named: str | None = None
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> list[Tool]:
        """The tools decoding is constrained to (empty for auto / none)."""
        if self.choice == "required":
            return self.tools
        if self.choice == "named":
            return [t for t in self.tools if t.name == self.named]
        return []


def parse_tools(raw: Any, tool_choice: Any, parallel: bool) -> ToolSetup:
    """The request's tools and tool_choice, checked (400s name the field)."""
    tools: list[Tool] = []
    if raw is not None:
        if not isinstance(raw, list):
            raise APIError(400, "tools: must be a list of {type: function, function: {...}}", param="tools")
        if len(raw) > MAX_TOOLS:
            raise APIError(400, f"tools: at most {MAX_TOOLS} tools", param="tools")
        for i, t in enumerate(raw):
            p = f"tools.{i}"
            if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
                raise APIError(400, f"{p}: must be {{\"type\": \"function\", \"function\": {{...}}}}", param=p)
            fn = t["function"]
            name = fn.get("name")
            if not isinstance(name, str) or not _NAME.match(name):
                raise APIError(400, f"{p}.function.name: must be 1-64 letters, digits, _ . or -",
                               param=f"{p}.function.name")
            if any(x.name == name for x in tools):
                raise APIError(400, f"{p}.function.name: duplicate tool name {name!r}", param=f"{p}.function.name")
            desc = fn.get("description")
            if desc is not None and not isinstance(desc, str):
                raise APIError(400, f"{p}.function.description: must be a string", param=f"{p}.function.description")
            params = fn.get("parameters", {"type": "object", "properties": {}})
            if not isinstance(params, dict):
                raise APIError(400, f"{p}.function.parameters: must be a JSON Schema object",
                               param=f"{p}.function.parameters")
            build(f"{p}.function.parameters", json=params)  # a 400 if it does not compile
            tools.append(Tool(name, desc, params))
    choice, named = "auto" if tools else "none", None
    if tool_choice is not None:
        if isinstance(tool_choice, str):
            if tool_choice not in ("none", "auto", "required"):
                raise APIError(400, "tool_choice: must be none, auto, required or {type: function, function: {name}}",
                               param="tool_choice")
            choice = tool_choice
        elif isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(
                tool_choice.get("function"), dict) and isinstance(tool_choice["function"].get("name"), str):
            choice, named = "named", tool_choice["function"]["name"]
            if not any(t.name == named for t in tools):
                raise APIError(400, f"tool_choice.function.name: no tool named {named!r} in tools",
                               param="tool_choice.function.name")
        else:
            raise APIError(400, "tool_choice: must be none, auto, required or {type: function, function: {name}}",
                           param="tool_choice")
        if choice in ("auto", "required") and not tools:
            raise APIError(400, f"tool_choice: {choice!r} needs tools", param="tool_choice")
    return ToolSetup(tools, choice, named, parallel)


# ---------------------------------------------------------------------- grammars


def _call_schema(tool: Tool, args_key: str) -> dict:
    return {"type": "object", "properties": {"name": {"const": tool.name}, args_key: tool.parameters},
            "required": ["name", args_key], "additionalProperties": False}


def call_grammar(parser: str, tools: list[Tool], parallel: bool) -> str:
    """A Lark grammar (llguidance's dialect) of one or (parallel) more calls of `tools` in the
    parser's format."""
    args_key = "arguments" if parser == "hermes" else "parameters"
    schema = {"anyOf": [_call_schema(t, args_key) for t in tools]} if len(tools) > 1 else _call_schema(tools[0], args_key)
    schema["x-guidance"] = JSON_OPTIONS
    body = "body: %json " + json.dumps(schema)
    if parser == "hermes":
        call = 'call: "<tool_call>\\n" body "\\n</tool_call>"'
        start = 'start: call ("\\n" call)*' if parallel else "start: call"
    else:
        call = "call: body"
        start = 'start: call ("; " call)*' if parallel else "start: call"
    return "\n".join([start, call, body])


def chat_constraint(req) -> StructuredOutputsParams | None:
    """The request's decoding constraint: the tool-call grammar for "required" / a named tool,
    else what response_format or the guided_* fields ask for."""
    setup = req._tool_setup = parse_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
    other = structured_outputs(req)
    forced = setup.forced
    if not forced:
        return other
    if other is not None:
        raise APIError(400, "tool_choice: a required or named tool call cannot be combined with response_format "
                            "or structured_outputs", param="tool_choice")
    return build("tool_choice", grammar=call_grammar(req._tool_call_parser, forced, setup.parallel))


# ---------------------------------------------------------------------- rendering


def _arguments_dict(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args


def _check_history(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant":
                raise APIError(400, f"messages.{i}.tool_calls: only assistant messages have tool_calls",
                               param=f"messages.{i}.tool_calls")
            if not isinstance(calls, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict)
                    and isinstance(c["function"].get("name"), str) for c in calls):
                raise APIError(400, f"messages.{i}.tool_calls: must be a list of {{id, type, function: {{name, "
                                    f"arguments}}}}", param=f"messages.{i}.tool_calls")
        if m["role"] == "tool" and not m["content"]:
            raise APIError(400, f"messages.{i}.content: a tool message needs content", param=f"messages.{i}.content")


def template_knows_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in chat_template


def render_messages(messages: list[dict], setup: ToolSetup, parser: str,
                    chat_template: str | None) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools for apply_chat_template or None) for the chat template."""
    _check_history(messages)
    native = template_knows_tools(chat_template)
    if native:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"],
                                                      "arguments": _arguments_dict(c["function"].get("arguments"))}}
                                   for c in m["tool_calls"]]
            out.append(m)
        return out, ([t.spec() for t in setup.tools] if setup.active else None)
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [(c["function"]["name"], _arguments_dict(c["function"].get("arguments", {}))) for c in m["tool_calls"]]
            text = "\n".join(filter(None, [m["content"], format_calls(parser, calls)]))
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            body = f"<tool_response>\n{m['content']}\n</tool_response>" if parser == "hermes" else m["content"]
            out.append({"role": "user", "content": body})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if setup.active:
        specs = "\n".join(json.dumps(t.spec(), ensure_ascii=False) for t in setup.tools)
        prompt = (FALLBACK_HERMES if parser == "hermes" else FALLBACK_LLAMA3).format(tools=specs)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


def format_calls(parser: str, calls: list[tuple[str, Any]]) -> str:
    """Calls written in the parser's format (an assistant turn of the history, in the fallback)."""
    if parser == "hermes":
        return "\n".join(f"<tool_call>\n{json.dumps({'name': n, 'arguments': a}, ensure_ascii=False)}\n</tool_call>"
                         for n, a in calls)
    return "; ".join(json.dumps({"name": n, "parameters": a}, ensure_ascii=False) for n, a in calls)


# ---------------------------------------------------------------------- parsing


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_message(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _as_call(obj: Any, args_keys: tuple[str, ...], names: set[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = next((obj[k] for k in args_keys if k in obj), None)
    args = _arguments_dict(args) if isinstance(args, str) else args
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


_OPEN, _CLOSE = "<tool_call>", "</tool_call>"


class ToolStream:
    """Splits one choice's growing text into content and tool calls, as deltas in OpenAI's
    streaming shape. `feed(text, finished)` takes the whole text so far."""

    def __init__(self, parser: str, tools: list[Tool]):
        self.parser = parser
        self.names = {t.name for t in tools}
        self.calls: list[ToolCall] = []
        self.content: list[str] = []
        self._pos = 0  # characters of the text already turned into deltas (or dropped)
        self._in_call = False
        self._after_block = False  # whitespace right after a block is dropped
        self._sep = False  # a block was passed since the last content
        self._json_mode: bool | None = None  # llama3: the output is JSON calls (decided on its first character)

    def feed(self, text: str, finished: bool) -> list[dict]:
        return self._hermes(text, finished) if self.parser == "hermes" else self._llama3(text, finished)

    def _content(self, piece: str, out: list[dict]) -> None:
        if piece:
            if self._sep and self.content:  # text on both sides of a block: a line break between
                piece = "\n" + piece
            self._sep = False
            self.content.append(piece)
            out.append({"content": piece})

    def _call(self, call: ToolCall, out: list[dict]) -> None:
        i = len(self.calls)
        self.calls.append(call)
        out.append({"tool_calls": [{"index": i, "id": call.id, "type": "function",
                                    "function": {"name": call.name, "arguments": ""}}]})
        out.append({"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]})

    def _hermes(self, text: str, finished: bool) -> list[dict]:
        out: list[dict] = []
        while True:
            rest = text[self._pos:]
            if self._in_call:
                block, call = self._block(rest, finished)
                if block is None:
                    return out  # the call is still arriving
                if call is not None:
                    self._call(call, out)
                else:  # not a call of these tools: the block stays text
                    self._content(block, out)
                self._pos += len(block)
                self._in_call, self._after_block, self._sep = False, True, True
                continue
            if self._after_block:
                stripped = rest.lstrip()
                self._pos += len(rest) - len(stripped)
                rest = stripped
                if not rest:
                    return out
                self._after_block = False
            start = rest.find(_OPEN)
            if start >= 0:
                self._content(rest[:start].rstrip(), out)
                self._pos += start
                self._in_call = True
                continue
            if finished:
                self._content(rest, out)
                self._pos = len(text)
                return out
            # hold back trailing whitespace (dropped if a block follows) and a partial "<tool_call>"
            keep = len(rest.rstrip())
            for k in range(min(len(_OPEN) - 1, len(rest)), 0, -1):
                if _OPEN.startswith(rest[-k:]):
                    keep = min(keep, len(rest[:-k].rstrip()))
                    break
            self._content(rest[:keep], out)
            self._pos += keep
            return out

    def _block(self, rest: str, finished: bool) -> tuple[str | None, ToolCall | None]:
        """(the block's text, its call or None) for `rest` starting with <tool_call>, or (None, None)
        while it is incomplete. The JSON is decoded first, so a "</tool_call>" inside one of its
        strings does not end the block."""
        i = len(_OPEN)
        while i < len(rest) and rest[i] in " \n\t\r":
            i += 1
        try:
            obj, end = json.JSONDecoder().raw_decode(rest, i)
        except ValueError:
            obj = end = None
        if end is not None:
            j = end
            while j < len(rest) and rest[j] in " \n\t\r":
                j += 1
            if rest.startswith(_CLOSE, j):
                return rest[:j + len(_CLOSE)], _as_call(obj, ("arguments", "parameters"), self.names)
            if not finished and _CLOSE.startswith(rest[j:]):
                return None, None
        elif not finished:
            return None, None
        close = rest.find(_CLOSE)
        if close < 0:
            return (rest, None) if finished else (None, None)
        return rest[:close + len(_CLOSE)], None

    def _llama3(self, text: str, finished: bool) -> list[dict]:
        out: list[dict] = []
        if self._json_mode is None:
            head = text.lstrip()
            if not head:
                return out
            self._json_mode = head.startswith("{") or head.startswith("<|python_tag|>")
        if not self._json_mode:
            self._content(text[self._pos:], out)
            self._pos = len(text)
            return out
        if not finished:
            return out
        calls = self._llama3_calls(text)
        if calls is None:
            self._content(text, out)
        else:
            for c in calls:
                self._call(c, out)
        self._pos = len(text)
        return out

    def _llama3_calls(self, text: str) -> list[ToolCall] | None:
        s = text.strip().removeprefix("<|python_tag|>").strip()
        dec, calls, i = json.JSONDecoder(), [], 0
        while i < len(s):
            try:
                obj, i = dec.raw_decode(s, i)
            except ValueError:
                return None
            call = _as_call(obj, ("parameters", "arguments"), self.names)
            if call is None:
                return None
            calls.append(call)
            while i < len(s) and s[i] in " \n\t;":
                i += 1
        return calls or None


def parse_output(parser: str, tools: list[Tool], text: str) -> tuple[str | None, list[ToolCall]]:
    """(content or None, tool calls) of a finished choice: the streaming parser run once."""
    ts = ToolStream(parser, tools)
    ts.feed(text, finished=True)
    content = "".join(ts.content)
    return (content or None), ts.calls
