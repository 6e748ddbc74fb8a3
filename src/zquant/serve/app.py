"""The HTTP face of the scheduler: OpenAI's endpoints on Starlette (run by uvicorn).

Starlette rather than FastAPI: the request validation is OpenAI's (`protocol`), whose error
objects FastAPI's pydantic layer would only have to be translated into, and Starlette is the
smaller dependency (FastAPI is built on it). Uvicorn is its standard server.

Every request ends cleanly: a client that goes away (detected by the ASGI ``http.disconnect``
message, watched while the answer is produced) cancels its generation, which frees its cache slot
at the scheduler's next step boundary.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import protocol
from .metrics import Metrics
from .protocol import APIError
from .scheduler import Event, Handle, Scheduler, ServerBusy

log = logging.getLogger("zquant.serve")
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


@dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20            # 1 MiB
    request_timeout_s: float = 600.0
    retry_after_s: int = 1


def _error(e: APIError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _json_body(request: Request, limit: int):
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is {int(length)} bytes; the limit is {limit}", code="body_too_large")
    data = bytearray()
    async for piece in request.stream():
        data += piece
        if len(data) > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (at byte {e.start})", code="invalid_encoding") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


class _Answer:
    """An ASGI response produced while the client is watched for a disconnect: ``produce(scope, send)``
    runs until done or until the client goes away, then the request's generation is cancelled."""

    def __init__(self, handle: Handle, produce):
        self.handle, self.produce = handle, produce

    async def __call__(self, scope, receive, send) -> None:
        work = asyncio.ensure_future(self.produce(scope, send))
        watch = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work.done() and not isinstance(work.exception(), OSError):   # OSError: the client left mid-send
                work.result()                    # re-raise what producing raised
        finally:
            for task in (work, watch):
                task.cancel()
            self.handle.cancel()                 # a no-op once the request has finished


class _Completions:
    """POST /v1/completions and /v1/chat/completions."""

    def __init__(self, scheduler: Scheduler, tokenizer, config: ServerConfig, chat: bool):
        self.scheduler, self.tokenizer, self.config, self.chat = scheduler, tokenizer, config, chat

    async def handle(self, request: Request):
        try:
            body = await _json_body(request, self.config.max_body_bytes)
            job = protocol.parse(body, self.chat, self.config.model_name, self.tokenizer, self.scheduler.slot_len)
        except APIError as e:
            return _error(e)
        try:
            handle = self.scheduler.submit(job.prompt, job.opts, self.config.request_timeout_s)
        except ServerBusy as e:
            return _error(APIError(503, str(e), code="server_busy", type="server_error"),
                          {"Retry-After": str(self.config.retry_after_s)})
        request.state.tokens = (len(job.prompt), 0)
        rid = protocol.new_id(job.chat)
        return _Answer(handle, self._streamed(job, handle, rid, request) if job.stream
                       else self._whole(job, handle, rid, request))

    def _whole(self, job, handle: Handle, rid: str, request: Request):
        async def produce(scope, send):
            pieces = []
            while (ev := await handle.events.get()).kind == "text":
                pieces.append(ev.text)
            if ev.kind == "error":
                response = _error(APIError(ev.status, ev.message, type="server_error"))
            else:
                request.state.tokens = (ev.prompt_tokens, ev.completion_tokens)
                response = JSONResponse(protocol.response(job, rid, "".join(pieces), ev.finish_reason,
                                                          ev.prompt_tokens, ev.completion_tokens))
            await response(scope, None, send)
        return produce

    def _streamed(self, job, handle: Handle, rid: str, request: Request):
        created = int(time.time())

        async def body(send, data: bytes, more: bool = True):
            await send({"type": "http.response.body", "body": data, "more_body": more})

        async def produce(scope, send):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                    (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})
            if job.chat:
                await body(send, _sse(protocol.chunk(job, rid, created, role=True)))
            while (ev := await handle.events.get()).kind == "text":
                await body(send, _sse(protocol.chunk(job, rid, created, ev.text)))
            if ev.kind == "error":
                await body(send, _sse(APIError(ev.status, ev.message, type="server_error").body()))
            else:
                request.state.tokens = (ev.prompt_tokens, ev.completion_tokens)
                await body(send, _sse(protocol.chunk(job, rid, created, finish=ev.finish_reason)))
                if job.include_usage:
                    await body(send, _sse(protocol.usage_chunk(job, rid, created, ev.prompt_tokens,
                                                               ev.completion_tokens)))
            await body(send, _sse("[DONE]"), more=False)
        return produce


class _Guard:
    """ASGI middleware: the API key on /v1, OpenAI-style 404 / 405, one log line and one metric per request."""

    def __init__(self, app, config: ServerConfig, metrics: Metrics):
        self.app, self.config, self.metrics = app, config, metrics
        self.key = None if config.api_key is None else config.api_key.encode()

    def _authorized(self, scope) -> bool:
        if self.key is None or not scope["path"].startswith("/v1"):
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, b"Bearer " + self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def watched_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            if not self._authorized(scope):
                await _error(APIError(401, "a valid API key is needed: Authorization: Bearer KEY",
                                      code="invalid_api_key"))(scope, receive, watched_send)
            elif scope["path"] not in ROUTES:
                await _error(APIError(404, f"no such endpoint: {scope['path']}"[:200], code="not_found"))(
                    scope, receive, watched_send)
            else:
                await self.app(scope, receive, watched_send)
        finally:
            path = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.requests.labels(path, str(status[0] or 499)).inc()
            prompt, completion = scope.get("state", {}).get("tokens", (0, 0))
            log.info("%s %s %s %d+%d tokens %.3f s", scope["method"], scope["path"][:200], status[0] or "-",
                     prompt, completion, time.perf_counter() - t0)


def create_app(scheduler: Scheduler, tokenizer, config: ServerConfig) -> Starlette:
    """The ASGI app serving ``scheduler`` (started and stopped with the app's lifespan)."""
    metrics = Metrics(scheduler)
    scheduler.on_first_token = metrics.ttft.observe
    started = int(time.time())

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def models(request):
        return JSONResponse(protocol.model_list(config.model_name, started))

    async def metrics_page(request):
        return Response(metrics.render(), media_type=metrics.content_type)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    async def method_not_allowed(request, exc):
        return _error(APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"))

    routes = [Route("/health", health), Route("/metrics", metrics_page), Route("/v1/models", models),
              Route("/v1/completions", _Completions(scheduler, tokenizer, config, chat=False).handle, methods=["POST"]),
              Route("/v1/chat/completions", _Completions(scheduler, tokenizer, config, chat=True).handle,
                    methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={405: method_not_allowed})
    app.add_middleware(_Guard, config=config, metrics=metrics)
    return app
