"""Model loading and continuously batched generation for the transformers backend.

Requests queue up; one worker thread decodes a batch of rows, one token per step for every row.
A row that finishes (EOS, a stop string, its length, or its client went away) leaves the batch at
the next step, and queued requests join it between steps: their prompts are prefilled and their
KV cache is merged into the batch's. Sampling is vectorised across rows (temperature, top-p), with
one draw per row from the row's own seeded generator, so a seeded request gives the same text
alone or in any batch. An error in one row ends that row only. Tokens stream back to each
request's asyncio queue as they are produced. Each request is bound to the model that was current
when it arrived: after a swap, rows of the old model finish on it before the new model's start.
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
from lmpipe.log import log
from serving.sampling import safe_len, sample, stop_hit

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

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)


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


class Row:
    """One request being decoded: its tokens so far, its text, and its own generator."""

    def __init__(self, req: Request):
        import torch

        self.req, self.ids, self.tokens = req, [], []
        self.text, self.sent, self.scanned = "", 0, 0
        seed = req.seed if req.seed is not None else time.time_ns()
        self.gen = torch.Generator().manual_seed(seed % 2**64)


@dataclass
class Active:
    """The batch being decoded: its rows, their KV cache and attention mask, and each row's
    logits for its next token."""

    model: Loaded
    rows: list[Row]
    cache: object
    mask: object
    logits: object


class Batcher:
    def __init__(self, max_batch: int = 8, max_queue: int = 64, batch_wait_ms: float = 0.0, on_tokens=None):
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

    def _finish(self, r: Request, event: dict) -> None:
        self.release(r)
        try:
            r.emit(event)
        except RuntimeError:  # its event loop is gone: nobody is listening
            pass

    def _fail(self, r: Request, exc: Exception) -> None:
        log(f"request failed: {type(exc).__name__}: {exc}", level="error")
        self._finish(r, {"error": f"{type(exc).__name__}: {exc}"})

    # -- the loop ---------------------------------------------------------------------------
    def _work(self) -> None:
        import torch

        act, held = None, []
        while True:
            room = self.max_batch - (len(act.rows) if act else 0)
            incoming = held + self._take(block=act is None and not held, room=room)
            model = act.model if act else (incoming[0].model if incoming else None)
            joining, held = [], []
            for r in incoming:
                if r.cancelled.is_set():
                    self._finish(r, {"done": True, "finish_reason": "cancelled"})
                elif r.model is model and len(joining) + (len(act.rows) if act else 0) < self.max_batch:
                    joining.append(r)
                else:  # another model's request, or no room: it joins a later step
                    held.append(r)
            try:
                with torch.no_grad():
                    if joining:
                        act = self._join(act, model, joining)
                    if act is not None:
                        act = self._step(act)
            except Exception as exc:  # a bug here must not stop the decoder: fail this batch, keep serving
                for r in ([row.req for row in act.rows] if act else []) + joining:
                    if not r.released:
                        self._fail(r, exc)
                act = None

    def _take(self, block: bool, room: int) -> list[Request]:
        """Queued requests: wait for the first (and a little for company) only when idle."""
        got = []
        if block:
            got.append(self._q.get())
            deadline = time.monotonic() + self.wait
            while len(got) < self.max_batch:
                try:
                    got.append(self._q.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            return got
        while len(got) < room:
            try:
                got.append(self._q.get_nowait())
            except queue.Empty:
                break
        return got

    def _join(self, act: Active | None, m: Loaded, reqs: list[Request]) -> Active | None:
        """Prefill the joining prompts and merge them into the batch. A prefill that fails is
        retried one request at a time, so only the request that breaks it fails."""
        dev = next(m.model.parameters()).device
        try:
            ids, mask = _left_padded([r.prompt_ids for r in reqs], _pad_id(m))
            ids, mask = ids.to(dev), mask.to(dev)
            out = m.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                          use_cache=True)
        except Exception as exc:
            if len(reqs) == 1:
                self._fail(reqs[0], exc)
                return act
            for r in reqs:
                act = self._join(act, m, [r])
            return act
        new = Active(m, [Row(r) for r in reqs], out.past_key_values, mask, out.logits[:, -1, :])
        return new if act is None else _merge(act, new)

    def _step(self, act: Active) -> Active | None:
        """Sample every row's next token, stream it, drop finished rows, and run one decode step."""
        import torch

        m = act.model
        toks, lps, tops = sample(act.logits.float().cpu(), [row.req for row in act.rows], [row.gen for row in act.rows])
        keep = []
        for i, row in enumerate(act.rows):
            try:
                done = self._advance(m, row, int(toks[i]), float(lps[i]), tops[i])
            except Exception as exc:  # this row's error is this row's only
                self._fail(row.req, exc)
                done = True
            if not done:
                keep.append(i)
        self.on_tokens(len(act.rows))
        if not keep:
            return None
        dev = act.mask.device
        if len(keep) < len(act.rows):
            idx = torch.tensor(keep, device=dev)
            act.cache.batch_select_indices(idx)
            act.rows, act.mask, toks = [act.rows[i] for i in keep], act.mask[idx], toks[keep]
            act.cache, act.mask = _trim(act.cache, act.mask)
        act.mask = torch.cat([act.mask, torch.ones((len(keep), 1), dtype=act.mask.dtype, device=dev)], dim=1)
        try:
            out = m.model(input_ids=toks[:, None].to(dev), attention_mask=act.mask,
                          position_ids=act.mask.sum(-1, keepdim=True) - 1, past_key_values=act.cache, use_cache=True)
        except Exception as exc:  # the model itself failed: every row of this step is lost
            for row in act.rows:
                self._fail(row.req, exc)
            return None
        act.cache, act.logits = out.past_key_values, out.logits[:, -1, :]
        return act

    def _advance(self, m: Loaded, row: Row, tok: int, lp: float, top) -> bool:
        """Take one sampled token into a row: stream its text; True when the row is finished."""
        r = row.req
        if r.cancelled.is_set():
            self._finish(r, {"done": True, "finish_reason": "cancelled"})
            return True
        eos = m.tokenizer.eos_token_id
        if tok != eos:
            row.ids.append(tok)
        if r.logprobs is not None:
            row.tokens.append({"token": m.tokenizer.decode([tok]) if tok != eos else "", "logprob": lp, "top": top})
        finish = "stop" if tok == eos else None
        if finish is None and (r.stream or r.stop):  # text is needed every step only for these
            row.text = m.tokenizer.decode(row.ids, skip_special_tokens=True)
            finish = stop_hit(row, r.stop)
        n_out = len(row.ids) + (tok == eos)
        if finish is None and n_out >= r.max_tokens:
            finish = "length"
        if finish and not (r.stream or r.stop):
            row.text = m.tokenizer.decode(row.ids, skip_special_tokens=True)
        if r.stream:
            # hold back a possibly incomplete stop string or UTF-8 sequence
            safe = len(row.text) if finish else safe_len(row.text, r.stop)
            delta = row.text[row.sent:safe]
            row.sent = max(row.sent, safe)
            r.emit({"delta": delta, **(row.tokens[-1] if r.logprobs is not None else {}), "completion_tokens": n_out})
        if finish:
            self._finish(r, {"done": True, "finish_reason": finish, "completion_tokens": n_out, "text": row.text,
                             "tokens": row.tokens})
        return bool(finish)


