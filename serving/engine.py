"""Model loading and dynamically batched generation for the transformers backend.

Requests queue up; one worker thread takes up to ``max_batch`` of them (waiting at most
``batch_wait_ms`` for company), left-pads their prompts and decodes them together with a KV
cache, sampling each row with its own temperature, top-p and seeded generator. Tokens
stream back to each request's asyncio queue as they are produced. A request whose client
went away is dropped from its batch at the next step. Each request is bound to the model
that was current when it arrived, so after a swap in-flight requests finish on the old one.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmpipe.errors import LmpipeError


class QueueFull(Exception):
    pass


@dataclass
class Loaded:
    """A model ready to serve."""

    name: str
    version: str | None
    path: Path
    model: object
    tokenizer: object
    context: int
    loaded_at: float = field(default_factory=time.time)

    @property
    def label(self) -> str:
        return f"{self.name}:v{self.version}" if self.version else self.name


def load(path: Path, name: str, version: str | None) -> Loaded:
    """Load an exported HF folder from safetensors only (never pickle)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "model.safetensors").is_file() and not list(path.glob("model-*.safetensors")):
        raise LmpipeError(f"{path} has no model.safetensors: lmpipe serves safetensors weights only")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, torch_dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # a broken version must never take the server down
        raise LmpipeError(f"cannot load model {name} v{version} from {path}: {type(exc).__name__}: {exc}") from None
    model.eval()
    if torch.cuda.is_available():
        model = model.to("cuda", dtype=torch.bfloat16)
    cfg = model.config
    context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 1024)
    return Loaded(name, version, path, model, tok, int(context))


