"""The OpenAI-compatible HTTP API: a thin front over the same engine as gRPC.

`GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions`, `GET /health`, on
Starlette served by uvicorn on its own thread and event loop, in the server's process.
A request passes the same security policy as a gRPC call (`SecurityInterceptor.admit`:
drain gate, API keys as `Authorization: Bearer`, per-adapter permissions, per-key
concurrency), is converted by the same `RequestConverter` (one GenerateRequest per
choice, built in server/api/openai.py) and submitted to the same engine. The engine thread
hands events to the event loop through a sink (`GenerationRequest.events`) that wakes the
loop, so no thread blocks per request. `n` choices are n engine requests; on the PyTorch
engine the first computes the prompt and the others copy its keys and values
(`GenerationRequest.prefill_from`), computing only the last prompt token themselves. A
client that goes away cancels its requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from server.api import openai as oa
from server.api.convert import RequestConverter
from server.api.errors import status_of
from server.api.health import ServerHealth
from server.api.servicer import report_finished
from server.engine.protocol import Engine
from server.engine.types import ErrorEvent, FinishEvent, FinishReason, TokenEvent
from server.metrics import ServerMetrics
from server.security.interceptor import TEXT_GENERATION, Denied, SecurityInterceptor

log = logging.getLogger(__name__)


class _Sink:
    """A request's `events`: the engine thread puts, the event loop gets (index, event)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue,
                 index: int) -> None:
        self.loop, self.queue, self.index = loop, queue, index

    def put(self, ev) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, ev))
        except RuntimeError:  # the loop has closed (server stopping): nobody listens
            pass


