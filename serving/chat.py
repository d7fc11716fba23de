"""POST /v1/chat/completions: the OpenAI chat API on top of the completions path.

The messages are rendered with the chat template stored in the exported tokenizer
(``tokenizer.apply_chat_template``, with the assistant's turn opened), and the rendered text
is completed like a prompt, with the template's end-of-turn marker as a stop string. Every
completions limit applies; the answer comes back in the chat shape, streamed or whole.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from lmpipe.chat_template import END_OF_TURN
from serving import completions
from serving.limits import ApiError, CompletionRequest, served

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    stream: bool = False
    stream_options: dict | None = None


def add_route(app: FastAPI) -> None:
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])


async def chat_completions(body: ChatRequest, request: Request):
    cfg, cur = request.app.state.cfg, served(request, body.model)
    template = getattr(cur.tokenizer, "chat_template", None)
    if not template:
        raise ApiError(400, f"the model '{cur.name}' has no chat template: use /v1/completions", "messages",
                       "no_chat_template")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    try:
        prompt = await asyncio.to_thread(cur.tokenizer.apply_chat_template, messages, tokenize=False,
                                         add_generation_prompt=True)
    except Exception as exc:  # a template that cannot render these messages
        raise ApiError(400, f"the chat template cannot render these messages: {exc}", "messages") from None
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    as_completion = CompletionRequest(
        model=body.model, prompt=prompt, max_tokens=body.max_completion_tokens or body.max_tokens or cfg.max_tokens_limit,
        temperature=body.temperature, top_p=body.top_p, n=body.n, stop=body.stop, seed=body.seed,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None, stream=body.stream,
        stream_options=body.stream_options)
    out = await completions.completions(as_completion, request, end_stops=(END_OF_TURN,), stream_choice=_chunk_choice)
    if body.stream:
        return out
    return JSONResponse(_chat_shape(out))


def _chunk_choice(index: int, text: str, finish, logprobs) -> tuple[str, dict]:
    return "chat.completion.chunk", {"index": index, "delta": {"role": "assistant", "content": text},
                                     "logprobs": _chat_logprobs(logprobs), "finish_reason": finish}


def _chat_shape(out: dict) -> dict:
    choices = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                "logprobs": _chat_logprobs(c["logprobs"]), "finish_reason": c["finish_reason"]}
               for c in out["choices"]]
    return {**out, "object": "chat.completion", "choices": choices}


def _chat_logprobs(lp: dict | None) -> dict | None:
    """The completions ``logprobs`` object in the chat shape: one entry per token."""
    if not lp:
        return None
    return {"content": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8")),
                         "top_logprobs": [{"token": k, "logprob": x, "bytes": list(k.encode("utf-8"))}
                                          for k, x in (top or {}).items()]}
                        for t, v, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])]}