@dataclass
class Request:
    model: Loaded
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    logprobs: int | None
    index: int  # choice index
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    released: bool = False
    stream: bool = True  # False: one event at the end (no per-token traffic to the event loop)

    def emit(self, event: dict) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Batcher:
    def __init__(self, max_batch: int = 8, max_queue: int = 64, batch_wait_ms: float = 5.0, on_tokens=None):
        self.max_batch, self.max_queue, self.wait = max_batch, max_queue, batch_wait_ms / 1000
        self._q: queue.Queue[Request] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self.on_tokens = on_tokens or (lambda n: None)
        threading.Thread(target=self._work, daemon=True, name="batcher").start()

    @property
    def depth(self) -> int:
        return self._pending

    def submit(self, reqs: list[Request]) -> None:
        with self._lock:
            if self._pending + len(reqs) > self.max_queue:
                raise QueueFull(f"{self._pending} requests in flight (max_queue {self.max_queue})")
            self._pending += len(reqs)
        for r in reqs:
            self._q.put(r)

    def release(self, r: Request) -> None:
        """Free a request's slot (once): when it finishes, fails, or its client goes away."""
        with self._lock:
            if not r.released:
                r.released = True
                self._pending -= 1

    def _work(self) -> None:
        while True:
            first = self._q.get()
            batch, deadline = [first], time.monotonic() + self.wait
            while len(batch) < self.max_batch:
                try:
                    r = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                batch.append(r)
            # one forward pass per model: requests bound to an older model finish on it
            for model in {id(r.model): r.model for r in batch}.values():
                group = [r for r in batch if r.model is model]
                try:
                    self._decode(model, group)
                except Exception as exc:  # report to every request; keep serving
                    for r in group:
                        r.emit({"error": f"{type(exc).__name__}: {exc}"})
                finally:
                    for r in group:
                        self.release(r)

    def _decode(self, m: Loaded, reqs: list[Request]) -> None:
        import torch

        live = [r for r in reqs if not r.cancelled.is_set()]
        for r in reqs:
            if r.cancelled.is_set():
                r.emit({"done": True, "finish_reason": "cancelled"})
        if not live:
            return
        dev = next(m.model.parameters()).device
        pad = m.tokenizer.pad_token_id if m.tokenizer.pad_token_id is not None else 0
        ids, mask = _left_padded([r.prompt_ids for r in live], pad)
        ids, mask = ids.to(dev), mask.to(dev)
        gens = [torch.Generator().manual_seed(r.seed if r.seed is not None else int(time.time_ns() % 2**31) + i)
                for i, r in enumerate(live)]
        state = [{"ids": [], "text": "", "sent": 0, "done": False} for _ in live]
        with torch.no_grad():
            out = m.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                          use_cache=True)
            for _step in range(max(r.max_tokens for r in live)):
                logits = out.logits[:, -1, :].float().cpu()
                logp = torch.log_softmax(logits, dim=-1)  # one batched pass; rows only pick from it
                greedy = torch.argmax(logits, dim=-1).tolist()
                nxt = torch.full((len(live), 1), pad, dtype=torch.long)
                for i, r in enumerate(live):
                    if not state[i]["done"]:
                        nxt[i, 0] = self._next_token(m, r, state[i], logits[i], logp[i], greedy[i], gens[i])
                self.on_tokens(sum(1 for s in state if s["ids"]))
                if all(s["done"] for s in state):
                    break
                mask = torch.cat([mask, torch.ones((len(live), 1), dtype=torch.long, device=dev)], dim=1)
                pos = (mask.sum(-1, keepdim=True) - 1)
                out = m.model(input_ids=nxt.to(dev), attention_mask=mask, position_ids=pos,
                              past_key_values=out.past_key_values, use_cache=True)

    def _next_token(self, m: Loaded, r: Request, s: dict, logits, logp, greedy: int, gen) -> int:
        """Sample one row's next token, stream its text, and finish the row on EOS, a stop string or length."""
        eos = m.tokenizer.eos_token_id
        if r.cancelled.is_set():
            s["done"] = True
            self.release(r)
            r.emit({"done": True, "finish_reason": "cancelled"})
            return eos
        tok, lp, top = _sample(logits, logp, greedy, r, gen)
        finish = "stop" if tok == eos else None
        if tok != eos:
            s["ids"].append(tok)
        if r.logprobs is not None:
            s.setdefault("tokens", []).append(
                {"token": m.tokenizer.decode([tok]) if tok != eos else "", "logprob": lp, "top": top})
        if finish is None and (r.stream or r.stop):  # text is needed every step only for these
            s["text"] = m.tokenizer.decode(s["ids"], skip_special_tokens=True)
            finish = _stop_hit(s, r.stop)
        n_out = len(s["ids"]) + (tok == eos)
        if finish is None and n_out >= r.max_tokens:
            finish = "length"
        if finish and not (r.stream or r.stop):
            s["text"] = m.tokenizer.decode(s["ids"], skip_special_tokens=True)
        if r.stream:
            # hold back a possibly incomplete stop string or UTF-8 sequence
            safe = len(s["text"]) if finish else _safe_len(s["text"], r.stop)
            delta = s["text"][s["sent"]:safe]
            s["sent"] = max(s["sent"], safe)
            r.emit({"delta": delta, **(s["tokens"][-1] if r.logprobs is not None else {}), "completion_tokens": n_out})
        if finish:
            s["done"] = True
            self.release(r)
            r.emit({"done": True, "finish_reason": finish, "completion_tokens": n_out,
                    "text": s["text"], "tokens": s.get("tokens", [])})
        return tok


def _left_padded(prompts: list[list[int]], pad: int):
    """(ids, attention mask) of the prompts, left-padded to the longest."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def _stop_hit(s: dict, stops: list[str]) -> str | None:
    for stop in stops:
        cut = s["text"].find(stop)
        if cut >= 0:
            s["text"] = s["text"][:cut]
            return "stop"
    return None


def _safe_len(text: str, stops: list[str]) -> int:
    n = len(text.rstrip("\ufffd"))
    for stop in stops:
        for k in range(len(stop) - 1, 0, -1):
            if text.endswith(stop[:k]):
                n = min(n, len(text) - k)
                break
    return n


def _sample(logits, logp, greedy: int, r: Request, gen):
    import torch

    if r.temperature == 0:
        tok = greedy
    else:
        probs = torch.softmax(logits / r.temperature, dim=-1)
        if r.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)
            keep = torch.cumsum(sp, 0) - sp < r.top_p
            probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
            probs = probs / probs.sum()
        tok = int(torch.multinomial(probs, 1, generator=gen))
    top = None
    if r.logprobs:
        vals, idx = torch.topk(logp, r.logprobs)
        top = {int(i): float(v) for v, i in zip(vals, idx)}
    return tok, float(logp[tok]), top


_ids = itertools.count()


def completion_id() -> str:
    return f"cmpl-{int(time.time() * 1000):x}{next(_ids):04x}"


def dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))
