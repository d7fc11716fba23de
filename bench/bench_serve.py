"""Benchmark: the server against raw ``model.generate`` in-process, and continuous batching
under concurrency.

Same model and prompts in one run; one JSON line per result:
- server tokens/s for one client against raw ``model.generate`` (goal >= 0.9x);
- throughput at 16 concurrent clients against 1 (goal >= 5x, from continuous batching), with
  requests of mixed lengths, so rows finish at different steps and queued ones take their place;
- p50/p99 request latency at 1 and at 16 clients;
- a response-cache hit against a miss: the same deterministic requests sent twice (median latency);
- two replicas behind Debian's HAProxy against one replica alone, at 16 clients (each of the two
  gets half the cores' threads, as two replicas on one machine should).

    .venv/bin/python bench/bench_serve.py [--model EXPORT_DIR] [--requests 48] [--max-tokens 64]
"""

import argparse
import os
import sys
import concurrent.futures
import contextlib
import subprocess
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

PROMPTS = ["def parse(", "import os\n", "class Config:", "The result is", "for i in range(", "return self."]


def emit(**kw) -> None:
    print(json.dumps({"bench": "serve", **kw}), flush=True)


def default_model(work: Path) -> Path:
    """A tiny randomly initialised model with a BPE trained on Python's docs (speed is what counts)."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from lmpipe import config
    from spark_jobs import demo_corpus, tokenizer
    from training import recipes

    texts = [d["text"] for _, d in zip(range(300), demo_corpus.documents())]
    tok = tokenizer.train(iter(texts), config.build(tokenizer.TokenizerConfig, {"vocab_size": 4096}))
    (work / "tokenizer.json").write_text(tok.to_str())
    torch.manual_seed(0)
    model = recipes.build_model(recipes.tiny().model, tok.get_vocab_size(), tok.token_to_id("<|endoftext|>"))
    model.config.use_cache = True
    out = work / "model"
    model.save_pretrained(out, safe_serialization=True)
    PreTrainedTokenizerFast(tokenizer_file=str(work / "tokenizer.json"), eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(out)
    return out


def raw_generate(model_dir: Path, n: int, max_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tokens, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for i in range(n):
            ids = tok(PROMPTS[i % len(PROMPTS)], return_tensors="pt").input_ids
            n_tokens = max_tokens if i % 3 else max(1, max_tokens // 4)  # the same mix as the clients
            out = model.generate(ids, max_new_tokens=n_tokens, do_sample=False, pad_token_id=tok.eos_token_id,
                                 use_cache=True)
            tokens += out.shape[1] - ids.shape[1]
    return tokens / (time.perf_counter() - t0)


def load(base: str, name: str, n: int, clients: int, max_tokens: int):
    import httpx

    http = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=clients))  # keep-alive, like real clients

    def one(i):
        t = time.perf_counter()
        n_tokens = max_tokens if i % 3 else max(1, max_tokens // 4)  # mixed lengths
        r = http.post(base + "/v1/completions", json={
            "model": name, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": n_tokens, "temperature": 0})
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"], time.perf_counter() - t

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat = sorted(x for _, x in results)
    return sum(t for t, _ in results) / wall, lat


def cache_latency(base: str, name: str, n: int, max_tokens: int) -> tuple[float, float]:
    """Median latency of n seeded requests (misses), then of the same n again (hits)."""
    import httpx

    def timed(i):
        t = time.perf_counter()
        r = httpx.post(base + "/v1/completions", timeout=300, json={
            "model": name, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8,
            "seed": 1000 + i})
        r.raise_for_status()
        return time.perf_counter() - t

    misses = [timed(i) for i in range(n)]
    hits = [timed(i) for i in range(n)]
    return statistics.median(misses), statistics.median(hits)


@contextlib.contextmanager
def server_process(model_dir: Path, *overrides: str, env: dict | None = None):
    """``lmpipe serve`` in its own process, as in production (not sharing the client's GIL)."""
    import httpx

    with socket.socket() as sock:  # a free port on loopback
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lmpipe.cli", "serve", "--model", str(model_dir), "--port", str(port),
                             "watch_interval_s=0", "max_batch=16", *overrides], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextlib.contextmanager
