"""uvicorn's h11 protocol with the guards a listening socket needs.

h11 parses a request head only once it has all of it (up to the blank line, or 16 KiB), so
bytes that are not HTTP but hold no blank line, or a client that sends half a head and stops,
would keep a connection open until the client gives up. This protocol answers 400 as soon as
the first bytes of a request line cannot be HTTP/1.x, closes a connection whose request head
has not arrived within `head_timeout_s` (--header-timeout; 408), answers h11's protocol errors
in OpenAI's JSON format, and turns a parser exception (e.g. a 5,000-digit Content-Length, which
int() refuses) into a 400 instead of a dropped connection. Pipelined requests are untouched:
h11 answers them one at a time, in order.

Open connections are capped (`max_connections`): one over the cap is answered 503 and closed
as soon as it is accepted, so half-open or idle clients cannot exhaust file descriptors. And an
answer sent before its request body was read (413, 401, 415, ...) closes the connection
(`CloseWhenBodyUnread`): uvicorn would otherwise read and discard the rest of the body on the
event loop, megabytes of it, to keep the connection alive.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import APIError

HEAD_TIMEOUT_S = 10.0  # from connection (or first byte of a request) to its complete head
MAX_CONNECTIONS = 1024  # open connections at most; more are answered 503 and closed


@dataclass(frozen=True)
class WireLimits:
    head_timeout_s: float = HEAD_TIMEOUT_S
    max_connections: int | None = MAX_CONNECTIONS  # None: no cap

_METHOD = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]{1,32}")  # h11's token grammar, bounded
_TARGET = re.compile(rb"[\x21-\x7e]*")
_FULL_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_PARTIAL_DIGITS = re.compile(rb"[0-9](\.[0-9]?)?")


def could_be_http(buffered: bytes) -> bool:
    """False once the buffered start of a request cannot begin `METHOD SP TARGET SP HTTP/d.d CRLF`."""
    data = buffered[2:] if buffered.startswith(b"\r\n") else buffered  # one blank line is tolerated
    end = data.find(b"\n")
    complete = end >= 0
    line = data[:end].removesuffix(b"\r") if complete else data
    parts = line.split(b" ")
    if len(parts) > 3:
        return False
    if (parts[0] or complete or len(parts) > 1) and not _METHOD.fullmatch(parts[0]):
        return False
    if len(parts) >= 2 and not _TARGET.fullmatch(parts[1]):
        return False
    if len(parts) < 3:
        return not complete
    return _version_ok(parts[2], complete)


def _version_ok(version: bytes, complete: bool) -> bool:
    if complete or version.endswith(b"\r"):
        return _FULL_VERSION.fullmatch(version.removesuffix(b"\r")) is not None
    if len(version) <= 5:
        return b"HTTP/".startswith(version)
    return version.startswith(b"HTTP/") and _PARTIAL_DIGITS.fullmatch(version[5:]) is not None


def error_bytes(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, with an OpenAI error body."""
    body = json.dumps(APIError(status, message, type_=type_, code=code).body()).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    return head + body


def guarded_protocol(limits: WireLimits) -> type["GuardedH11Protocol"]:
    """The protocol class uvicorn instantiates per connection, with these limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"head_timeout_s": limits.head_timeout_s, "max_connections": limits.max_connections})


class GuardedH11Protocol(H11Protocol):
    head_timeout_s: float = HEAD_TIMEOUT_S
    max_connections: int | None = MAX_CONNECTIONS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)  # adds this one to self.connections (the server's set)
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            self._reject(503, f"too many open connections: this server holds at most {self.max_connections} "
                              "(--max-connections); retry later", type_="server_error", code="too_many_connections")
            return
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        if self._awaiting_request():
            buffered = self.conn.trailing_data[0]
            if buffered and not could_be_http(buffered):
                self._reject(400, "invalid HTTP request: the bytes received do not start an HTTP/1.x request")
                return
        try:
            super().handle_events()
        except Exception as exc:  # noqa: BLE001  (a parser error h11 does not wrap, e.g. int() limits)
            self.logger.warning("invalid HTTP request received: %r", exc)
            self.send_400_response(f"invalid HTTP request: {type(exc).__name__}")
            return
        if self._awaiting_request() and self.conn.trailing_data[0]:
            self._arm_head_timer()  # part of a head is buffered: it has HEAD_TIMEOUT_S to complete
        elif not self._awaiting_request():
            self._cancel_head_timer()

    def send_400_response(self, msg: str) -> None:
        """h11 rejected the request: answer in OpenAI's format, unless a response already started."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's later sends become no-ops
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        self._reject(400, msg if msg.lower().startswith("invalid") else f"invalid HTTP request: {msg}")

    def _awaiting_request(self) -> bool:
        return self.conn.their_state is h11.IDLE and self.conn.our_state is h11.IDLE

    def _reject(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None) -> None:
        self._cancel_head_timer()
        if not self.transport.is_closing():
            self.transport.write(error_bytes(status, message, type_, code))
            self.transport.close()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._awaiting_request():
            self._reject(408, f"no complete request head within {self.head_timeout_s:g} s (--header-timeout)",
                         code="request_timeout")


class CloseWhenBodyUnread:
    """ASGI layer: a response that starts before the request body was read to its end carries
    `Connection: close`, so uvicorn closes the connection after it instead of reading (and
    discarding) whatever the client still sends."""

    def __init__(self, app: Callable):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not _has_body(scope["headers"]):
            await self.app(scope, receive, send)
            return
        body_read = False

        async def tracked_receive() -> dict:
            nonlocal body_read
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_read = True
            return message

        async def closing_send(message: dict) -> None:
            if message["type"] == "http.response.start" and not body_read:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": headers + [(b"connection", b"close")]}
            await send(message)

        await self.app(scope, tracked_receive, closing_send)


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False
