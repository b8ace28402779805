"""Start the server: load the engine, wrap it, and run uvicorn until SIGTERM/SIGINT.

The engine's step loop owns the main thread; uvicorn runs in a second one, speaking HTTP/1.1
through wire.GuardedH11Protocol (header timeout, connection cap), with uvicorn's keep-alive
timeout as the idle timeout between requests. On a signal uvicorn
stops accepting connections, lets in-flight responses finish for up to
`shutdown_timeout` seconds, cancels the rest (their handlers abort their requests), then the
app's lifespan stops the engine thread. We install our own signal handlers so that a
requested shutdown exits with status 0 (stock uvicorn re-raises the signal afterwards).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from ..engine import EngineConfig, LLMEngine
from .app import ServerConfig, build_app
from .async_engine import AsyncEngine
from .hosts import host_policy
from .limits import BODY_IDLE_TIMEOUT_S, MAX_BODY_BYTES
from .metrics import ServerMetrics
from .wire import HEAD_TIMEOUT_S, MAX_CONNECTIONS, WireLimits, guarded_protocol

log = logging.getLogger("ridgeline.server")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int | None = None
    served_model_name: str | None = None
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    max_request_bytes: int = MAX_BODY_BYTES
    header_timeout: float = HEAD_TIMEOUT_S  # until a request head is complete
    idle_timeout: float = BODY_IDLE_TIMEOUT_S  # silence mid-body (408) or between keep-alive requests (close)
    max_connections: int | None = MAX_CONNECTIONS
    allowed_hosts: list[str] | None = None  # None: the bind address and the loopback names
    tool_call_parser: str = "hermes"  # tools.PARSERS


def default_model_name(engine: LLMEngine) -> str:
    path = Path(engine.model_path)
    return path.name[:-len(".gguf")] if path.name.endswith(".gguf") else path.name


def create_app(engine: LLMEngine, options: ServeOptions | None = None,
               start_thread: bool = True) -> tuple[FastAPI, AsyncEngine]:
    """App plus the AsyncEngine that owns `engine` from now on (its step thread is running, unless
    start_thread=False: then the caller runs aengine.run())."""
    options = options or ServeOptions()
    name = options.served_model_name or default_model_name(engine)
    metrics = ServerMetrics(name)
    engine.runner.grammar.warm_up()  # llguidance's tokenizer (~0.5 s), before the first constrained request
    aengine = AsyncEngine(engine, metrics, start_thread=start_thread)
    config = ServerConfig(model_name=name, api_key=options.api_key, max_queue=options.max_queue,
                          max_request_bytes=options.max_request_bytes, body_idle_timeout_s=options.idle_timeout,
                          hosts=host_policy(options.host, options.allowed_hosts),
                          tool_call_parser=options.tool_call_parser)
    return build_app(aengine, metrics, config), aengine


def _raise_fd_limit(needed: int) -> None:
    """Lift the soft open-files limit towards `needed` (the connection cap plus headroom), so that
    the cap, not EMFILE from accept(), is what refuses connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft
        if target < needed:
            log.warning("open-files limit is %d: fewer than --max-connections %d can be served", target,
                        needed - _FD_HEADROOM)


_FD_HEADROOM = 64  # model files, pipes, the listening socket, ...


class _Server(uvicorn.Server):
    """uvicorn.Server whose signal handling ends in a clean return (exit status 0), and which
    aborts requests still running shortly before the graceful-shutdown deadline, so their
    responses end with an error event instead of being cancelled mid-write."""

    def __init__(self, config: uvicorn.Config, aengine: AsyncEngine):
        super().__init__(config)
        self.aengine = aengine

    async def shutdown(self, sockets=None) -> None:
        timeout = self.config.timeout_graceful_shutdown
        if timeout is not None:
            margin = min(1.0, timeout / 2)
            asyncio.get_running_loop().call_later(
                timeout - margin, self.aengine.abort_all, "the server is shutting down; the request was aborted")
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C skips the graceful wait
        self.should_exit = True


def serve(engine_config: EngineConfig, options: ServeOptions) -> int:
    """The engine's step loop runs in the main thread (torch's CPU kernels are fastest there) and
    uvicorn's event loop in a second thread; SIGTERM/SIGINT reach the main thread and tell uvicorn
    to shut down gracefully, after which the app's lifespan stops the step loop."""
    hosts = host_policy(options.host, options.allowed_hosts)  # a bad --allowed-hosts fails before the load
    engine = LLMEngine(engine_config)
    app, aengine = create_app(engine, options, start_thread=False)
    if options.max_connections is not None:
        _raise_fd_limit(options.max_connections + _FD_HEADROOM)
    protocol = guarded_protocol(WireLimits(head_timeout_s=options.header_timeout,
                                           max_connections=options.max_connections))
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level=options.log_level,
                            timeout_graceful_shutdown=options.shutdown_timeout, access_log=False,
                            timeout_keep_alive=options.idle_timeout, lifespan="on", http=protocol)
    server = _Server(config, aengine)
    log.info("serving %s on http://%s:%d (answering to Host %s)", default_model_name(engine), options.host,
             options.port, hosts.describe())

    def run_http() -> None:
        try:
            server.run()
        finally:
            aengine.shutdown()  # also when uvicorn could not start: ends the step loop below

    http = threading.Thread(target=run_http, name="ridgeline-http", daemon=True)
    previous = {sig: signal.signal(sig, server._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        aengine.run()
        http.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started or server.should_exit else 1
