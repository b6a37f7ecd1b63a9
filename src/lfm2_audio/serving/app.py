"""The ASGI application: routes, error mapping, upload limits, the web page.

    GET  /                          the voice chat page (static/index.html)
    GET  /health                    {"status": "ok" | "draining" | "failed", ...}; 503 unless ok
    GET  /metrics                   Prometheus text format
    GET  /v1/models
    POST /v1/audio/transcriptions   multipart; json | text | verbose_json; stream=true for SSE
    POST /v1/audio/speech           JSON; wav | pcm, streamed
    POST /v1/chat/completions       JSON; audio input parts, modalities text/audio, stream=SSE
    WS   /v1/realtime               OpenAI-Realtime-style events (serving/realtime.py)
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import InputError
from .http_api import ApiError, error_response, make_router
from .realtime import RealtimeConnection
from .runtime import Busy, Runtime, ShuttingDown

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("lfm2_audio.serving")


class BodyLimit:
    """Refuses request bodies over `limit` bytes with 413, whether the client declares the
    length or streams it chunked, before the form parser spools them anywhere."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await error_response(413, f"request body over the {self.limit} byte limit", code="too_large")(
                scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise StarletteHTTPException(413, f"request body over the {self.limit} byte limit")
            return message

        return await self.app(scope, limited, send)


def create_app(rt: Runtime) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        await rt.startup()
        try:
            yield
        finally:
            if not rt.draining:
                await rt.drain()
            rt.shutdown()

    app = FastAPI(title="lfm2-audio", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.runtime = rt

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, e: ApiError):
        rt.metrics.errors.inc(code=e.code or str(e.status))
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(InputError)
    async def on_input_error(request: Request, e: InputError):
        rt.metrics.errors.inc(code="invalid_request")
        return error_response(400, str(e), code="invalid_request")

    @app.exception_handler(ShuttingDown)
    async def on_shutting_down(request: Request, e: ShuttingDown):
        return error_response(503, str(e), type="server_error", code="shutting_down", headers={"Connection": "close"})

    @app.exception_handler(Busy)
    async def on_busy(request: Request, e: Busy):
        rt.metrics.errors.inc(code="server_busy")
        return error_response(503, str(e), type="server_error", code="server_busy", headers={"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(e.status_code)
        return error_response(e.status_code, str(e.detail), code=code)

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, e: RequestValidationError):
        return error_response(400, str(e.errors()), code="invalid_request")

    app.include_router(make_router(rt))

    @app.get("/health")
    async def health():
        e = rt.engine
        status = "failed" if e.failure else "draining" if rt.draining else "ok"
        body = {"status": status, "model": rt.config.model_name,
                "sessions": {"open": e.open_sessions, "max": e.max_sessions, "waiting": rt.waiting},
                "requests_in_flight": e.active_requests, "audio_output": rt.has_audio_output,
                "vad": getattr(getattr(rt.vad, "scorer", None), "name", None)}
        if e.failure:  # the engine's child process died
            body["error"] = e.failure
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(rt.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket):
        if rt.draining:
            await ws.close(1013, "server shutting down")
            return
        await RealtimeConnection(ws, rt).run()

    if rt.config.max_upload_bytes:
        app.add_middleware(BodyLimit, limit=rt.config.max_upload_bytes)
    return app
