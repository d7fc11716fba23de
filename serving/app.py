"""The OpenAI-compatible HTTP API (FastAPI) over the batcher, with zero-downtime reloads."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from lmpipe.errors import LmpipeError
from serving import engine, limits
from serving.limits import ApiError, CompletionRequest
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
    manager.on_swap = metrics.swapped
    manager.on_failure = lambda exc: metrics.reload_failures.inc()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        manager.start()  # loads the model in the background: /healthz answers at once, /readyz once loaded
        yield
        manager.stop()

    app = FastAPI(title="lmpipe", version="1", lifespan=lifespan)
    app.state.cfg, app.state.manager, app.state.batcher, app.state.metrics = cfg, manager, batcher, metrics
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.middleware("http")(_observe)
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    app.include_router(router)
    _completions_route(app, cfg)
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


def _completions_route(app: FastAPI, cfg) -> None:
    """POST /v1/completions, with a request schema that carries this server's limits."""
    async def create_completion(body, request: Request):
        return await completions(body, request)

    create_completion.__annotations__ = {"body": limits.request_model(cfg), "request": Request}
    app.add_api_route("/v1/completions", create_completion, methods=["POST"])


async def completions(body: CompletionRequest, request: Request):
    cfg, manager, batcher = request.app.state.cfg, request.app.state.manager, request.app.state.batcher
    cur = manager.current
    if cur is None:
        raise ApiError(503, "no model is loaded yet", code="model_not_ready", kind="server_error")
    if body.model not in (cur.name, cur.label):
        raise ApiError(404, f"The model '{body.model}' does not exist; this server serves '{cur.name}'",
                       "model", "model_not_found")
    prompts, stops = limits.check(body, cfg, cur.vocab_size)
    ids = await asyncio.to_thread(limits.tokenize, prompts, cur.tokenizer, cfg, cur.context, body.max_tokens)
    prompts = [p if isinstance(p, str) else cur.tokenizer.decode(p) for p in prompts]  # for echo
    reqs = _requests(body, cur, ids, stops, asyncio.get_running_loop())
    try:
        batcher.submit(reqs)
    except engine.QueueFull as exc:
        raise ApiError(429, f"server busy: {exc}; retry later", code="rate_limit_exceeded",
                       kind="rate_limit_error") from None
    cid, created = engine.completion_id(), int(time.time())
    if body.stream:
        return StreamingResponse(_stream(request, body, cur, reqs, prompts, cid, created),
                                 media_type="text/event-stream")
    choices = await asyncio.gather(*(_collect(r, body, cur, prompts[r.index // body.n]) for r in reqs))
    if any("error" in c for c in choices):
        raise ApiError(500, next(c["error"] for c in choices if "error" in c), kind="server_error")
    completion = sum(c.pop("_tokens") for c in choices)
    prompt_tokens = sum(len(x) for x in ids)
    return {"id": cid, "object": "text_completion", "created": created, "model": cur.name,
            "system_fingerprint": cur.label, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion}}


def _authorized(header: str, key: str) -> bool:
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _requests(body: CompletionRequest, cur, ids: list[list[int]], stops: list[str], loop) -> list[engine.Request]:
    reqs = []
    for pi, prompt_ids in enumerate(ids):
        for j in range(body.n):
            seed = None if body.seed is None else (body.seed + j) % 2**64
            reqs.append(engine.Request(cur, prompt_ids, body.max_tokens, body.temperature, body.top_p, seed, stops,
                                       body.logprobs, pi * body.n + j, loop, asyncio.Queue(), stream=body.stream))
    return reqs


def _logprobs(tokens: list[dict], start: int, tok) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = start
    for t in tokens:
        out["tokens"].append(t["token"])
        out["token_logprobs"].append(t["logprob"])
        out["top_logprobs"].append({tok.decode([k]): v for k, v in (t["top"] or {}).items()})
        out["text_offset"].append(offset)
        offset += len(t["token"])
    return out


async def _collect(r: engine.Request, body, cur, prompt: str) -> dict:
    while True:
        ev = await r.events.get()
        if "error" in ev:
            return {"error": ev["error"], "_tokens": 0}
        if ev.get("done"):
            prefix = prompt if body.echo else ""
            lp = _logprobs(ev.get("tokens", []), len(prefix), cur.tokenizer) if body.logprobs is not None else None
            return {"text": prefix + ev.get("text", ""), "index": r.index, "finish_reason": ev["finish_reason"],
                    "logprobs": lp, "_tokens": ev.get("completion_tokens", 0)}


async def _stream(request: Request, body, cur, reqs, prompts, cid: str, created: int):
    """Server-sent events in the OpenAI shape, ending with ``data: [DONE]``."""
    def chunk(index: int, text: str, finish=None, logprobs=None) -> str:
        return "data: " + engine.dumps({"id": cid, "object": "text_completion", "created": created, "model": cur.name,
                                        "system_fingerprint": cur.label, "choices": [
                                            {"text": text, "index": index, "logprobs": logprobs,
                                             "finish_reason": finish}]}) + "\n\n"

    merged: asyncio.Queue = asyncio.Queue()

    async def pump(r):
        while True:
            ev = await r.events.get()
            await merged.put((r, ev))
            if ev.get("done") or "error" in ev:
                return

    tasks = [asyncio.create_task(pump(r)) for r in reqs]
    completion = 0
    try:
        if body.echo:
            for r in reqs:
                yield chunk(r.index, prompts[r.index // body.n])
        open_ = len(reqs)
        while open_:
            r, ev = await merged.get()
            if "error" in ev:
                yield "data: " + engine.dumps({"error": {"message": ev["error"], "type": "server_error"}}) + "\n\n"
                open_ -= 1
                continue
            if "delta" in ev and ev["delta"]:
                lp = _logprobs([ev], 0, cur.tokenizer) if body.logprobs is not None else None
                yield chunk(r.index, ev["delta"], logprobs=lp)
            if ev.get("done"):
                open_ -= 1
                completion += ev.get("completion_tokens", 0)
                yield chunk(r.index, "", ev["finish_reason"])
        if (body.stream_options or {}).get("include_usage"):
            pt = sum(len(r.prompt_ids) for r in reqs[::body.n])
            yield "data: " + engine.dumps({"id": cid, "object": "text_completion", "created": created,
                                           "model": cur.name, "choices": [],
                                           "usage": {"prompt_tokens": pt, "completion_tokens": completion,
                                                     "total_tokens": pt + completion}}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we finished): free the slots
        for r in reqs:
            r.cancelled.set()
        for t in tasks:
            t.cancel()

