"""Reading a request body within bounds, before any field is validated.

POST bodies must be declared `application/json` (UTF-8): a browser sends `text/plain`, form and
multipart bodies cross-origin without a CORS preflight, so accepting them would let any web page
drive a local server that has no API key (415 otherwise).

Python's int() refuses strings of more than 4,300 digits (a ValueError deep inside json.loads),
a lone UTF-16 surrogate ("\\ud800" is valid JSON) cannot be encoded as UTF-8 when it is echoed
or tokenized, and a body is otherwise read whole into memory. So the body is read with a size
cap (--max-request-bytes; a declared Content-Length over it is refused before any byte is read)
and an idle timeout, integers are parsed with a digit cap, and every string
(keys included) is checked for surrogates and for a length no prompt could have: each answer a
400 naming the field, known or not.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request

from ..engine import LLMEngine
from .protocol import APIError

MAX_BODY_BYTES = 4 << 20  # default of --max-request-bytes: 80 full-context (8k) prompts as token ids
MAX_INT_DIGITS = 64  # every valid integer field (seeds, token ids) has at most 20 digits
BODY_IDLE_TIMEOUT_S = 10.0  # a client that stops sending mid-body is answered 408, not waited on forever
FALLBACK_TOKEN_CHARS = 128  # characters per token when the vocabulary cannot be measured


@dataclass(frozen=True)
class BodyLimits:
    max_string_chars: int
    max_body_bytes: int = MAX_BODY_BYTES
    max_int_digits: int = MAX_INT_DIGITS
    body_idle_timeout_s: float = BODY_IDLE_TIMEOUT_S


def limits_for(engine: LLMEngine, max_body_bytes: int = MAX_BODY_BYTES,
               body_idle_timeout_s: float = BODY_IDLE_TIMEOUT_S) -> BodyLimits:
    """A string longer than (longest token in characters) x (context length) cannot tokenize to
    fewer tokens than the context holds, so refusing it before tokenization rejects nothing valid
    and keeps the engine thread from tokenizing megabytes."""
    tok, longest = engine.tokenizer, 0
    for i in range(engine.model_config.vocab_size):
        try:
            longest = max(longest, len(tok.decode([i])))
        except Exception:  # ids past the tokenizer's vocabulary (padded embeddings)
            continue
    return BodyLimits(max_string_chars=(longest or FALLBACK_TOKEN_CHARS) * engine.max_model_len,
                      max_body_bytes=max_body_bytes, body_idle_timeout_s=body_idle_timeout_s)


class _LongInt:
    """Stands in for an integer literal with too many digits until its field is known."""

    def __init__(self, digits: int):
        self.digits = digits


async def read_json(request: Request, limits: BodyLimits) -> dict:
    """The request's JSON object, or an APIError (400, 408, 413 or 415) that says what is wrong.
    The media type and the declared size are checked before a byte of the body is read."""
    check_content_type(request.scope["headers"])
    return parse_json(await _read_body(request, limits), limits)


def check_content_type(headers: list[tuple[bytes, bytes]]) -> None:
    """415 unless the body is declared `application/json` (parameters allowed; a charset must be UTF-8)."""
    values = [v for k, v in headers if k == b"content-type"]
    if len(values) > 1:
        raise APIError(400, f"Content-Type: the header appears {len(values)} times; send it once")
    value = values[0].decode("latin-1") if values else ""
    media, *params = (part.strip() for part in value.split(";"))
    charset = next((v.strip().strip('"').lower() for k, _, v in (p.partition("=") for p in params)
                    if k.strip().lower() == "charset"), "utf-8")
    if media.lower() != "application/json" or charset not in ("utf-8", "utf8"):
        shown = repr(value if len(value) <= 100 else value[:100] + "...") if value else "none"
        raise APIError(415, f"Content-Type: this route takes 'application/json' (UTF-8), got {shown}",
                       code="unsupported_media_type")


async def _read_body(request: Request, limits: BodyLimits) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and (len(declared) > 20 or int(declared) > limits.max_body_bytes):
        raise _too_large(limits)
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), limits.body_idle_timeout_s)
            except StopAsyncIteration:
                break
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise _too_large(limits)
            chunks.append(chunk)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body stalled: no data for {limits.body_idle_timeout_s:g} s",
                       code="request_timeout") from None
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the request body") from None
    return b"".join(chunks)


def _too_large(limits: BodyLimits) -> APIError:
    return APIError(413, f"the request body exceeds {limits.max_body_bytes} bytes (the server's --max-request-bytes)",
                    code="request_too_large")


def parse_json(raw: bytes, limits: BodyLimits) -> dict:
    digits = limits.max_int_digits

    def parse_int(s: str) -> int | _LongInt:
        n = len(s) - (s[0] == "-")
        return int(s) if n <= digits else _LongInt(n)

    try:
        body = json.loads(raw, parse_int=parse_int)
    except RecursionError:
        raise APIError(400, "invalid JSON body: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the JSON body must be an object, got {type(body).__name__}")
    check_values(body, limits)
    return body


def check_values(body: dict, limits: BodyLimits) -> None:
    """Raise a 400 naming the first field (in document order) holding an over-long integer or an
    over-long or unencodable string. Iterative: nesting is only bounded by the JSON parser."""
    stack: list[tuple[tuple, Any]] = [((), body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            children = []
            for key, child in value.items():
                _check_string(path + (key,), key, limits, "key")
                children.append((path + (key,), child))
            stack.extend(reversed(children))
        elif isinstance(value, list):
            stack.extend((path + (i,), v) for i, v in reversed(list(enumerate(value)))
                         if isinstance(v, (str, dict, list, _LongInt)))
        elif isinstance(value, str):
            _check_string(path, value, limits, "string")
        elif isinstance(value, _LongInt):
            field = _field(path)
            raise APIError(400, f"{field}: an integer of {value.digits} digits is out of range (at most "
                                f"{limits.max_int_digits} digits)", param=field)


def _check_string(path: tuple, s: str, limits: BodyLimits, what: str) -> None:
    if len(s) > limits.max_string_chars:
        field = _field(path)
        raise APIError(400, f"{field}: a {what} of {len(s)} characters is too long (at most "
                            f"{limits.max_string_chars}; longer text cannot fit the context)", param=field)
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as exc:
            field = _field(path)
            raise APIError(400, f"{field}: the {what} holds a lone surrogate {s[exc.start]!r} at position "
                                f"{exc.start}, which is not valid Unicode", param=field) from None


def _field(path: tuple) -> str:
    return ".".join(str(p) for p in path) or "body"
