"""POST /v1/completions: the OpenAI completions API over the batcher, streaming or not, with
echo and logprobs (of the prompt too, as lm-evaluation-harness asks for)."""

from __future__ import annotations

import asyncio
import time

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from serving import engine, limits, sampling
from serving.limits import ApiError, CompletionRequest


def add_route(app: FastAPI, cfg) -> None:
    """POST /v1/completions, with a request schema that carries this server's limits."""
    async def create_completion(body, request: Request):
        return await completions(body, request)

    create_completion.__annotations__ = {"body": limits.request_model(cfg), "request": Request}
    app.add_api_route("/v1/completions", create_completion, methods=["POST"])


async def completions(body: CompletionRequest, request: Request, end_stops: tuple[str, ...] = (),
                      stream_choice=None):
    """A completion, streamed or whole. ``end_stops`` are added to the request's own stop strings
    (a chat template's end of turn); ``stream_choice`` shapes each streamed choice (chat)."""
    cfg, batcher = request.app.state.cfg, request.app.state.batcher
    cur = limits.served(request, body.model)
    prompts, stops = limits.check(body, cfg, cur.vocab_size)
    cache, key = request.app.state.cache, request.app.state.cache.key(cur, body)
    if key and (hit := await cache.get(key)) is not None:
        return {**hit, "id": engine.completion_id(), "created": int(time.time())}
    ids = await asyncio.to_thread(limits.tokenize, prompts, cur.tokenizer, cfg, cur.context, body.max_tokens)
    if body.echo:  # the prompts' text, to send back
        prompts = [p if isinstance(p, str) else cur.tokenizer.decode(p) for p in prompts]
    scored = None
    if body.echo and body.logprobs is not None:  # the prompt's own logprobs (lm-evaluation-harness)
        scored = await asyncio.to_thread(lambda: [sampling.prompt_logprobs(cur, x, body.logprobs) for x in ids])
    if body.max_tokens == 0:
        return _echo_only(body, cur, ids, prompts, scored)
    reqs = _requests(body, cur, ids, stops + list(end_stops), asyncio.get_running_loop())
    try:
        batcher.submit(reqs)
    except engine.QueueFull as exc:
        raise ApiError(429, f"server busy: {exc}; retry later", code="rate_limit_exceeded",
                       kind="rate_limit_error") from None
    cid, created = engine.completion_id(), int(time.time())
    if body.stream:
        return StreamingResponse(_stream(body, cur, reqs, prompts, cid, created, stream_choice or _text_choice),
                                 media_type="text/event-stream")
    choices = await asyncio.gather(*(_collect(r, body, cur, prompts[r.index // body.n],
                                              scored and scored[r.index // body.n]) for r in reqs))
    if any("error" in c for c in choices):
        raise ApiError(500, next(c["error"] for c in choices if "error" in c), kind="server_error")
    completion = sum(c.pop("_tokens") for c in choices)
    prompt_tokens = sum(len(x) for x in ids)
    response = {"id": cid, "object": "text_completion", "created": created, "model": cur.name,
                "system_fingerprint": cur.label, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}
    if key:
        await cache.put(key, response)
    return response


def _requests(body: CompletionRequest, cur, ids: list[list[int]], stops: list[str], loop) -> list[engine.Request]:
    reqs = []
    for pi, prompt_ids in enumerate(ids):
        for j in range(body.n):
            seed = None if body.seed is None else (body.seed + j) % 2**64
            reqs.append(engine.Request(cur, prompt_ids, body.max_tokens, body.temperature, body.top_p, seed, stops,
                                       body.logprobs, pi * body.n + j, loop, asyncio.Queue(), stream=body.stream))
    return reqs


def _logprobs(tokens: list[dict], start: int, tok) -> dict:
    """The OpenAI completions ``logprobs`` object; an echoed prompt's first token has none."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = start
    for t in tokens:
        out["tokens"].append(t["token"])
        out["token_logprobs"].append(t["logprob"])
        out["top_logprobs"].append(None if t["top"] is None and t["logprob"] is None else
                                   {tok.decode([k]): v for k, v in (t["top"] or {}).items()})
        out["text_offset"].append(offset)
        offset += len(t["token"])
    return out


async def _collect(r: engine.Request, body, cur, prompt: str, scored: list[dict] | None) -> dict:
    while True:
        ev = await r.events.get()
        if "error" in ev:
            return {"error": ev["error"], "_tokens": 0}
        if ev.get("done"):
            prefix = prompt if body.echo else ""
            lp = None
            if body.logprobs is not None:
                tokens = (scored or []) + ev.get("tokens", [])
                lp = _logprobs(tokens, 0 if scored else len(prefix), cur.tokenizer)
            return {"text": prefix + ev.get("text", ""), "index": r.index, "finish_reason": ev["finish_reason"],
                    "logprobs": lp, "_tokens": ev.get("completion_tokens", 0)}


def _echo_only(body, cur, ids: list[list[int]], prompts: list[str], scored) -> dict:
    """max_tokens 0 with echo: the prompts back, with their logprobs when asked; nothing decoded."""
    choices = [{"text": prompts[i // body.n], "index": i, "finish_reason": "length",
                "logprobs": _logprobs(scored[i // body.n], 0, cur.tokenizer) if scored else None}
               for i in range(len(prompts) * body.n)]
    n = sum(len(x) for x in ids)
    return {"id": engine.completion_id(), "object": "text_completion", "created": int(time.time()),
            "model": cur.name, "system_fingerprint": cur.label, "choices": choices,
            "usage": {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}}


def _text_choice(index: int, text: str, finish, logprobs) -> tuple[str, dict]:
    return "text_completion", {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}


async def _stream(body, cur, reqs, prompts, cid: str, created: int, shape):
    """Server-sent events in the OpenAI shape, ending with ``data: [DONE]``."""
    def chunk(index: int, text: str, finish=None, logprobs=None) -> str:
        kind, choice = shape(index, text, finish, logprobs)
        return "data: " + engine.dumps({"id": cid, "object": kind, "created": created, "model": cur.name,
                                        "system_fingerprint": cur.label, "choices": [choice]}) + "\n\n"

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
            yield "data: " + engine.dumps({"id": cid, "object": shape(0, "", None, None)[0], "created": created,
                                           "model": cur.name, "choices": [],
                                           "usage": {"prompt_tokens": pt, "completion_tokens": completion,
                                                     "total_tokens": pt + completion}}) + "\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we finished): free the slots
        for r in reqs:
            r.cancelled.set()
        for t in tasks:
            t.cancel()