def balanced(model_dir: Path, replicas: int):
    """``replicas`` servers behind Debian's HAProxy (lmpipe/balancer.py's configuration)."""
    from lmpipe import balancer

    threads = str(max(1, (os.cpu_count() or 1) // replicas))
    with contextlib.ExitStack() as stack:
        bases = [stack.enter_context(server_process(model_dir, "cache_entries=0", env={"OMP_NUM_THREADS": threads}))
                 for _ in range(replicas)]
        folder = Path(tempfile.mkdtemp(prefix="lmpipe-bench-lb-"))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        servers = {f"replica-{i + 1}": b.removeprefix("http://") for i, b in enumerate(bases)}
        (folder / "haproxy.cfg").write_text(balancer.config(servers, f"127.0.0.1:{port}", str(folder / "admin.sock")))
        proc = subprocess.Popen(["haproxy", "-db", "-f", str(folder / "haproxy.cfg")], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        stack.callback(proc.wait, 30)
        stack.callback(proc.terminate)
        rt = balancer.Runtime(str(folder / "admin.sock"))
        for _ in range(300):
            with contextlib.suppress(balancer.BalancerError):
                if all(s.in_rotation for s in rt.servers()):
                    break
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", threads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    model_dir = Path(args.model) if args.model else default_model(Path(tempfile.mkdtemp(prefix="lmpipe-bench-serve-")))
    # best of two for the 1-client measures: on a shared machine one run can lose a core for a while
    raw = raw_generate(model_dir, max(4, args.requests // 4), args.max_tokens)
    with server_process(model_dir, "cache_entries=0") as base:  # throughput of decoding, not of the cache
        load(base, model_dir.name, 2, 1, 8)  # warm up
        one, lat1 = max(load(base, model_dir.name, max(4, args.requests // 4), 1, args.max_tokens) for _ in range(2))
        many, latn = load(base, model_dir.name, args.requests, 16, args.max_tokens)
    with server_process(model_dir) as base:
        load(base, model_dir.name, 2, 1, 8)  # warm up
        miss, hit = cache_latency(base, model_dir.name, 8, args.max_tokens)
    with balanced(model_dir, 2) as (base, threads):
        load(base, model_dir.name, 4, 2, 8)  # warm up
        two, lat2 = load(base, model_dir.name, args.requests, 16, args.max_tokens)
    raw = max(raw, raw_generate(model_dir, max(4, args.requests // 4), args.max_tokens))
    emit(metric="raw_generate", tokens_per_s=round(raw, 1), cores=os.cpu_count())
    emit(metric="server_1_client", tokens_per_s=round(one, 1), ratio_vs_raw=round(one / raw, 3), goal=0.9,
         p50_s=round(statistics.median(lat1), 3), p99_s=round(lat1[min(len(lat1) - 1, int(0.99 * len(lat1)))], 3))
    emit(metric="server_16_clients", tokens_per_s=round(many, 1), ratio_vs_1_client=round(many / one, 3), goal=5.0,
         p50_s=round(statistics.median(latn), 3), p99_s=round(latn[min(len(latn) - 1, int(0.99 * len(latn)))], 3))
    emit(metric="cache_hit_vs_miss", miss_p50_s=round(miss, 4), hit_p50_s=round(hit, 4),
         ratio_hit_vs_miss=round(hit / miss, 4))
    emit(metric="two_replicas_behind_haproxy_vs_one", clients=16, tokens_per_s=round(two, 1),
         one_replica_tokens_per_s=round(many, 1), ratio=round(two / many, 3), threads_per_replica=int(threads),
         p50_s=round(statistics.median(lat2), 3), p99_s=round(lat2[min(len(lat2) - 1, int(0.99 * len(lat2)))], 3))


if __name__ == "__main__":
    main()
