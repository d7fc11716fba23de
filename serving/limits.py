"""What a completion request may ask for, checked before any work that could be large.

Every refusal is an :class:`ApiError` in the OpenAI error shape naming the field. The cheap
checks (counts, ranges, stop strings, text that cannot be encoded, token ids outside the
vocabulary) run first, on the event loop; tokenizing the prompts runs once, in a worker
thread, and its token counts are then checked against the limits and the model's context.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

SEED_MAX = 2**63 - 1


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    echo: bool = False
    logprobs: int | None = Field(default=None)
    stream: bool = False
    stream_options: dict | None = None


def request_model(cfg) -> type[CompletionRequest]:
    """The request schema with this server's limits, so that its OpenAPI schema documents them
    (and a client generated from it, or a fuzzer, knows them). The checks below still run."""
    nonempty = Field(min_length=1, max_length=cfg.max_prompts)
    stop = Annotated[str, StringConstraints(min_length=1, max_length=cfg.max_stop_chars)]
    ids = Annotated[list[int], Field(min_length=1)]
    return create_model(
        "CompletionRequest", __base__=CompletionRequest,
        prompt=(str | Annotated[list[str], nonempty] | ids | Annotated[list[ids], nonempty], ...),
        max_tokens=(int, Field(16, ge=0, le=cfg.max_tokens_limit)),  # 0: echo only
        temperature=(float, Field(1.0, ge=0, le=2)),
        top_p=(float, Field(1.0, gt=0, le=1)),
        n=(int, Field(1, ge=1, le=cfg.max_n)),
        stop=(stop | Annotated[list[stop], Field(max_length=cfg.max_stop_sequences)] | None, None),
        seed=(int | None, Field(None, ge=0, le=SEED_MAX)),
        logprobs=(int | None, Field(None, ge=0, le=5)),
    )


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def served(request, model: str | None):
    """The model being served, if a request for ``model`` (None: any) can be answered by it."""
    cur = request.app.state.manager.current
    if cur is None:
        raise ApiError(503, "no model is loaded yet", code="model_not_ready", kind="server_error")
    if model is not None and model not in (cur.name, cur.label):
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{cur.name}'", "model",
                       "model_not_found")
    return cur


def prompts_of(body: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts: each a string or a list of token ids."""
    p = body.prompt
    if isinstance(p, str) or (p and isinstance(p[0], int)):
        return [p]
    return list(p)


def check(body: CompletionRequest, cfg, vocab_size: int) -> tuple[list, list[str]]:
    """The prompts and stop strings, once every cheap limit holds."""
    prompts = prompts_of(body)
    if not prompts or any(isinstance(p, list) and not p for p in prompts):
        raise ApiError(400, "'prompt' must be a string, a list of strings, or token ids, and not empty", "prompt")
    if len(prompts) > cfg.max_prompts:
        raise ApiError(400, f"'prompt' holds {len(prompts)} prompts; at most {cfg.max_prompts} per request", "prompt")
    _ranges(body, cfg)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > cfg.max_stop_sequences:
        raise ApiError(400, f"'stop' takes at most {cfg.max_stop_sequences} sequences (got {len(stops)})", "stop")
    if any(not 1 <= len(s) <= cfg.max_stop_chars for s in stops):
        raise ApiError(400, f"each 'stop' sequence must be 1 to {cfg.max_stop_chars} characters", "stop")
    for field, texts in (("prompt", [p for p in prompts if isinstance(p, str)]), ("stop", stops)):
        for t in texts:
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ApiError(400, f"'{field}' is not valid Unicode text: {exc.reason} at position {exc.start}",
                               field) from None
    ids = [p for p in prompts if isinstance(p, list)]
    if any(not 0 <= t < vocab_size for p in ids for t in p):
        raise ApiError(400, f"'prompt' holds token ids outside the vocabulary [0, {vocab_size})", "prompt")
    if sum(len(p) for p in ids) > cfg.max_prompt_tokens:
        raise ApiError(400, f"the prompts hold more than {cfg.max_prompt_tokens} tokens in all", "prompt")
    return prompts, stops


def _ranges(body: CompletionRequest, cfg) -> None:
    if not 1 <= body.max_tokens <= cfg.max_tokens_limit and not (body.max_tokens == 0 and body.echo):
        raise ApiError(400, f"'max_tokens' must be between 1 and {cfg.max_tokens_limit}, or 0 with echo "
                            f"(got {body.max_tokens})", "max_tokens")
    if body.max_tokens == 0 and body.stream:
        raise ApiError(400, "'max_tokens' 0 (echo only) cannot stream", "max_tokens")
    if not 1 <= body.n <= cfg.max_n:
        raise ApiError(400, f"'n' must be between 1 and {cfg.max_n} (got {body.n})", "n")
    if not 0 <= body.temperature <= 2:
        raise ApiError(400, f"'temperature' must be between 0 and 2 (got {body.temperature})", "temperature")
    if not 0 < body.top_p <= 1:
        raise ApiError(400, f"'top_p' must be in (0, 1] (got {body.top_p})", "top_p")
    if body.logprobs is not None and not 0 <= body.logprobs <= 5:
        raise ApiError(400, f"'logprobs' must be between 0 and 5 (got {body.logprobs})", "logprobs")
    if body.seed is not None and not 0 <= body.seed <= SEED_MAX:
        raise ApiError(400, f"'seed' must be between 0 and 2**63-1 (got {body.seed})", "seed")


def tokenize(prompts: list, tokenizer, cfg, context: int, max_tokens: int) -> list[list[int]]:
    """Token ids of every prompt (run in a worker thread), within the total and the context."""
    out, total = [], 0
    for p in prompts:
        ids = list(p) if isinstance(p, list) else (tokenizer(p).input_ids or [tokenizer.eos_token_id])
        total += len(ids)
        if total > cfg.max_prompt_tokens:
            raise ApiError(400, f"the prompts hold more than {cfg.max_prompt_tokens} tokens in all", "prompt")
        if len(ids) + max_tokens > context:
            raise ApiError(400, f"'prompt' is {len(ids)} tokens; with max_tokens {max_tokens} that exceeds the "
                                f"model's context of {context} tokens", "prompt", "context_length_exceeded")
        out.append(ids)
    return out
