"""vLLM's tokenizer endpoints: `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`.

What evaluation harnesses probe so that they need no local copy of the tokenizer (lm-eval's
`tokenizer_backend=remote` reads `/tokenizer_info`, then encodes and decodes through the other
two). Request and response shapes follow vLLM's (vllm/entrypoints/serve/tokenize/protocol.py):
`/tokenize` takes a `prompt` string or chat `messages` (with `tools`, rendered exactly as
/v1/chat/completions renders them: tools.py) and answers `{count, max_model_len, tokens[,
token_strs]}`; `/detokenize` takes `tokens` and answers `{prompt}`. Encoding and decoding
run in the preprocessing worker thread (preprocess.py), never in the engine thread or the event
loop. Like the /v1 routes they are behind `--api-key` when one is set.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from .limits import BodyLimits, read_json
from .preprocess import Preprocessor, PromptRules
from .protocol import APIError, ChatMessage, error_from_validation
from .tools import parse_tools, render_messages

# init_kwargs entries that hold the server's paths or loading details, never sent to clients
_PRIVATE_KEYS = {"name_or_path", "vocab_file", "merges_file", "tokenizer_file", "is_local", "local_files_only",
                 "cache_dir", "backend"}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TokenizeRequest(_Strict):
    """Either `prompt` (add_special_tokens defaults to true, as for a completion) or `messages`
    (rendered with the chat template, which holds the special tokens: defaults to false)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False
    tools: Any = None  # as in a chat completion: checked and rendered by tools.py
    tool_choice: Any = None

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "prompt: send exactly one of 'prompt' (a string) or 'messages' (a chat)",
                           param="prompt")
        if self.continue_final_message:
            raise APIError(400, "continue_final_message: not supported by this server",
                           param="continue_final_message")
        if self.messages is not None and not self.messages:
            raise APIError(400, "messages: must not be empty", param="messages")
        if self.messages is None and (self.tools is not None or self.tool_choice is not None):
            raise APIError(400, "tools: only with 'messages'", param="tools")


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def _parse(model: type[BaseModel], body: dict) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise error_from_validation(exc) from None


def tokenize(rules: PromptRules, req: TokenizeRequest, tool_call_parser: str) -> dict:
    """The request's token ids (worker thread). Text is bounded by limits.py (each string) and
    here (a chat's contents together); unlike a prompt, its token count may exceed the context:
    `count` against `max_model_len` is what a client asks /tokenize to learn."""
    inputs = rules.inputs
    tok = inputs.tokenizer
    if req.messages is not None:
        if not tok.chat_template:
            raise APIError(400, "messages: this model has no chat template; send 'prompt' instead", param="messages")
        setup = parse_tools(req.tools, req.tool_choice, True)
        messages, tool_specs = render_messages([m.as_template_message() for m in req.messages], setup,
                                               tool_call_parser, tok.chat_template)
        chars = sum(len(m["content"] or "") for m in messages)
        if chars > rules.max_chars:
            raise APIError(400, f"messages: the conversation holds {chars} characters (at most {rules.max_chars})",
                           param="messages")
        try:
            text = inputs.render_chat(messages, req.add_generation_prompt, tool_specs)
        except Exception as exc:  # jinja raises on conversations the template refuses
            raise APIError(400, f"messages: the chat template rejected the conversation: {exc}",
                           param="messages") from None
        special = bool(req.add_special_tokens)
    else:
        text = req.prompt
        special = True if req.add_special_tokens is None else req.add_special_tokens
    ids = tok.encode(text, add_special_tokens=special)
    out: dict[str, Any] = {"count": len(ids), "max_model_len": rules.max_model_len, "tokens": ids}
    if req.return_token_strs:
        out["token_strs"] = tok.convert_ids_to_tokens(ids)
    return out


def detokenize(rules: PromptRules, req: DetokenizeRequest) -> dict:
    """The text of `tokens`, special tokens kept (so that decode(encode(text)) gives text back)."""
    vocab = rules.inputs.vocab_size
    for i, t in enumerate(req.tokens):
        if not 0 <= t < vocab:
            raise APIError(400, f"tokens.{i}: token id {t} is outside the vocabulary [0, {vocab - 1}]",
                           param=f"tokens.{i}")
    try:
        return {"prompt": rules.inputs.tokenizer.decode(req.tokens)}
    except Exception as exc:  # ids of padded embeddings the tokenizer does not know
        raise APIError(400, f"tokens: cannot be decoded: {exc}", param="tokens") from None


def tokenizer_info(rules: PromptRules) -> dict:
    """vLLM's /tokenizer_info: the tokenizer's configuration (its init kwargs, special tokens as
    strings, file paths left out), `tokenizer_class` and `chat_template`; `model_max_length` is the
    served context length, not the tokenizer's placeholder 1e30."""
    tok = rules.inputs.tokenizer
    info: dict[str, Any] = {}
    for key, value in (getattr(tok, "init_kwargs", None) or {}).items():
        value = _plain(value)
        if key in _PRIVATE_KEYS or value is _SKIP or (isinstance(value, str) and os.path.isabs(value)):
            continue
        info[key] = value
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = getattr(tok, name, None)
        info[name] = token
        info[f"{name}_id"] = getattr(tok, f"{name}_id", None) if token is not None else None
    info.update(tokenizer_class=type(tok).__name__, chat_template=tok.chat_template,
                model_max_length=rules.max_model_len, max_model_len=rules.max_model_len,
                vocab_size=rules.inputs.vocab_size)
    return info


_SKIP = object()


def _plain(value: Any) -> Any:
    """JSON-ready: AddedToken as its text, containers recursively; anything else is left out."""
    if hasattr(value, "content") and isinstance(getattr(value, "content"), str):
        return value.content
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        items = {str(k): _plain(v) for k, v in value.items()}
        return {k: v for k, v in items.items() if v is not _SKIP}
    if isinstance(value, (list, tuple)):
        return [v for v in map(_plain, value) if v is not _SKIP]
    return _SKIP


def add_tokenizer_routes(app: FastAPI, preprocessor: Preprocessor, limits: BodyLimits,
                         check_model: Callable[[str | None], None], tool_call_parser: str) -> None:
    rules = preprocessor.rules
    info = tokenizer_info(rules)  # read once: the tokenizer does not change while serving

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> JSONResponse:
        req = _parse(TokenizeRequest, await read_json(request, limits))
        req.check()
        check_model(req.model)
        return JSONResponse(await preprocessor.run(tokenize, rules, req, tool_call_parser))

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> JSONResponse:
        req = _parse(DetokenizeRequest, await read_json(request, limits))
        check_model(req.model)
        return JSONResponse(await preprocessor.run(detokenize, rules, req))

    @app.get("/tokenizer_info")
    async def tokenizer_info_route() -> JSONResponse:
        return JSONResponse(info)
