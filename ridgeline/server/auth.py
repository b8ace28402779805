"""API-key check on /v1 routes and the tokenizer endpoints (`--api-key`).

The key is compared with the header as bytes, the key encoded as UTF-8, in constant time: the
header is never decoded (reading it as latin-1 and encoding it again turns a UTF-8 `sécret` into
`sÃ©cret`, which never matches). A request with two Authorization headers is refused: which one
counts would depend on the reader (a proxy may check the first, a dict keeps the last).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from fastapi.responses import JSONResponse

from .protocol import APIError

_SPACE = b" \t"
PROTECTED_PREFIXES = ("/v1", "/tokenize", "/detokenize")  # /tokenize also covers /tokenizer_info


def check_bearer(values: list[bytes], key: bytes) -> APIError | None:
    """None when the Authorization values hold exactly one `Bearer <key>`, else the error to answer."""
    if not values:
        return APIError(401, "missing API key: send 'Authorization: Bearer KEY'", type_="authentication_error",
                        code="invalid_api_key")
    if len(values) > 1:
        return APIError(400, f"Authorization: the header appears {len(values)} times; send one "
                             "'Authorization: Bearer KEY'", code="duplicate_header")
    scheme, _, token = values[0].strip(_SPACE).partition(b" ")
    if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(_SPACE), key):
        return APIError(401, "incorrect API key provided", type_="authentication_error", code="invalid_api_key")
    return None


class APIKeyMiddleware:
    """Plain ASGI (BaseHTTPMiddleware would wrap `receive` and hide client disconnects from the handlers)."""

    def __init__(self, app: Callable, api_key: str):
        # surrogateescape: a key given as bytes that are not UTF-8 (from argv) keeps its bytes
        self.app, self.key = app, api_key.encode("utf-8", "surrogateescape")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIXES):
            err = check_bearer([v for k, v in scope["headers"] if k == b"authorization"], self.key)
            if err is not None:
                await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)
