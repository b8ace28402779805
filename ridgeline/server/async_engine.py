"""AsyncEngine: runs LLMEngine.step() in one background thread and fans outputs out to asyncio.

The engine is single-threaded, so everything that touches it (tokenizing, adding, aborting,
stepping) runs in the engine thread: request handlers submit closures through a command
queue and await their result. Between two steps the thread drains the queue, so an abort
frees the request's KV blocks before the next batch is scheduled. Each request's outputs
go to an asyncio.Queue owned by its handler, via loop.call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..engine import LLMEngine
from ..outputs import RequestOutput
from .metrics import ServerMetrics

log = logging.getLogger("ridgeline.server")
T = TypeVar("T")
IDLE_WAKE_S = 0.1  # longest wait for a command while no request is in flight
IDLE_POLL_S = 0.002  # wait between steps that scheduled nothing (requests waiting on a shared prefix)


class EngineDeadError(RuntimeError):
    """The step loop failed or was shut down; in-flight requests receive this."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    """Thread-owned LLMEngine with an awaitable command interface and per-request output queues."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None, start_thread: bool = True):
        """start_thread=False: the caller runs the step loop itself with run(). `ridgeline serve`
        does that in the main thread: torch's OpenMP kernels run ~2x slower (e.g. a decode step
        23 ms instead of 13 ms) when a thread other than the process's first one drives them."""
        self.engine = engine
        self.metrics = metrics
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._count_lock = threading.Lock()
        self._pending = 0  # submitted closures not yet run by the engine thread
        self._num_waiting = 0  # requests in the engine with no sequence running yet
        self._num_running = 0
        self._stopped = threading.Event()
        if metrics is not None:
            metrics.update(engine, [], 0, 0)  # pool size and zeros before the first request
        self._thread: threading.Thread | None = None
        if start_thread:
            self._thread = threading.Thread(target=self._loop, name="ridgeline-engine", daemon=True)
            self._thread.start()

    def run(self) -> None:
        """Run the step loop in the calling thread until shutdown()."""
        self._loop()

    # ------------------------------------------------------------------ event-loop side

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run fn(engine) in the engine thread between steps and return (or raise) its result."""
        if self._stopped.is_set():
            raise EngineDeadError("the engine is shut down")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        with self._count_lock:
            self._pending += 1
        self._commands.put(_Call(self, fn, loop, fut))
        return await fut

    def open_streams(self, request_ids: list[str]) -> asyncio.Queue:
        """One output queue shared by the given requests (call from the event loop, before adding them)."""
        q: asyncio.Queue = asyncio.Queue()
        stream = _Stream(asyncio.get_running_loop(), q)
        for rid in request_ids:
            self._streams[rid] = stream
        return q

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests; safe to call from anywhere, including a cancelled handler's finally."""
        ids = list(request_ids)
        for rid in ids:
            self._streams.pop(rid, None)
        if not self._stopped.is_set():
            self._commands.put(lambda: self._abort_now(ids))

    def close_streams(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._streams.pop(rid, None)

    def num_queued(self) -> int:
        """Requests admitted but not yet running (the --max-queue bound applies to this)."""
        with self._count_lock:
            return self._pending + self._num_waiting

    @property
    def num_running(self) -> int:
        return self._num_running

    @property
    def alive(self) -> bool:
        return (self._thread is None or self._thread.is_alive()) and not self._stopped.is_set()

    def abort_all(self, reason: str) -> None:
        """Abort every in-flight request; their handlers receive EngineDeadError(reason) and end cleanly."""
        if not self._stopped.is_set():
            self._commands.put(lambda: self._fail_all(EngineDeadError(reason)))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort whatever is left and stop the thread."""
        if self._stopped.is_set():
            return
        self._commands.put(self._abort_all)
        self._stopped.set()
        self._commands.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        engine = self.engine
        stalled = False  # the last step scheduled nothing: wait a little instead of spinning
        while True:
            busy = engine.has_unfinished_requests()
            try:
                if not busy:  # idle: wake now and then, so a main-thread loop still sees signals
                    cmd = self._commands.get(timeout=IDLE_WAKE_S)
                elif stalled:
                    cmd = self._commands.get(timeout=IDLE_POLL_S)
                else:
                    cmd = self._commands.get_nowait()
            except queue.Empty:
                cmd = ...
            while cmd is not ...:
                if cmd is None:
                    self._drain_after_stop()
                    return
                try:
                    cmd()
                except Exception:  # commands catch their own errors; this is a last resort
                    log.exception("engine command failed")
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    cmd = ...
            if not engine.has_unfinished_requests():
                self._after_step([])
                continue
            steps = engine.num_steps
            try:
                outputs = engine.step()
                stalled = engine.num_steps == steps
            except Exception as exc:  # a bug, not user input: fail in-flight requests, keep serving
                log.exception("engine step failed")
                self._fail_all(EngineDeadError(f"the engine failed: {exc!r}"))
                continue
            try:
                self._after_step(outputs)
            except Exception:  # metrics or delivery bug: log it, keep the loop alive
                log.exception("dispatching outputs failed")

    def _drain_after_stop(self) -> None:
        """Fail calls submitted after shutdown so no handler waits forever."""
        self._abort_all()
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Call):
                cmd.fail(EngineDeadError("the server is shutting down"))

    def _call_done(self) -> None:
        with self._count_lock:
            self._update_counts()
            self._pending -= 1

    def _after_step(self, outputs: list[RequestOutput]) -> None:
        # Counts and metrics first: a client that has seen its token must also see itself running.
        with self._count_lock:
            self._update_counts()
        if self.metrics is not None:
            self.metrics.update(self.engine, outputs, self._num_running, self._num_waiting)
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
            if stream is not None:
                _deliver(stream.loop, stream.queue.put_nowait, out)

    def _update_counts(self) -> None:
        stats = self.engine.get_stats()
        self._num_running, self._num_waiting = stats.num_requests_running, stats.num_requests_waiting

    def _abort_now(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            if self.engine.abort_request(rid) and self.metrics is not None:
                self.metrics.aborted.inc()

    def _abort_all(self) -> None:
        self._fail_all(EngineDeadError("the server is shutting down"))

    def _fail_all(self, exc: Exception) -> None:
        for rid in self.engine.request_ids():
            self.engine.abort_request(rid)
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            _deliver(stream.loop, stream.queue.put_nowait, exc)
        with self._count_lock:
            self._update_counts()
        if self.metrics is not None:
            self.metrics.update(self.engine, [], 0, 0)


class _Call:
    """A closure submitted by `AsyncEngine.call`, resolved on the caller's event loop."""

    def __init__(self, owner: AsyncEngine, fn: Callable[[LLMEngine], Any], loop: asyncio.AbstractEventLoop,
                 fut: asyncio.Future):
        self.owner, self.fn, self.loop, self.fut = owner, fn, loop, fut

    def __call__(self) -> None:
        # Counts are updated before the result is handed over, so a client that reacts to it
        # at once (e.g. sends its next request) never sees a stale queue length.
        try:
            result = self.fn(self.owner.engine)
        except BaseException as exc:  # noqa: BLE001  (handed to the awaiting handler)
            self.owner._call_done()
            self.fail(exc)
        else:
            self.owner._call_done()
            _deliver(self.loop, _set_result, self.fut, result)

    def fail(self, exc: BaseException) -> None:
        _deliver(self.loop, _set_exception, self.fut, exc)


def _deliver(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """call_soon_threadsafe that tolerates a loop already closed (the server is exiting)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
