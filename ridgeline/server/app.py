"""FastAPI routes of the OpenAI-compatible server.

Handlers parse and validate the body themselves (limits.py bounds it first), so bad JSON and
wrongly typed fields are 400s in OpenAI's error format, never FastAPI's 422; they run
tokenization and admission in the engine thread through AsyncEngine.call, then either collect
the final outputs or stream deltas as server-sent events. A request that ends early (client
gone, cancelled by shutdown) is aborted, by `_collect` or by the event stream's close, which
frees its KV blocks before the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import LLMEngine
from ..outputs import CompletionOutput, Logprob, RequestOutput
from ..sampling_params import SamplingParams
from .async_engine import AsyncEngine, EngineDeadError
from .limits import BodyLimits, limits_for, read_json
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import (APIError, ChatCompletionRequest, CompletionRequest, RequestMeta, error_from_validation,
                       error_from_value, usage)

log = logging.getLogger("ridgeline.server")
DISCONNECT_POLL_S = 0.5  # how often a non-streaming handler checks whether its client left


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_queue: int | None = None  # requests admitted but not yet running; beyond this: 503
    limits: BodyLimits | None = None  # None: derived from the engine's vocabulary and context length


@dataclass
class _Prompt:
    """A prompt as admitted by the engine thread."""

    text: str
    token_ids: list[int]
    first_token: str  # decoded first token (echo + logprobs: its logprob is null)


# ---------------------------------------------------------------------- app


def build_app(aengine: AsyncEngine, metrics: ServerMetrics, config: ServerConfig) -> FastAPI:
    """The ASGI app over a running AsyncEngine; shutting the app down stops the engine thread."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        aengine.shutdown()

    app = FastAPI(title="ridgeline", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    server = _Server(aengine, metrics, config)
    limits = config.limits or limits_for(aengine.engine)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(APIError(exc.status_code, msg, type_=kind).body(), status_code=exc.status_code)

    if config.api_key is not None:
        app.add_middleware(_APIKeyMiddleware, api_key=config.api_key)
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

    return app


class _APIKeyMiddleware:
    """Bearer-token check on /v1 routes, as plain ASGI (BaseHTTPMiddleware would wrap `receive`
    and hide client disconnects from the handlers)."""

    def __init__(self, app: Callable, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.partition(" ")
            err = None
            if not header:
                err = APIError(401, "missing API key: send 'Authorization: Bearer KEY'",
                               type_="authentication_error", code="invalid_api_key")
            elif scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
                err = APIError(401, "incorrect API key provided", type_="authentication_error", code="invalid_api_key")
            if err is not None:
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
    prompts: list[_Prompt]
    params: SamplingParams
    finals: dict[str, RequestOutput] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return len(self.finals) == len(self.request_ids)

    def unfinished(self) -> list[str]:
        return [r for r in self.request_ids if r not in self.finals]


class _Server:
    def __init__(self, aengine: AsyncEngine, metrics: ServerMetrics, config: ServerConfig):
        self.aengine, self.metrics, self.config = aengine, metrics, config
        self.created = int(time.time())

    def model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "ridgeline",
                "root": str(self.aengine.engine.model_path), "parent": None,
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
        """Tokenize, check lengths and add every prompt in the engine thread (all or none)."""
        self._check_model(model)
        self._check_ready(len(prompts))
        meta = RequestMeta.new(prefix, self.config.model_name)
        rids = [f"{meta.id}-{i}" for i in range(len(prompts))]
        q = self.aengine.open_streams(rids)

        def admit(engine: LLMEngine) -> list[_Prompt]:
            admitted: list[_Prompt] = []
            try:
                for rid, prompt in zip(rids, prompts):
                    admitted.append(_admit_one(engine, rid, prompt, params, prompt_param))
            except Exception:
                for rid in rids[:len(admitted)]:
                    engine.abort_request(rid)
                raise
            return admitted

        try:
            admitted = await self.aengine.call(admit)
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
        return _Job(meta, rids, q, admitted, params)

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

    async def _stream_completion(self, job: _Job, req: CompletionRequest) -> AsyncIterator[str]:
        params = job.params
        states = {(p, i): _Choice() for p in range(len(job.prompts)) for i in range(params.n)}
        index_of = {rid: p for p, rid in enumerate(job.request_ids)}
        base = {"id": job.meta.id, "object": "text_completion", "created": job.meta.created, "model": job.meta.model,
                "system_fingerprint": None}
        extra = {"usage": None} if req.include_usage else {}
        completion_tokens = 0
        try:
            if req.echo:
                for (p, i), st in states.items():
                    prompt = job.prompts[p]
                    lp = None
                    if params.logprobs is not None:
                        lp = {"tokens": [prompt.first_token], "token_logprobs": [None], "top_logprobs": [None],
                              "text_offset": [0]}
                    yield _event({**base, "choices": [{"index": p * params.n + i, "text": prompt.text,
                                                       "logprobs": lp, "finish_reason": None}], **extra})
            while not job.done:
                out = await self._next(job)
                p = index_of[out.request_id]
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
                                                  params.logprobs, st.text_sent)
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
        params = req.sampling_params()
        messages = [m.as_template_message() for m in req.messages]
        job = await self._submit("chatcmpl", req.model, [(messages, req.add_generation_prompt)], params,
                                 "messages")
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
            choices.append({"index": comp.index,
                            "message": {"role": "assistant", "content": comp.text, "refusal": None,
                                        "tool_calls": []},
                            "logprobs": logprobs, "finish_reason": _finish(comp)})
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


# ---------------------------------------------------------------------- engine-thread admission


def _admit_one(engine: LLMEngine, rid: str, prompt: Any, params: SamplingParams, param: str) -> _Prompt:
    tok = engine.tokenizer
    if isinstance(prompt, tuple):  # chat: (messages, add_generation_prompt)
        messages, add_gen = prompt
        if not tok.chat_template:
            raise APIError(400, "messages: this model has no chat template; use /v1/completions", param="messages")
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_gen)
        except Exception as exc:  # jinja raises on conversations the template refuses
            raise APIError(400, f"messages: the chat template rejected the conversation: {exc}",
                           param="messages") from None
        ids = tok.encode(text, add_special_tokens=False)
    elif isinstance(prompt, str):
        text, ids = prompt, engine.tokenize(prompt)
    else:
        vocab = engine.model_config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt: token id {bad[0]} is out of range [0, {vocab - 1}]", param="prompt")
        ids = list(prompt)
        text = tok.decode(ids)
    limit = engine.max_model_len
    if len(ids) >= limit:
        raise APIError(400, f"{param}: this model's maximum context length is {limit} tokens, but the {param} "
                            f"has {len(ids)} tokens (at most {limit - 1} leave room for output)", param=param)
    if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
        raise APIError(400, f"max_tokens: this model's maximum context length is {limit} tokens; the request "
                            f"asks for {len(ids) + params.max_tokens} ({len(ids)} in the {param}, "
                            f"{params.max_tokens} in the completion)", param="max_tokens")
    _check_fits_kv_pool(engine, len(ids), params.max_tokens if params.max_tokens is not None else limit - len(ids))
    engine.add_request({"prompt_token_ids": ids}, params, request_id=rid)
    engine.requests[rid].prompt = text
    return _Prompt(text=text, token_ids=ids, first_token=tok.decode(ids[:1]))


def _check_fits_kv_pool(engine: LLMEngine, num_prompt: int, max_new: int) -> None:
    """Each sample needs KV blocks for its whole sequence at once (samples of one request can take
    turns, through preemption, so only one sequence must fit). The engine sizes its pool to at
    least the context length, which makes this a guard against a queue that would never move."""
    bs, pool = engine.cache_config.block_size, engine.cache_config.num_blocks
    need = -(-(num_prompt + max_new) // bs)
    if need > pool:
        raise APIError(400, f"max_tokens: {num_prompt} prompt + {max_new} completion tokens need {need} KV-cache "
                            f"blocks, but the pool holds {pool} ({pool * bs} tokens)", param="max_tokens")


# ---------------------------------------------------------------------- formatting


def _finish(comp: CompletionOutput) -> str | None:
    if comp.finish_reason is None:
        return None
    return comp.finish_reason if comp.finish_reason in ("stop", "length") else "stop"


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


def _merge_echo_logprobs(prompt: _Prompt, out: RequestOutput, completion: dict, k: int) -> dict:
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
