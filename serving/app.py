"""The OpenAI-compatible HTTP API (FastAPI) over the batcher, with zero-downtime reloads."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from lmpipe.errors import LmpipeError
from serving import chat, completions, engine, tokens
from serving.cache import ResponseCache
from serving.limits import ApiError
from serving.models import ModelManager

OPEN_ROUTES = ("/healthz", "/readyz", "/metrics")  # the only routes open without the key, when one is set


def error(status: int, message: str, param=None, code=None, kind="invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class Metrics:
    """The Prometheus series the server exports, in a registry of its own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = reg = CollectorRegistry()
        self.requests = Counter("lmpipe_requests_total", "HTTP requests", ["route", "status"], registry=reg)
        self.latency = Histogram("lmpipe_request_seconds", "Request latency", ["route"], registry=reg)
        self.tokens = Counter("lmpipe_tokens_generated_total", "Tokens generated", registry=reg)
        self.queue = Gauge("lmpipe_queue_depth", "Requests queued or decoding", registry=reg)
        self.version = Gauge("lmpipe_model_info", "The model being served", ["name", "version"], registry=reg)
        self.reload_failures = Counter("lmpipe_reload_failures_total",
                                       "Reloads that failed (the old model kept serving)", registry=reg)
        self.reloads = Counter("lmpipe_reloads_total", "Reloads that swapped in a new model", registry=reg)
        self.cache_hits = Counter("lmpipe_cache_hits_total", "Completions answered from the response cache",
                                  registry=reg)
        self.cache_misses = Counter("lmpipe_cache_misses_total", "Cacheable completions not in the cache",
                                    registry=reg)

    def swapped(self, old, new) -> None:
        if old is not None:
            self.version.remove(old.name, str(old.version))
        self.version.labels(new.name, str(new.version)).set(1)
        self.reloads.inc()

    def text(self, depth: int) -> str:
        from prometheus_client import generate_latest

        self.queue.set(depth)
        return generate_latest(self.registry).decode()


def create_app(cfg, manager: ModelManager | None = None) -> FastAPI:
    metrics = Metrics()
    batcher = engine.Batcher(cfg.max_batch, cfg.max_queue, cfg.batch_wait_ms, on_tokens=metrics.tokens.inc)
    manager = manager or ModelManager(cfg)
    cache = ResponseCache(cfg.redis_url, cfg.cache_entries, cfg.cache_ttl_s, metrics)

    def swapped(old, new):
        metrics.swapped(old, new)
        cache.clear()

    manager.on_swap = swapped
    manager.on_failure = lambda exc: metrics.reload_failures.inc()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        manager.start()  # loads the model in the background: /healthz answers at once, /readyz once loaded
        yield
        manager.stop()

    app = FastAPI(title="lmpipe", version="1", lifespan=lifespan)
    app.state.cfg, app.state.manager, app.state.batcher, app.state.metrics = cfg, manager, batcher, metrics
    app.state.cache = cache
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.middleware("http")(_observe)
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    app.include_router(router)
    app.include_router(tokens.router)
    completions.add_route(app, cfg)
    chat.add_route(app)
    return app


async def _api_error(_req, exc: ApiError):
    return error(exc.status, exc.message, exc.param, exc.code, exc.kind)


async def _invalid(_req, exc: RequestValidationError):
    e = exc.errors()[0]
    if e.get("type") == "json_invalid":
        return error(400, "malformed JSON in the request body", None, "invalid_json")
    # The request field, as OpenAI names it: not pydantic's path into a union ("prompt.str").
    param = next((str(x) for x in e.get("loc", ()) if x != "body"), None)
    return error(400, f"invalid '{param}': {e.get('msg')}", param)


async def _observe(request: Request, call_next):
    """Auth, and request metrics by route template and status (unmatched paths share one label,
    so junk URLs cannot grow the series)."""
    cfg, metrics = request.app.state.cfg, request.app.state.metrics
    t = time.perf_counter()
    if cfg.api_key and request.url.path not in OPEN_ROUTES \
            and not _authorized(request.headers.get("authorization", ""), cfg.api_key):
        metrics.requests.labels(_route(request), "401").inc()
        return error(401, "Incorrect API key provided: send 'Authorization: Bearer <key>'", None, "invalid_api_key")
    response = await call_next(request)
    route = _route(request)
    metrics.requests.labels(route, str(response.status_code)).inc()
    metrics.latency.labels(route).observe(time.perf_counter() - t)
    return response


def _route(request: Request) -> str:
    for route in request.app.router.routes:
        if getattr(route, "path", None) == request.url.path:
            return route.path
    return "unmatched"


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with 413, before it is read whole: by its
    Content-Length, or while it streams in when it has none. Hand-written: Starlette and
    uvicorn have no body size limit. Past the limit the app sees a disconnect, and anything it
    would still send is dropped."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(scope, receive, send)
        seen, refused = 0, False

        async def counted():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                refused = True
                await self._refuse(scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def guarded(message):
            if not refused:
                await send(message)

        await self.app(scope, counted, guarded)

    async def _refuse(self, scope, receive, send):
        msg = f"the request body is larger than the server's limit of {self.limit} bytes (max_body_bytes)"
        await error(413, msg, None, "request_too_large")(scope, receive, send)


router = APIRouter()


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    """Ready or not, and nothing more: the reason for not being ready is in /v1/models and the log."""
    if request.app.state.manager.current is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    return {"status": "ready"}


@router.get("/metrics")
async def metrics(request: Request):
    text = request.app.state.metrics.text(request.app.state.batcher.depth)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(request: Request):
    manager = request.app.state.manager
    cur = manager.current
    data = []
    if cur is not None:
        data.append({"id": cur.name, "object": "model", "created": int(cur.loaded_at), "owned_by": "lmpipe",
                     "version": cur.version, "source": manager.ref, "last_reload_error": manager.last_error})
    return {"object": "list", "data": data}


@router.post("/admin/reload")
async def reload(request: Request):
    manager = request.app.state.manager
    try:
        changed = await asyncio.to_thread(manager.reload)
    except LmpipeError as exc:
        raise ApiError(500, f"reload failed, still serving {manager.current and manager.current.label}: {exc}",
                       code="reload_failed", kind="server_error") from None
    return {"reloaded": changed, "model": manager.current.label}


def _authorized(header: str, key: str) -> bool:
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
