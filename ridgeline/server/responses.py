"""`POST /v1/responses`: OpenAI's Responses API, stateless, over the chat-completions path.

What agents (Codex and others) speak. `input` (a string, or message items whose content is a
string or `input_text` / `output_text` parts) and `instructions` become a conversation rendered
with the chat template, checked and run exactly as a chat completion (app.py's submit / collect),
and answered as a `response` object whose output is one assistant message; with `stream` as the
documented server-sent events (`response.created` ... `response.completed`, or
`response.incomplete` when `max_output_tokens` cut the text). `text.format` `json_schema` or
`json_object` decodes under that constraint (SamplingParams.structured_outputs; an invalid
schema is a 400 naming `text.format.schema`). Nothing is stored: `previous_response_id` and
`conversation` are refused (400) rather than silently ignored, as are `background` and (not
supported yet) `tools`.
"""

from __future__ import annotations

import json
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
from .protocol import APIError, error_from_validation, error_from_value


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


class TextFormat(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str


class TextConfig(_Strict):
    format: TextFormat | None = None


_MESSAGE = TypeAdapter(InputMessage)
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
    tools: list[Any] | None = None
    tool_choice: Any = None
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
        if self.tools:
            raise APIError(400, "tools: not supported yet by /v1/responses", param="tools")

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
        """`instructions` as a system message, then the input as chat messages."""
        head = [{"role": "system", "content": self.instructions}] if self.instructions is not None else []
        if isinstance(self.input, str):
            return head + [{"role": "user", "content": self.input}]
        if not self.input:
            raise APIError(400, "input: must not be empty", param="input")
        return head + [_message(i, item).as_template_message() for i, item in enumerate(self.input)]

    def sampling_params(self) -> SamplingParams:
        kw: dict[str, Any] = {"max_tokens": self.max_output_tokens, "structured_outputs": self.structured_outputs()}
        for name in ("temperature", "top_p"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        try:
            return SamplingParams(**kw)
        except (ValueError, TypeError) as exc:
            raise error_from_value(exc) from None


def _message(i: int, item: Any) -> InputMessage:
    """One input item as a message, or a 400 naming it (`input.3.content.0.type`)."""
    if isinstance(item, dict):
        kind = item.get("type", "message")
        if kind != "message":
            raise APIError(400, f"input.{i}.type: {kind!r} items are not supported (only messages)",
                           param=f"input.{i}.type")
        content = item.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") not in _PART_TYPES:
                    raise APIError(400, f"input.{i}.content.{j}.type: {part.get('type')!r} parts are not "
                                        f"supported (only {' and '.join(_PART_TYPES)})",
                                   param=f"input.{i}.content.{j}.type")
    try:
        return _MESSAGE.validate_python(item)
    except ValidationError as exc:
        err = error_from_validation(exc)
        param = f"input.{i}" + (f".{err.param}" if err.param else "")
        raise APIError(400, f"{param}: {err.message.split(': ', 1)[-1]}", param=param) from None


class Engine(Protocol):
    """What a response needs from app.py's server: the chat-completions path."""

    async def submit(self, prefix: str, model: str | None, prompts: list, params: SamplingParams,
                     prompt_param: str) -> Any: ...
    async def collect(self, job: Any, request: Request) -> None: ...
    async def next_output(self, job: Any) -> RequestOutput: ...
    def event_stream(self, gen: AsyncIterator[str], job: Any) -> Response: ...


async def create_response(engine: Engine, req: ResponsesRequest, request: Request) -> Response:
    req.check()
    params = req.sampling_params()
    messages = req.messages()
    try:
        job = await engine.submit("resp", req.model, [(messages, True)], params, "input")
    except APIError as exc:
        raise _as_input_error(exc) from None
    rid = job.request_ids[0]
    ids = _Ids(resp=f"resp_{uuid.uuid4().hex}", msg=f"msg_{uuid.uuid4().hex}", created=time.time(),
               model=job.meta.model)
    if req.stream:
        return engine.event_stream(_stream(engine, job, req, ids), job)
    await engine.collect(job, request)
    if not job.done:
        return Response(status_code=499)
    comp = job.finals[rid].outputs[0]
    status = "incomplete" if comp.finish_reason == "length" else "completed"
    item = _item(ids.msg, comp.text, status)
    return JSONResponse(_response(ids, req, params, status, [item],
                                  _usage(len(job.prompts[0].token_ids), len(comp.token_ids))))


_RENAMED = {"messages": "input", "max_tokens": "max_output_tokens"}


def _as_input_error(exc: APIError) -> APIError:
    """Preprocessing names the conversation 'messages' and the output bound 'max_tokens'; here they
    are 'input' and 'max_output_tokens'."""
    name = _RENAMED.get(exc.param or "")
    if name is None:
        return exc
    msg = name + exc.message[len(exc.param):] if exc.message.startswith(exc.param) else exc.message
    return APIError(exc.status, msg, param=name, type_=exc.type, code=exc.code)


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
            "output": output, "parallel_tool_calls": False, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False, "temperature": params.temperature,
            "text": {"format": req.format}, "tool_choice": "none", "tools": [], "top_p": params.top_p,
            "truncation": "disabled", "usage": usage, "user": req.user, "metadata": req.metadata or {}}


def _item(msg_id: str, text: str, status: str) -> dict:
    return {"id": msg_id, "type": "message", "status": status, "role": "assistant",
            "content": [_part(text)] if status != "in_progress" else []}


def _part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(prompt_tokens: int, output_tokens: int) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}


async def _stream(engine: Engine, job: Any, req: ResponsesRequest, ids: _Ids) -> AsyncIterator[str]:
    params, seq = job.params, 0
    where = {"item_id": ids.msg, "output_index": 0, "content_index": 0}

    def event(kind: str, **payload: Any) -> str:
        nonlocal seq
        body = {"type": kind, "sequence_number": seq, **payload}
        seq += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

    running = _response(ids, req, params, "in_progress", [], None)
    yield event("response.created", response=running)
    yield event("response.in_progress", response=running)
    yield event("response.output_item.added", output_index=0, item=_item(ids.msg, "", "in_progress"))
    yield event("response.content_part.added", **where, part=_part(""))
    sent, comp = 0, None
    try:
        while not job.done:
            out = await engine.next_output(job)
            comp = out.outputs[0]
            if len(comp.text) > sent:
                yield event("response.output_text.delta", **where, delta=comp.text[sent:], logprobs=[])
                sent = len(comp.text)
    except EngineDeadError as exc:
        yield event("error", code="service_unavailable", message=str(exc), param=None)
        return
    text = comp.text if comp is not None else ""
    status = "incomplete" if comp is not None and comp.finish_reason == "length" else "completed"
    item = _item(ids.msg, text, status)
    yield event("response.output_text.done", **where, text=text, logprobs=[])
    yield event("response.content_part.done", **where, part=_part(text))
    yield event("response.output_item.done", output_index=0, item=item)
    done = _response(ids, req, params, status, [item], _usage(len(job.prompts[0].token_ids), len(comp.token_ids)))
    yield event(f"response.{status}", response=done)
