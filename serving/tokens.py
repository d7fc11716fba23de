"""The tokenizer endpoints vLLM's server has, so the tools that use them (lm-evaluation-harness,
benchmark clients) work against lmpipe: ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict

from serving.limits import ApiError, served

router = APIRouter()


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[int]


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    cur = served(request, body.model)
    try:
        body.prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"'prompt' is not valid Unicode text: {exc.reason} at position {exc.start}",
                       "prompt") from None
    ids = await asyncio.to_thread(lambda: cur.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens).input_ids)
    return {"count": len(ids), "max_model_len": cur.context, "tokens": ids}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    cur = served(request, body.model)
    if any(not 0 <= t < cur.vocab_size for t in body.tokens):
        raise ApiError(400, f"'tokens' holds ids outside the vocabulary [0, {cur.vocab_size})", "tokens")
    return {"prompt": await asyncio.to_thread(cur.tokenizer.decode, body.tokens)}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request):
    cur = served(request, None)
    tok = cur.tokenizer
    return {"tokenizer_class": type(tok).__name__, "vocab_size": cur.vocab_size, "model_max_length": cur.context,
            "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id, "bos_token": tok.bos_token,
            "pad_token": tok.pad_token, "chat_template": getattr(tok, "chat_template", None)}
