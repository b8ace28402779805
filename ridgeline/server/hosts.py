"""Host-header allow-list (`--allowed-hosts`): the defence against DNS rebinding.

A web page on evil.example can point its own name at 127.0.0.1 and then talk to a local server
from the victim's browser as a same-origin site; the only trace is the Host header, which still
says evil.example. So every request must name a host this server answers to: by default the
bind address and the loopback names. Bound to every interface (0.0.0.0 or ::), any IP literal is
accepted as well, with the machine's own names: an attacker can rebind a name, never an address.
A foreign host is a 421 (Misdirected Request), a malformed or repeated Host header a 400.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fastapi.responses import JSONResponse

from .protocol import APIError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARD_BINDS = ("", "0.0.0.0", "::")
_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_PORT = re.compile(r"[0-9]{0,5}")


@dataclass(frozen=True)
class HostPolicy:
    names: frozenset[str] = LOOPBACK_NAMES  # lower case, no port, no brackets
    any_ip: bool = False  # every IP literal too (a wildcard bind)
    any_host: bool = False  # no check at all ("*")

    def allows(self, name: str) -> bool:
        return self.any_host or name in self.names or (self.any_ip and _is_ip(name))

    def describe(self) -> str:
        if self.any_host:
            return "any host"
        shown = ", ".join(sorted(self.names))
        return shown + (", any IP address" if self.any_ip else "")


def host_name(value: str) -> str | None:
    """The host of a Host header or --allowed-hosts entry, lower case, without port or brackets
    ('LocalHost:8000' -> 'localhost', '[::1]:80' -> '::1'); None when it is not a host[:port]."""
    v = value.strip().lower()
    if v.startswith("["):
        name, sep, rest = v[1:].partition("]")
        if not sep or not _is_ip(name) or ":" not in name or not (rest == "" or (rest[0] == ":" and
                                                                               _PORT.fullmatch(rest[1:]))):
            return None
        return name
    name, sep, port = v.partition(":")
    if sep and not _PORT.fullmatch(port):
        return None
    name = name[:-1] if name.endswith(".") else name  # the absolute form 'localhost.' is the same host
    return name if _NAME.fullmatch(name) else None


def host_policy(bind_host: str, allowed: Sequence[str] | None = None) -> HostPolicy:
    """The --allowed-hosts list (a '*' entry turns the check off), or the default for the bind address."""
    if allowed:
        if "*" in allowed:
            return HostPolicy(any_host=True)
        names = set()
        for entry in allowed:
            bare = entry.strip().lower()
            name = bare if _is_ip(bare) else host_name(entry)  # a bare IPv6 address needs no brackets here
            if name is None:
                raise ValueError(f"--allowed-hosts: {entry!r} is not a host name, IP address or [IPv6] address")
            names.add(name)
        return HostPolicy(frozenset(names))
    bind = bind_host.strip().strip("[]").lower()
    if bind in _WILDCARD_BINDS:
        own = {n.lower() for n in (socket.gethostname(), socket.getfqdn()) if n}
        return HostPolicy(LOOPBACK_NAMES | own, any_ip=True)
    return HostPolicy(LOOPBACK_NAMES | {bind})


def check_host(values: list[bytes], policy: HostPolicy) -> APIError | None:
    """None when the request's Host header (raw values) is acceptable, else the error to answer."""
    if policy.any_host or not values:  # no Host at all: HTTP/1.0, never a browser
        return None
    if len(values) > 1:
        return APIError(400, f"Host: the header appears {len(values)} times; send it once", code="invalid_host")
    raw = values[0].decode("latin-1")
    shown = repr(raw if len(raw) <= 100 else raw[:100] + "...")
    name = host_name(raw)
    if name is None:
        return APIError(400, f"Host: {shown} is not a host[:port]", code="invalid_host")
    if not policy.allows(name):
        return APIError(421, f"Host: this server does not answer to {shown}; it answers to {policy.describe()} "
                             "(see --allowed-hosts)", code="misdirected_request")
    return None


class HostCheckMiddleware:
    """Plain ASGI, on every route (/health and /metrics too: rebinding could read them as well)."""

    def __init__(self, app: Callable, policy: HostPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            err = check_host([v for k, v in scope["headers"] if k == b"host"], self.policy)
            if err is not None:
                await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
