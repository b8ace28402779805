"""`POST /v1/responses`: OpenAI's Responses API, stateless, over the chat-completions path.

What agents (Codex and others) speak. `input` (a string, or items: messages whose content is a
string or `input_text` / `output_text` parts, `function_call` and `function_call_output`) and
`instructions` become a conversation rendered with the chat template, checked and run exactly as
a chat completion (app.py's submit / collect; function tools, `tool_choice` and
`parallel_tool_calls` through tools.py, the server's `--tool-call-parser`), and answered as a
`response` object whose output is an assistant message and/or `function_call` items
(responses_output.py); with `stream` as the documented server-sent events (`response.created`
... `response.completed`, or `response.incomplete` when `max_output_tokens` cut the text).
`text.format` `json_schema` or `json_object` decodes under that constraint
(SamplingParams.structured_outputs; an invalid schema is a 400 naming `text.format.schema`).
Nothing is stored: `previous_response_id` and `conversation` are refused (400) rather than
silently ignored, as is `background`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from ..structured import StructuredOutputsParams
from .async_engine import EngineDeadError
from .preprocess import Preprocessor
from .protocol import APIError, error_from_validation, error_from_value
from .responses_output import OutputBuilder, sse
from .structured_api import build
from .tools import ToolSetup, ToolStream, call_grammar, parse_tools, render_messages


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(_Strict):
    """A message item (`type` may be left out: OpenAI's "easy" input message)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[TextPart]

    def as_template_message(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class FunctionCallItem(_Strict):
    """An earlier turn's tool call (as this API answered it)."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutput(_Strict):
    """A tool's result for one call."""

    type: Literal["function_call_output"]
    call_id: str
    output: str = Field(min_length=1)
    id: str | None = None
    status: str | None = None


class TextFormat(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str


class TextConfig(_Strict):
    format: TextFormat | None = None


_ITEMS = {"message": TypeAdapter(InputMessage), "function_call": TypeAdapter(FunctionCallItem),
          "function_call_output": TypeAdapter(FunctionCallOutput)}
_PART_TYPES = ("input_text", "output_text")


class ResponsesRequest(_Strict):
    model: str | None = None
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool = False
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    tools: list[Any] | None = None  # function tools: {"type": "function", "name", "description", "parameters"}
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "name"}
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    def check(self) -> None:
        if self.previous_response_id is not None:
            raise APIError(400, "previous_response_id: this server stores no responses; send the whole "
                                "conversation in 'input'", param="previous_response_id")
        if self.conversation is not None:
            raise APIError(400, "conversation: this server stores no conversations; send the whole "
                                "conversation in 'input'", param="conversation")
        if self.background:
            raise APIError(400, "background: not supported by this server", param="background")

    def tool_setup(self) -> ToolSetup:
        """The function tools and tool_choice, checked by tools.py in the chat form (its 400s renamed
        to this API's fields: `tools.0.name`, `tool_choice.name`)."""
        tools = None
        if self.tools is not None:
            tools = []
            for i, t in enumerate(self.tools):
                if not isinstance(t, dict) or t.get("type") != "function":
                    kind = t.get("type") if isinstance(t, dict) else type(t).__name__
                    raise APIError(400, f"tools.{i}.type: only function tools are supported, got {kind!r}",
                                   param=f"tools.{i}.type")
                if t.get("strict") is not None and not isinstance(t["strict"], bool):
                    raise APIError(400, f"tools.{i}.strict: must be a boolean", param=f"tools.{i}.strict")
                fn = {k: t[k] for k in ("name", "description", "parameters") if k in t and t[k] is not None}
                tools.append({"type": "function", "function": fn})
        choice = self.tool_choice
        if isinstance(choice, dict) and choice.get("type") == "function":
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        try:
            return parse_tools(tools, choice, self.parallel_tool_calls)
        except APIError as exc:
            param = (exc.param or "").replace(".function.", ".", 1)
            msg = exc.message.replace(exc.param or "", param, 1) if exc.param else exc.message
            raise APIError(exc.status, msg, param=param or None) from None

    def constraint(self, setup: ToolSetup, parser: str) -> StructuredOutputsParams | None:
        """A required or named tool call's grammar, else text.format's."""
        fmt = self.structured_outputs()
        if not setup.forced:
            return fmt
        if fmt is not None:
            raise APIError(400, "tool_choice: a required or named tool call cannot be combined with a "
                                "text.format schema", param="tool_choice")
        return build("tool_choice", grammar=call_grammar(parser, setup.forced, setup.parallel))

    @property
    def format(self) -> dict:
        """text.format as sent (the response echoes it); plain text when absent."""
        fmt = self.text.format if self.text is not None else None
        return {"type": "text"} if fmt is None else fmt.model_dump()

    def structured_outputs(self) -> StructuredOutputsParams | None:
        """text.format as a decoding constraint: json_schema (`name`, `schema`, `strict`; the output
        always follows the schema) or json_object; plain text is none."""
        fmt = self.format
        kind = fmt["type"]
        if kind == "text":
            return None
        if kind == "json_object":
            return StructuredOutputsParams(json_object=True, field_name="text.format")
        if kind != "json_schema":
            raise APIError(400, f"text.format.type: must be text, json_schema or json_object, got {kind!r}",
                           param="text.format.type")
        for name, types, what in (("name", str, "a string"), ("strict", bool, "a boolean")):
            if fmt.get(name) is not None and not isinstance(fmt[name], types):
                raise APIError(400, f"text.format.{name}: must be {what}", param=f"text.format.{name}")
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise APIError(400, "text.format.schema: must be a JSON Schema object", param="text.format.schema")
        try:
            return StructuredOutputsParams(json=schema, field_name="text.format")
        except ValueError as exc:
            msg = " ".join(str(exc).split()).replace("text.format.json", "text.format.schema", 1)
            raise APIError(400, msg, param="text.format.schema") from None

    def messages(self) -> list[dict]:
        """`instructions` as a system message, then the input as chat messages: function calls
        join the assistant turn before them (or make one), outputs are `tool` messages."""
        out = [{"role": "system", "content": self.instructions}] if self.instructions is not None else []
        if isinstance(self.input, str):
            return out + [{"role": "user", "content": self.input}]
        if not self.input:
            raise APIError(400, "input: must not be empty", param="input")
        for i, raw in enumerate(self.input):
            item = _item_of(i, raw)
            if isinstance(item, InputMessage):
                out.append(item.as_template_message())
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if out and out[-1]["role"] == "assistant":
                    out[-1].setdefault("tool_calls", []).append(call)
                else:
                    out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            else:
                out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        return out

    def sampling_params(self, constraint: StructuredOutputsParams | None) -> SamplingParams:
        kw: dict[str, Any] = {"max_tokens": self.max_output_tokens, "structured_outputs": constraint}
        for name in ("temperature", "top_p"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        try:
            return SamplingParams(**kw)
        except (ValueError, TypeError) as exc:
            raise error_from_value(exc) from None


def _item_of(i: int, item: Any) -> InputMessage | FunctionCallItem | FunctionCallOutput:
    """One input item, or a 400 naming it (`input.3.content.0.type`)."""
    kind = "message"
    if isinstance(item, dict):
        kind = item.get("type", "message")
        if kind not in _ITEMS:
            raise APIError(400, f"input.{i}.type: {kind!r} items are not supported (only {', '.join(_ITEMS)})",
                           param=f"input.{i}.type")
        content = item.get("content") if kind == "message" else None
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") not in _PART_TYPES:
                    raise APIError(400, f"input.{i}.content.{j}.type: {part.get('type')!r} parts are not "
                                        f"supported (only {' and '.join(_PART_TYPES)})",
                                   param=f"input.{i}.content.{j}.type")
    try:
        return _ITEMS[kind].validate_python(item)
    except ValidationError as exc:
        err = error_from_validation(exc)
        param = f"input.{i}" + (f".{err.param}" if err.param else "")
        raise APIError(400, f"{param}: {err.message.split(': ', 1)[-1]}", param=param) from None


class Engine(Protocol):
    """What a response needs from app.py's server: the chat-completions path."""

    config: Any  # ServerConfig: its tool_call_parser
    preprocessor: Preprocessor  # its rules hold the tokenizer (the chat template)

    async def submit(self, prefix: str, model: str | None, prompts: list, params: SamplingParams,
                     prompt_param: str) -> Any: ...
    async def collect(self, job: Any, request: Request) -> None: ...
    async def next_output(self, job: Any) -> RequestOutput: ...
    def event_stream(self, gen: AsyncIterator[str], job: Any) -> Response: ...


async def create_response(engine: Engine, req: ResponsesRequest, request: Request) -> Response:
    req.check()
    parser = engine.config.tool_call_parser
    setup = req.tool_setup()
    params = req.sampling_params(req.constraint(setup, parser))
    try:
        messages, tool_specs = render_messages(req.messages(), setup, parser,
                                               engine.preprocessor.rules.inputs.tokenizer.chat_template)
        prompt = (messages, True) + ((tool_specs,) if tool_specs else ())
        job = await engine.submit("resp", req.model, [prompt], params, "input")
    except APIError as exc:
        raise _as_input_error(exc) from None
    ids = _Ids(resp=f"resp_{uuid.uuid4().hex}", msg=f"msg_{uuid.uuid4().hex}", created=time.time(),
               model=job.meta.model)
    if req.stream:
        return engine.event_stream(_stream(engine, job, req, ids, setup, parser), job)
    await engine.collect(job, request)
    if not job.done:
        return Response(status_code=499)
    comp = job.finals[job.request_ids[0]].outputs[0]
    status = "incomplete" if comp.finish_reason == "length" else "completed"
    builder = OutputBuilder(ids.msg)
    if setup.active:
        builder.feed(ToolStream(parser, setup.tools).feed(comp.text, True))
    else:
        builder.open_message()
        builder.feed([{"content": comp.text}])
    builder.close(status)
    return JSONResponse(_response(ids, req, params, status, builder.output(),
                                  _usage(len(job.prompts[0].token_ids), len(comp.token_ids))))


_RENAMED = {"messages": "input", "max_tokens": "max_output_tokens"}


def _as_input_error(exc: APIError) -> APIError:
    """Preprocessing names the conversation 'messages' and the output bound 'max_tokens'; here they
    are 'input' and 'max_output_tokens' (a message's index counts `instructions` as the first)."""
    head, _, rest = (exc.param or "").partition(".")
    name = _RENAMED.get(head)
    if name is None:
        return exc
    param = name + (f".{rest}" if rest else "")
    msg = param + exc.message[len(exc.param):] if exc.message.startswith(exc.param) else exc.message
    return APIError(exc.status, msg, param=param, type_=exc.type, code=exc.code)


@dataclass(frozen=True)
class _Ids:
    """What every event of one response repeats."""

    resp: str
    msg: str
    created: float
    model: str


def _response(ids: _Ids, req: ResponsesRequest, params: SamplingParams, status: str, output: list,
              usage: dict | None) -> dict:
    return {"id": ids.resp, "object": "response", "created_at": ids.created, "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": ids.model,
            "output": output, "parallel_tool_calls": req.parallel_tool_calls, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False, "temperature": params.temperature,
            "text": {"format": req.format}, "tool_choice": req.tool_choice if req.tool_choice is not None else "auto",
            "tools": req.tools or [], "top_p": params.top_p,
            "truncation": "disabled", "usage": usage, "user": req.user, "metadata": req.metadata or {}}


def _usage(prompt_tokens: int, output_tokens: int) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}


async def _stream(engine: Engine, job: Any, req: ResponsesRequest, ids: _Ids, setup: ToolSetup,
                  parser: str) -> AsyncIterator[str]:
    seq = 0

    def event(kind: str, **payload: Any) -> str:
        nonlocal seq
        seq += 1
        return sse(kind, seq - 1, payload)

    running = _response(ids, req, job.params, "in_progress", [], None)
    yield event("response.created", response=running)
    yield event("response.in_progress", response=running)
    builder = OutputBuilder(ids.msg, event)
    tools = ToolStream(parser, setup.tools) if setup.active else None
    if tools is None:
        for e in builder.open_message():
            yield e
    sent, comp = 0, None
    try:
        while not job.done:
            out = await engine.next_output(job)
            comp = out.outputs[0]
            finished = comp.finish_reason is not None
            if len(comp.text) == sent and not finished:
                continue
            deltas = tools.feed(comp.text, finished) if tools else [{"content": comp.text[sent:]}]
            sent = len(comp.text)
            for e in builder.feed(deltas):
                yield e
    except EngineDeadError as exc:
        yield event("error", code="service_unavailable", message=str(exc), param=None)
        return
    status = "incomplete" if comp is not None and comp.finish_reason == "length" else "completed"
    for e in builder.close(status):
        yield e
    done = _response(ids, req, job.params, status, builder.output(),
                     _usage(len(job.prompts[0].token_ids), len(comp.token_ids) if comp else 0))
    yield event(f"response.{status}", response=done)