class _Choice:
    def __init__(self, req, handle) -> None:
        self.req, self.handle = req, handle
        self.text: list[str] = []
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list[list[tuple[int, float]]] = []
        self.chars = 0  # text length so far (completions' text_offset)
        self.finish: FinishEvent | None = None
        self.error: ErrorEvent | None = None
        self.done = False


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _error(e: oa.HttpError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class HttpApi:
    def __init__(self, engine: Engine, registry, converter: RequestConverter,
                 security: SecurityInterceptor, metrics: ServerMetrics, model_id: str,
                 health: ServerHealth) -> None:
        self.engine = engine
        self.health_state = health  # GET /health: the same answer as gRPC health
        self.registry = registry  # server.adapters.registry.AdapterRegistry: /v1/models
        self.conv = converter
        self.security = security
        self.metrics = metrics
        self.model_id = model_id
        info = engine.info()
        self.max_choices = info.max_batch_size
        self.fingerprint = f"fp_{info.fingerprint[:12]}"
        self.logprobs = {chat: oa.LogprobsBuilder(engine.tokenizer, chat) for chat in (False, True)}
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="http-submit")
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ], exception_handlers={HTTPException: self._http_exception})

    async def _http_exception(self, request: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(oa.HttpError(exc.status_code, f"{request.method} {request.url.path}: "
                                   f"{exc.detail}", type=kind))

    # ---- probes and models ----------------------------------------------------------
    async def health(self, request: Request) -> Response:
        status, detail = self.health_state.check()
        if status == "ok":
            return JSONResponse({"status": "ok"})
        body = {"status": status, **({"detail": detail} if status == "unhealthy" else {})}
        return JSONResponse(body, status_code=503)

    def _visible_models(self, request: Request) -> list[dict[str, Any]]:
        if self.security.gate.draining:
            raise oa.http_error(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        try:
            key = self.security.key_for(_bearer(request))
        except Denied as e:
            raise oa.http_error(e.code, e.message) from None
        created = oa.now()
        out = []
        if key is None or key.allows(""):
            out.append({"id": self.model_id, "object": "model", "created": created,
                        "owned_by": "switchboard", "root": self.model_id, "parent": None})
        for entry in self.registry.entries():
            if key is None or key.allows(entry.adapter_id):
                out.append({"id": entry.adapter_id, "object": "model", "created": created,
                            "owned_by": "switchboard", "root": self.model_id,
                            "parent": self.model_id, "method": entry.method,
                            "version": entry.version})
        return out

    async def models(self, request: Request) -> Response:
        try:
            return JSONResponse({"object": "list", "data": self._visible_models(request)})
        except oa.HttpError as e:
            return _error(e)

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        try:
            for m in self._visible_models(request):
                if m["id"] == name:
                    return JSONResponse(m)
        except oa.HttpError as e:
            return _error(e)
        return _error(oa.HttpError(404, f"model {name!r} does not exist or this key may not "
                                   "use it", type="not_found_error", param="model",
                                   code="model_not_found"))

    # ---- generation -------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        token = _bearer(request)
        release = parsed = None
        try:
            if self.security.gate.draining:
                raise Denied(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
            self.security.key_for(token)  # 401 before the body is looked at
            body = await self._body(request)
            parsed = oa.parse_request(body, chat=chat, max_choices=self.max_choices)
            adapter_id = "" if parsed.model == self.model_id else parsed.model
            release = self.security.admit(TEXT_GENERATION, "Generate", token, adapter_id)
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            choices = await loop.run_in_executor(
                self._pool, self._submit, parsed, adapter_id, loop, queue)
        except Exception as e:
            if release is not None:
                release()
            return _error(self._http_error(e, parsed))
        watcher = asyncio.create_task(self._watch_disconnect(request, choices, release))
        if parsed.stream:
            return StreamingResponse(
                self._stream(parsed, choices, queue, watcher, release),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            await self._collect(choices, queue)
        finally:
            watcher.cancel()
            self._abandon(choices)
            release()
        return self._unary(parsed, choices)

    async def _body(self, request: Request) -> Any:
        """The JSON body, at most --max-message-size bytes (the gRPC message limit)."""
        limit = self.conv.limits.max_message_bytes
        too_big = oa.HttpError(413, f"the request body is larger than the limit of {limit} "
                               "bytes (--max-message-size)", code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_big
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise too_big
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise oa.HttpError(400, f"the request body is not valid JSON: {e}") from None

    def _http_error(self, exc: BaseException, parsed: oa.Parsed | None) -> oa.HttpError:
        names = parsed.names if parsed is not None else None
        if isinstance(exc, Denied):
            return oa.http_error(exc.code, exc.message, retry_after_ms=exc.retry_after_ms)
        err = oa.error_from(exc, names, self.conv.limits.retry_after_ms)
        if err.status == 404 and parsed is not None:
            err.message = (f"model {parsed.model!r} does not exist (neither the base model "
                           f"{self.model_id!r} nor a loaded adapter): {err.message}")
            err.param, err.code = "model", "model_not_found"
        return err

    def _submit(self, parsed: oa.Parsed, adapter_id: str, loop, queue) -> list[_Choice]:
        """On a pool thread (tokenizing and routing may take a while): convert and
        submit every choice; on any failure cancel those already submitted."""
        choices: list[_Choice] = []
        try:
            n = len(parsed.requests) // parsed.prompts
            for i, msg in enumerate(parsed.requests):
                msg.adapter_id = adapter_id
                req = self.conv.generation_request(msg, None)
                req.events = _Sink(loop, queue, i)
                if i % n:  # the same prompt as choice i - i % n: share its prefill
                    req.prefill_from = choices[i - i % n].req.request_id
                handle = self.engine.submit(req)
                self.metrics.request_started(adapter_id)
                choices.append(_Choice(req, handle))
        except Exception as e:
            for c in choices:
                c.handle.cancel()
                report_finished(self.metrics, c.req, ErrorEvent("CANCELLED", ""))
            code, _ = status_of(e)
            self.metrics.request_finished(adapter_id, code.name, None, None, None, 0, 0,
                                          cause=getattr(e, "cause", ""))
            raise
        return choices

    async def _watch_disconnect(self, request: Request, choices: list[_Choice],
                                release) -> None:
        """Cancel the choices when the client goes away (the engine drops them at its
        next step) and let the drain gate go."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                for c in choices:
                    if not c.done:
                        c.handle.cancel()
                release()
                return

    def _abandon(self, choices: list[_Choice]) -> None:
        """Cancel what is still running (the client left, or another choice failed)."""
        for c in choices:
            if not c.done:
                c.handle.cancel()
                c.done = True
                report_finished(self.metrics, c.req, ErrorEvent("CANCELLED", ""))

    def _take(self, c: _Choice, ev) -> str:
        """Record an event of choice c; -> its new text."""
        if isinstance(ev, TokenEvent):
            c.ids.extend(ev.token_ids)
            c.logprobs.extend(ev.logprobs)
            c.tops.extend(ev.top_logprobs)
            c.text.append(ev.text)
            return ev.text
        c.done = True
        cancelled = isinstance(ev, FinishEvent) and ev.reason == FinishReason.CANCELLED
        report_finished(self.metrics, c.req, ev, "CANCELLED" if cancelled else "OK")
        if isinstance(ev, ErrorEvent):
            c.error = ev
            return ""
        c.finish = ev
        c.text.append(ev.text)
        c.ids.extend(ev.token_ids)  # held back by an output policy until the end
        c.logprobs.extend(ev.logprobs)
        c.tops.extend(ev.top_logprobs)
        return ev.text

    async def _collect(self, choices: list[_Choice], queue: asyncio.Queue) -> None:
        pending = len(choices)
        while pending:
            index, ev = await queue.get()
            c = choices[index]
            self._take(c, ev)
            if c.done:
                pending -= 1
                if c.error is not None:
                    self._abandon(choices)
                    return

    def _failure(self, choices: list[_Choice]) -> oa.HttpError | None:
        for c in choices:
            if c.error is not None:
                return oa.http_error(grpc.StatusCode[c.error.code], c.error.message)
        return None

    def _usage(self, parsed: oa.Parsed, choices: list[_Choice]) -> dict[str, int]:
        n = len(choices) // parsed.prompts
        prompt = sum(c.finish.prompt_tokens for c in choices[::n] if c.finish)
        completion = sum(c.finish.completion_tokens for c in choices if c.finish)
        cached = sum(c.finish.cached_tokens for c in choices[::n] if c.finish)
        return oa.usage(prompt, completion, cached)

    def _unary(self, parsed: oa.Parsed, choices: list[_Choice]) -> Response:
        err = self._failure(choices)
        if err is not None:
            return _error(err)
        out = []
        lp = self.logprobs[parsed.chat]
        for i, c in enumerate(choices):
            logprobs = (lp.build(c.ids, c.logprobs, c.tops, 0)
                        if parsed.logprobs is not None else None)
            out.append(oa.choice_object(parsed, i, "".join(c.text),
                                        oa.FINISH[c.finish.reason], logprobs))
        return JSONResponse(oa.completion_object(
            parsed, oa.new_id(parsed.chat), oa.now(), out, self._usage(parsed, choices),
            self.fingerprint))

    async def _stream(self, parsed: oa.Parsed, choices: list[_Choice], queue: asyncio.Queue,
                      watcher: asyncio.Task, release):
        rid, created = oa.new_id(parsed.chat), oa.now()
        lp = self.logprobs[parsed.chat]
        try:
            if parsed.chat:  # the role first, as OpenAI does
                yield _sse(oa.chunk_object(parsed, rid, created, [
                    oa.choice_object(parsed, i, "", None, None, delta=True, first=True)
                    for i in range(len(choices))], self.fingerprint))
            pending = len(choices)
            while pending:
                index, ev = await queue.get()
                c = choices[index]
                start = c.chars
                n_ids = len(c.ids)
                text = self._take(c, ev)
                c.chars += len(text)
                if c.error is not None:
                    err = self._failure(choices)
                    yield _sse(err.body())
                    break
                logprobs = None
                if parsed.logprobs is not None and len(c.ids) > n_ids:
                    logprobs = lp.build(c.ids[n_ids:], c.logprobs[n_ids:], c.tops[n_ids:],
                                        start)
                finish = oa.FINISH[c.finish.reason] if c.finish else None
                if text or logprobs or finish:
                    yield _sse(oa.chunk_object(parsed, rid, created, [oa.choice_object(
                        parsed, index, text, finish, logprobs, delta=True)], self.fingerprint))
                if c.done:
                    pending -= 1
            else:
                if parsed.include_usage:
                    yield _sse(oa.chunk_object(parsed, rid, created, [], self.fingerprint,
                                               self._usage(parsed, choices)))
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            self._abandon(choices)
            release()


class HttpServer:
    """uvicorn on its own thread and event loop, on a socket bound here (so that a bad
    address fails at start and port 0 reports the port it got)."""

    def __init__(self, api: HttpApi, host: str, port: int) -> None:
        self.api = api
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host.strip("[]"), port))
        except OSError as e:
            self.sock.close()
            raise SystemExit(f"error: cannot bind the HTTP API on {host}:{port}: {e}") from None
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(api.app, log_level="warning", access_log=False,
                                lifespan="off", loop="asyncio", http="h11",
                                timeout_graceful_shutdown=2, timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
