"""OpenAI request schemas and their translation to SamplingParams.

The models are strict (no "5" for 5, no 1 for true) so a wrongly typed field is a 400 that
names the field instead of a silent coercion. Unknown fields are ignored, as vLLM does, so
clients that send extras (e.g. `stream_options` on a non-streaming call) still work.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from ..sampling_params import SamplingParams

MAX_N = 64  # samples per prompt; more is refused (each sample is a full sequence in the batch)
MAX_SEQUENCES = 256  # prompts x n in one request
INT64 = 2**63
MAX_LOGPROBS = 20
MAX_STOP = 64  # stop strings and stop token ids are checked after every token: bound the work per step


class APIError(Exception):
    """An error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        message, param = _encodable(message), _encodable(param)
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _encodable(text: str | None) -> str | None:
    """Lone surrogates from the request (echoed in a message or a field path) as escapes, so the
    error body can always be encoded as UTF-8."""
    return text if text is None or text.isascii() else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_from_validation(exc: ValidationError) -> APIError:
    """First pydantic error as a 400 whose message starts with the field path."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    # Union members show up in loc as type names ('str', 'list[int]'); keep field names and indices.
    path = [p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool")]
    param = ".".join(path) or None
    msg = err.get("msg", "invalid value")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param)


def error_from_value(exc: Exception, fallback_param: str | None = None) -> APIError:
    """ValueError/TypeError from SamplingParams or the engine: their messages start with the field name."""
    msg = " ".join(str(exc).split())
    head = msg.split(" ", 1)[0].strip(":,")
    param = head if head in _KNOWN_PARAMS else fallback_param
    return APIError(400, msg, param=param)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingFields(_Strict):
    """Fields shared by both endpoints (OpenAI's plus vLLM's extras)."""

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-INT64, lt=INT64)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extras
    top_k: int | None = Field(default=None, ge=-1, lt=2**31)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, lt=2**31)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # constrained decoding (structured_api.py checks them): OpenAI's, then vLLM's
    response_format: Any = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None

    def constraint(self):
        """The StructuredOutputsParams these fields ask for, or None (a 400 if invalid)."""
        from .structured_api import structured_outputs

        return structured_outputs(self)

    def _sampling(self, max_tokens: int | None, logprobs: int | None,
                  prompt_logprobs: int | None = None) -> SamplingParams:
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) > MAX_STOP:
                raise APIError(400, f"{name}: at most {MAX_STOP} entries, got {len(value)}", param=name)
        kw: dict[str, Any] = dict(
            n=self.n, stop=self.stop, seed=self.seed, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            stop_token_ids=self.stop_token_ids, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, max_tokens=max_tokens,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, structured_outputs=self.constraint())
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        try:
            return SamplingParams(**kw)
        except (ValueError, TypeError) as exc:
            raise error_from_value(exc) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # 0 (with echo): score the prompt, generate nothing
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of single prompts (a string or a list of token ids each)."""
        p = self.prompt
        if isinstance(p, str):
            items: list = [p]
        elif not p:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        elif isinstance(p[0], int):
            items = [p]
        else:
            items = list(p)
        for i, item in enumerate(items):
            if len(item) == 0:
                raise APIError(400, f"prompt: prompt {i} is empty", param="prompt")
        if len(items) * self.n > MAX_SEQUENCES:
            raise APIError(400, f"prompt: {len(items)} prompts x n={self.n} exceeds {MAX_SEQUENCES} sequences "
                                f"per request", param="prompt")
        return items

    def sampling_params(self) -> SamplingParams:
        if self.suffix is not None:
            raise APIError(400, "suffix: not supported by this server", param="suffix")
        prompt_lp = self.logprobs if (self.echo and self.logprobs is not None) else None
        max_tokens = self.max_tokens
        if self.score_only:
            if not self.echo:
                raise APIError(400, "max_tokens: 0 is only allowed with echo=true (to score the prompt)",
                               param="max_tokens")
            if self.min_tokens:
                raise APIError(400, "min_tokens: must be 0 when max_tokens is 0", param="min_tokens")
            max_tokens = 1  # the engine samples one token after the prefill; the handler drops it
        return self._sampling(max_tokens, self.logprobs, prompt_lp)

    @property
    def score_only(self) -> bool:
        """max_tokens=0: the prompt (and with logprobs its tokens' logprobs) comes back, no completion."""
        return self.max_tokens == 0


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None  # None: an assistant turn of only tool_calls
    name: str | None = None
    tool_calls: Any = None  # assistant: [{"id", "type": "function", "function": {"name", "arguments"}}]
    tool_call_id: str | None = None  # tool: the call this message answers

    def as_template_message(self) -> dict:
        c = self.content
        text = c if isinstance(c, str) else "" if c is None else "".join(p.text for p in c)
        msg = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls is not None:
            msg["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        return msg


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    tools: Any = None  # [{"type": "function", "function": {"name", "description", "parameters"}}]; tools.py
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool = True
    _tool_call_parser: str = PrivateAttr(default="hermes")  # the server's --tool-call-parser, set by app.py
    _tool_setup: Any = PrivateAttr(default=None)  # tools.ToolSetup, once checked

    def constraint(self):
        """tool_choice "required" or a named function: the tool-call grammar; else the fields'."""
        from .tools import chat_constraint

        return chat_constraint(self)

    def sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs: requires logprobs to be true", param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        lp = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(max_tokens, lp)


_KNOWN_PARAMS = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields) | {
    "prompt_token_ids", "max_model_len", "stop_token_ids", "request_id"}


@dataclass
class RequestMeta:
    """What every response of one request shares: its id, creation time and model name."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> "RequestMeta":
        return cls(id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=model)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
