"""FastAPI routes of the OpenAI-compatible server.

Handlers parse and validate the body themselves (limits.py bounds it first), so bad JSON and
wrongly typed fields are 400s in OpenAI's error format, never FastAPI's 422; they render and
tokenize prompts in a worker thread (preprocess.py), add them in the engine thread through
AsyncEngine.call, then either collect the final outputs or stream deltas as server-sent events.
In front of the routes: the Host allow-list (hosts.py), the API key (auth.py) and closing a
connection whose request body was left unread (wire.py). A request that ends early (client
gone, cancelled by shutdown) is aborted, by `_collect` or by the event stream's close, which
frees its KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import LLMEngine
from ..outputs import CompletionOutput, Logprob, RequestOutput
from ..sampling_params import SamplingParams
from .async_engine import AsyncEngine, EngineDeadError
from .auth import APIKeyMiddleware
from .hosts import HostCheckMiddleware, HostPolicy
from .limits import BODY_IDLE_TIMEOUT_S, MAX_BODY_BYTES, BodyLimits, limits_for, read_json
from .metrics import CONTENT_TYPE, ServerMetrics
from .preprocess import PreparedPrompt, Preprocessor, PromptRules
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, RequestMeta, error_from_validation,
                       error_from_value, usage)
from .responses import ResponsesRequest, create_response
from .tokenize_routes import add_tokenizer_routes
from .tools import ToolStream, parse_output, render_messages
from .wire import CloseWhenBodyUnread

log = logging.getLogger("ridgeline.server")
DISCONNECT_POLL_S = 0.5  # how often a non-streaming handler checks whether its client left


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_queue: int | None = None  # requests admitted but not yet running; beyond this: 503
    max_request_bytes: int = MAX_BODY_BYTES  # a larger body is a 413
    body_idle_timeout_s: float = BODY_IDLE_TIMEOUT_S  # a body that stalls this long is a 408
    hosts: HostPolicy = field(default_factory=HostPolicy)  # Host headers answered; others get 421
    limits: BodyLimits | None = None  # None: derived from the engine's vocabulary and context length
    tool_call_parser: str = "hermes"  # how tool calls are written in the model's output (tools.py)


# ---------------------------------------------------------------------- app


def build_app(aengine: AsyncEngine, metrics: ServerMetrics, config: ServerConfig) -> FastAPI:
    """The ASGI app over a running AsyncEngine; shutting the app down stops the engine thread."""

    limits = config.limits or limits_for(aengine.engine, config.max_request_bytes, config.body_idle_timeout_s)
    preprocessor = Preprocessor(PromptRules.from_engine(aengine.engine, limits.max_string_chars))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        preprocessor.shutdown()
        aengine.shutdown()

    app = FastAPI(title="ridgeline", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    server = _Server(aengine, metrics, config, preprocessor)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(APIError(exc.status_code, msg, type_=kind).body(), status_code=exc.status_code)

    # Added innermost first: a request meets the Host check, then the key, then the routes.
    if config.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    app.add_middleware(HostCheckMiddleware, policy=config.hosts)
    app.add_middleware(CloseWhenBodyUnread)  # around every early answer (421, 401, 404, 413, 415, ...)
    app.add_middleware(_InternalErrorMiddleware)  # added last: outermost of ours

    @app.get("/health")
    async def health() -> Response:
        if not aengine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [server.model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        if model_id != config.model_name:
            raise _unknown_model(model_id, config.model_name)
        return JSONResponse(server.model_card())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = _parse(CompletionRequest, await read_json(request, limits))
        return await server.completions(req, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = _parse(ChatCompletionRequest, await read_json(request, limits))
        return await server.chat(req, request)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        req = _parse(ResponsesRequest, await read_json(request, limits))
        return await create_response(server, req, request)

    add_tokenizer_routes(app, preprocessor, limits, server._check_model, config.tool_call_parser)
    return app


class _InternalErrorMiddleware:
    """A bug answers 500 in OpenAI's format and keeps the connection. (Starlette's handler for
    Exception re-raises after answering, so uvicorn closes the connection under a keep-alive
    client.) After a response has started there is nothing to send: uvicorn closes it."""

    def __init__(self, app: Callable):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception as exc:  # noqa: BLE001
            log.exception("unhandled error in %s", scope.get("path"))
            if not started:
                err = APIError(500, f"internal server error: {type(exc).__name__}", type_="server_error")
                await JSONResponse(err.body(), status_code=500)(scope, receive, send)


def _parse(model: type[BaseModel], body: dict) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise error_from_validation(exc) from None


def _unknown_model(name: str, served: str) -> APIError:
    shown = name if len(name) <= 100 else name[:100] + "..."
    return APIError(404, f"model: the model '{shown}' does not exist; this server serves '{served}'",
                    param="model", code="model_not_found")


# ---------------------------------------------------------------------- handlers


@dataclass
class _Choice:
    """Streaming progress of one choice: how much text and how many tokens were sent."""

    text_sent: int = 0
    tokens_sent: int = 0
    finished: bool = False
    started: bool = False


@dataclass
class _Job:
    """One HTTP request: its engine request ids (one per prompt), shared output queue and prompts."""

    meta: RequestMeta
    request_ids: list[str]
    queue: asyncio.Queue
    prompts: list[PreparedPrompt]
    params: SamplingParams
    finals: dict[str, RequestOutput] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return len(self.finals) == len(self.request_ids)

    def unfinished(self) -> list[str]:
        return [r for r in self.request_ids if r not in self.finals]


class _Server:
    def __init__(self, aengine: AsyncEngine, metrics: ServerMetrics, config: ServerConfig,
                 preprocessor: Preprocessor):
        self.aengine, self.metrics, self.config, self.preprocessor = aengine, metrics, config, preprocessor
        self.created = int(time.time())

    def model_card(self) -> dict:
        # `root` is the model's file (or directory) name: its absolute path would tell any client
        # where the server's files live.
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "ridgeline",
                "root": Path(self.aengine.engine.model_path).name, "parent": None,
                "max_model_len": self.aengine.engine.max_model_len}

    # -------------------------------------------------------------- admission

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise _unknown_model(name, self.config.model_name)

    def _check_ready(self, num_requests: int) -> None:
        if not self.aengine.alive:
            raise APIError(503, "the server is shutting down", type_="server_error", code="service_unavailable")
        limit = self.config.max_queue
        if limit is not None and self.aengine.num_queued() + num_requests > limit:
            raise APIError(503, f"the request queue is full ({limit} requests waiting); retry later",
                           type_="server_error", code="queue_full")

    async def _submit(self, prefix: str, model: str | None, prompts: list, params: SamplingParams,
                      prompt_param: str) -> _Job:
        """Render, tokenize and check every prompt in the preprocessing thread, then add them all
        in the engine thread (all or none)."""
        self._check_model(model)
        self._check_ready(len(prompts))
        try:
            prepared = await self.preprocessor.prepare(prompts, params, prompt_param)
        except (ValueError, TypeError) as exc:  # APIError is neither: it goes up as it is
            raise error_from_value(exc, prompt_param) from None
        self._check_ready(len(prompts))  # preprocessing took a while: the queue may have filled
        meta = RequestMeta.new(prefix, self.config.model_name)
        rids = [f"{meta.id}-{i}" for i in range(len(prompts))]
        q = self.aengine.open_streams(rids)

        def admit(engine: LLMEngine) -> None:
            added: list[str] = []
            try:
                for rid, prompt in zip(rids, prepared):
                    engine.add_request({"prompt_token_ids": prompt.token_ids, "prompt": prompt.text}, params,
                                       request_id=rid)
                    added.append(rid)
            except Exception:
                for rid in added:
                    engine.abort_request(rid)
                raise

        try:
            await self.aengine.call(admit)
        except APIError:
            self.aengine.close_streams(rids)
            raise
        except (ValueError, TypeError) as exc:
            self.aengine.close_streams(rids)
            raise error_from_value(exc, prompt_param) from None
        except EngineDeadError as exc:
            self.aengine.close_streams(rids)
            raise APIError(503, str(exc), type_="server_error", code="service_unavailable") from None
        except BaseException:
            self.aengine.abort(rids)
            raise
        return _Job(meta, rids, q, prepared, params)

    async def _next(self, job: _Job) -> RequestOutput:
        item = await job.queue.get()
        if isinstance(item, BaseException):
            raise item
        if item.finished:
            job.finals[item.request_id] = item
        return item

    async def _collect(self, job: _Job, request: Request) -> None:
        """Wait for every prompt's final output; give up (aborting) when the client disconnects."""
        loop = asyncio.get_running_loop()
        next_check = loop.time() + DISCONNECT_POLL_S
        try:
            while not job.done:
                try:
                    await asyncio.wait_for(self._next(job), timeout=max(0.001, next_check - loop.time()))
                except asyncio.TimeoutError:
                    pass
                if loop.time() >= next_check:  # outputs may arrive every step: check on a clock, not on silence
                    if await request.is_disconnected():
                        return
                    next_check = loop.time() + DISCONNECT_POLL_S
        except EngineDeadError as exc:
            raise APIError(503, str(exc), type_="server_error", code="service_unavailable") from None
        finally:
            if not job.done:
                self.aengine.abort(job.unfinished())

    # -------------------------------------------------------------- /v1/completions

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        params = req.sampling_params()
        prompts = req.prompts()
        job = await self._submit("cmpl", req.model, prompts, params, "prompt")
        if req.stream:
            return _sse(self._stream_completion(job, req), self, job)
        await self._collect(job, request)
        if not job.done:
            return Response(status_code=499)
        if req.score_only:
            return JSONResponse(self._scored(job))
        choices, completion_tokens = [], 0
        for p_idx, (rid, prompt) in enumerate(zip(job.request_ids, job.prompts)):
            out = job.finals[rid]
            for comp in out.outputs:
                completion_tokens += len(comp.token_ids)
                text = comp.text
                logprobs = None
                if params.logprobs is not None:
                    logprobs = _completion_logprobs(comp.logprobs or [], comp.token_ids, params.logprobs, 0)
                if req.echo:
                    if logprobs is not None:
                        logprobs = _merge_echo_logprobs(prompt, out, logprobs, params.logprobs)
                    text = prompt.text + text
                choices.append({"index": p_idx * params.n + comp.index, "text": text, "logprobs": logprobs,
                                "finish_reason": _finish(comp)})
        prompt_tokens = sum(len(p.token_ids) for p in job.prompts)
        return JSONResponse({"id": job.meta.id, "object": "text_completion", "created": job.meta.created,
                             "model": job.meta.model, "choices": choices, "system_fingerprint": None,
                             "usage": usage(prompt_tokens, completion_tokens)})

    def _scored(self, job: _Job) -> dict:
        """max_tokens=0 with echo: each prompt as its text and (with logprobs) its tokens' logprobs;
        the one token the engine sampled is dropped. As a stream: one chunk, sent when scored."""
        k, n, choices = job.params.logprobs, job.params.n, []
        nothing = _completion_logprobs([], [], k or 0, 0)
        for p_idx, (rid, prompt) in enumerate(zip(job.request_ids, job.prompts)):
            lp = None if k is None else _merge_echo_logprobs(prompt, job.finals[rid], nothing, k)
            choices += [{"index": p_idx * n + i, "text": prompt.text, "logprobs": lp, "finish_reason": "length"}
                        for i in range(n)]
        prompt_tokens = sum(len(p.token_ids) for p in job.prompts)
        return {"id": job.meta.id, "object": "text_completion", "created": job.meta.created, "model": job.meta.model,
                "choices": choices, "system_fingerprint": None, "usage": usage(prompt_tokens, 0)}

    async def _stream_completion(self, job: _Job, req: CompletionRequest) -> AsyncIterator[str]:
        if req.score_only:
            try:
                while not job.done:
                    await self._next(job)
                body = self._scored(job)
                final_usage = body.pop("usage")
                yield _event({**body, **({"usage": None} if req.include_usage else {})})
                if req.include_usage:
                    yield _event({**body, "choices": [], "usage": final_usage})
                yield "data: [DONE]\n\n"
            except EngineDeadError as exc:
                yield _event(APIError(503, str(exc), type_="server_error", code="service_unavailable").body())
                yield "data: [DONE]\n\n"
            return
        params = job.params
        states = {(p, i): _Choice() for p in range(len(job.prompts)) for i in range(params.n)}
        index_of = {rid: p for p, rid in enumerate(job.request_ids)}
        base = {"id": job.meta.id, "object": "text_completion", "created": job.meta.created, "model": job.meta.model,
                "system_fingerprint": None}
        extra = {"usage": None} if req.include_usage else {}
        completion_tokens = 0
        k = params.logprobs
        # echo: each prompt's text first; with logprobs, once its first output brings the prompt's logprobs
        echoed = set() if req.echo and k is not None else set(range(len(job.prompts)))
        try:
            if req.echo and k is None:
                for (p, i), st in states.items():
                    yield _event({**base, "choices": [{"index": p * params.n + i, "text": job.prompts[p].text,
                                                       "logprobs": None, "finish_reason": None}], **extra})
            while not job.done:
                out = await self._next(job)
                p = index_of[out.request_id]
                if p not in echoed:
                    prompt = job.prompts[p]
                    if len(out.prompt_logprobs or []) < len(prompt.token_ids) and not out.finished:
                        continue
                    echoed.add(p)
                    lp = _merge_echo_logprobs(prompt, out, _completion_logprobs([], [], k, 0), k)
                    for i in range(params.n):
                        yield _event({**base, "choices": [{"index": p * params.n + i, "text": prompt.text,
                                                           "logprobs": lp, "finish_reason": None}], **extra})
                shift = len(job.prompts[p].text) if req.echo else 0  # offsets count the echoed prompt
                for comp in out.outputs:
                    st = states[(p, comp.index)]
                    if st.finished:
                        continue
                    delta = comp.text[st.text_sent:] if len(comp.text) > st.text_sent else ""
                    new_tokens = comp.token_ids[st.tokens_sent:]
                    finish = _finish(comp)
                    if not delta and finish is None:
                        continue
                    lp = None
                    if params.logprobs is not None:
                        lp = _completion_logprobs((comp.logprobs or [])[st.tokens_sent:], new_tokens,
                                                  params.logprobs, shift + st.text_sent)
                    st.text_sent += len(delta)
                    st.tokens_sent = len(comp.token_ids)
                    if finish is not None:
                        st.finished = True
                        completion_tokens += len(comp.token_ids)
                    yield _event({**base, "choices": [{"index": p * params.n + comp.index, "text": delta,
                                                       "logprobs": lp, "finish_reason": finish}], **extra})
            if req.include_usage:
                prompt_tokens = sum(len(pr.token_ids) for pr in job.prompts)
                yield _event({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
            yield "data: [DONE]\n\n"
        except EngineDeadError as exc:
            yield _event(APIError(503, str(exc), type_="server_error", code="service_unavailable").body())
            yield "data: [DONE]\n\n"

    # -------------------------------------------------------------- /v1/chat/completions

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        parser = req._tool_call_parser = self.config.tool_call_parser
        params = req.sampling_params()  # checks the tools too (req._tool_setup)
        setup = req._tool_setup
        messages, tool_specs = render_messages([m.as_template_message() for m in req.messages], setup, parser,
                                               self.aengine.engine.tokenizer.chat_template)
        prompt = (messages, req.add_generation_prompt) + ((tool_specs,) if tool_specs else ())
        job = await self._submit("chatcmpl", req.model, [prompt], params, "messages")
        if req.stream:
            return _sse(self._stream_chat(job, req), self, job)
        await self._collect(job, request)
        if not job.done:
            return Response(status_code=499)
        out = job.finals[job.request_ids[0]]
        choices = []
        for comp in out.outputs:
            logprobs = None
            if req.logprobs:
                logprobs = {"content": _chat_logprobs(comp.logprobs or [], comp.token_ids, params.logprobs or 0),
                            "refusal": None}
            content, calls = parse_output(parser, setup.tools, comp.text) if setup.active else (comp.text, [])
            choices.append({"index": comp.index,
                            "message": {"role": "assistant", "content": content, "refusal": None,
                                        "tool_calls": [c.as_message() for c in calls]},
                            "logprobs": logprobs, "finish_reason": _tool_finish(comp, bool(calls))})
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        return JSONResponse({"id": job.meta.id, "object": "chat.completion", "created": job.meta.created,
                             "model": job.meta.model, "choices": choices, "system_fingerprint": None,
                             "usage": usage(len(job.prompts[0].token_ids), completion_tokens)})

    async def _stream_chat(self, job: _Job, req: ChatCompletionRequest) -> AsyncIterator[str]:
        params = job.params
        states = {i: _Choice() for i in range(params.n)}
        base = {"id": job.meta.id, "object": "chat.completion.chunk", "created": job.meta.created,
                "model": job.meta.model, "system_fingerprint": None}
        extra = {"usage": None} if req.include_usage else {}
        completion_tokens = 0

        def chunk(index: int, delta: dict, logprobs: Any, finish: str | None) -> str:
            return _event({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                                "finish_reason": finish}], **extra})

        setup = req._tool_setup
        tool_streams = {i: ToolStream(req._tool_call_parser, setup.tools) for i in range(params.n)} \
            if setup is not None and setup.active else {}

        try:
            for i in range(params.n):
                yield chunk(i, {"role": "assistant", "content": ""}, None, None)
            while not job.done:
                out = await self._next(job)
                for comp in out.outputs:
                    st = states[comp.index]
                    if st.finished:
                        continue
                    delta = comp.text[st.text_sent:] if len(comp.text) > st.text_sent else ""
                    finish = _finish(comp)
                    ts = tool_streams.get(comp.index)
                    if ts is not None:  # tools: content and tool-call deltas from the parser
                        deltas = ts.feed(comp.text, finish is not None) if (delta or finish) else []
                        st.text_sent = len(comp.text)
                        for j, d in enumerate(deltas):
                            lp = None
                            if req.logprobs and j == 0:
                                lp = {"content": _chat_logprobs((comp.logprobs or [])[st.tokens_sent:],
                                                                comp.token_ids[st.tokens_sent:], params.logprobs or 0),
                                      "refusal": None}
                                st.tokens_sent = len(comp.token_ids)
                            yield chunk(comp.index, d, lp, None)
                        if finish is not None:
                            st.finished = True
                            completion_tokens += len(comp.token_ids)
                            yield chunk(comp.index, {}, None, _tool_finish(comp, bool(ts.calls)))
                        continue
                    if delta:
                        lp = None
                        if req.logprobs:
                            lp = {"content": _chat_logprobs((comp.logprobs or [])[st.tokens_sent:],
                                                            comp.token_ids[st.tokens_sent:], params.logprobs or 0),
                                  "refusal": None}
                            st.tokens_sent = len(comp.token_ids)
                        st.text_sent += len(delta)
                        yield chunk(comp.index, {"content": delta}, lp, None)
                    if finish is not None:
                        st.finished = True
                        completion_tokens += len(comp.token_ids)
                        yield chunk(comp.index, {}, None, finish)
            if req.include_usage:
                yield _event({**base, "choices": [],
                              "usage": usage(len(job.prompts[0].token_ids), completion_tokens)})
            yield "data: [DONE]\n\n"
        except EngineDeadError as exc:
            yield _event(APIError(503, str(exc), type_="server_error", code="service_unavailable").body())
            yield "data: [DONE]\n\n"

    # What responses.py drives: the chat-completions path, under public names.
    submit, collect, next_output = _submit, _collect, _next

    def event_stream(self, gen: AsyncIterator[str], job: _Job) -> StreamingResponse:
        return _sse(gen, self, job)