def _pad_id(m: Loaded) -> int:
    return m.tokenizer.pad_token_id if m.tokenizer.pad_token_id is not None else 0


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


def _layers(cache) -> list[tuple]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache(layers: list[tuple]):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers)


def _merge(a: Active, b: Active) -> Active:
    """One batch of both: the shorter side is left-padded (masked) to the longer's length."""
    import torch
    import torch.nn.functional as F

    width = max(a.mask.shape[1], b.mask.shape[1])

    def lpad(t, dim_from_end: int):
        n = width - t.shape[-dim_from_end]
        if not n:
            return t
        pad = [0, 0] * (dim_from_end - 1) + [n, 0]
        return F.pad(t, pad)

    layers = [(torch.cat([lpad(ka, 2), lpad(kb, 2)]), torch.cat([lpad(va, 2), lpad(vb, 2)]))
              for (ka, va), (kb, vb) in zip(_layers(a.cache), _layers(b.cache))]
    mask = torch.cat([lpad(a.mask, 1), lpad(b.mask, 1)])
    return Active(a.model, a.rows + b.rows, _cache(layers), mask, torch.cat([a.logits, b.logits]))


def _trim(cache, mask):
    """Drop leading columns that no remaining row attends to (left by rows that left)."""
    used = mask.any(dim=0).nonzero()
    start = int(used[0]) if len(used) else 0
    if start == 0:
        return cache, mask
    return _cache([(k[:, :, start:], v[:, :, start:]) for k, v in _layers(cache)]), mask[:, start:]


_ids = itertools.count()


def completion_id() -> str:
    return f"cmpl-{int(time.time() * 1000):x}{next(_ids):04x}"


def dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"))