# ---------------------------------------------------------------------- formatting


def _tool_finish(comp: CompletionOutput, called: bool) -> str | None:
    """OpenAI's "tool_calls" when the choice ended (not cut by length) after calling tools."""
    finish = _finish(comp)
    return "tool_calls" if called and finish == "stop" else finish


def _finish(comp: CompletionOutput) -> str | None:
    if comp.finish_reason is None:
        return None
    return comp.finish_reason if comp.finish_reason in ("stop", "length", "grammar_error") else "stop"


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _EventStream(StreamingResponse):
    """An SSE response that runs `on_close` however it ends. A client gone before the first chunk
    means the body generator never starts, so its own `finally` (which aborts) would never run."""

    def __init__(self, gen: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(gen, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(gen: AsyncIterator[str], server: "_Server", job: _Job) -> StreamingResponse:
    def close() -> None:
        if job.unfinished():
            server.aengine.abort(job.unfinished())

    return _EventStream(gen, close)


def _token_str(entry: dict[int, Logprob], token: int) -> str:
    lp = entry.get(token)
    return (lp.decoded_token if lp is not None and lp.decoded_token is not None else "")


def _top(entry: dict[int, Logprob], k: int) -> list[Logprob]:
    return sorted((lp for lp in entry.values() if lp.rank <= k), key=lambda lp: lp.rank)


def _completion_logprobs(positions: list, token_ids: list[int], k: int, offset: int) -> dict:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tok, entry in zip(token_ids, positions):
        s = _token_str(entry, tok)
        tokens.append(s)
        token_lps.append(entry[tok].logprob)
        top = {lp.decoded_token or "": lp.logprob for lp in _top(entry, k)}
        top.setdefault(s, entry[tok].logprob)
        tops.append(top)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _merge_echo_logprobs(prompt: PreparedPrompt, out: RequestOutput, completion: dict, k: int) -> dict:
    """Echo: prompt tokens' logprobs (the first is null) followed by the completion's."""
    entries = out.prompt_logprobs or []
    first = {"tokens": [prompt.first_token], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}
    rest = _completion_logprobs(entries[1:], prompt.token_ids[1:], k, len(prompt.first_token))
    shift = len(prompt.text)
    merged = {key: first[key] + rest[key] for key in first}
    merged["tokens"] += completion["tokens"]
    merged["token_logprobs"] += completion["token_logprobs"]
    merged["top_logprobs"] += completion["top_logprobs"]
    merged["text_offset"] += [o + shift for o in completion["text_offset"]]
    return merged


def _chat_logprobs(positions: list, token_ids: list[int], k: int) -> list[dict]:
    content = []
    for tok, entry in zip(token_ids, positions):
        s = _token_str(entry, tok)
        content.append({"token": s, "logprob": entry[tok].logprob, "bytes": list(s.encode("utf-8")),
                        "top_logprobs": [{"token": lp.decoded_token or "", "logprob": lp.logprob,
                                          "bytes": list((lp.decoded_token or "").encode("utf-8"))}
                                         for lp in _top(entry, k)]})
    return content
