"""The serving API under continuous batching and hostile requests: rows join and leave a running
batch, a merged batch decodes exactly what transformers' own ``generate`` decodes, one request's
failure stays its own, every limit is a 4xx naming its field, and a fuzzer finds no 5xx."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from lmpipe import config
from serving.serve import ServeConfig
from serving_helpers import running, self_signed, tiny_export

KEY = "sk-robust"


@pytest.fixture(scope="module")
def export(real_shards, tmp_path_factory):
    return tiny_export(tmp_path_factory.mktemp("robust") / "m", real_shards, seed=11, positions=2304)


def serve_cfg(export, **kw) -> ServeConfig:
    return config.build(ServeConfig, {"model": str(export), "watch_interval_s": 0, **kw})


def hf_greedy(export: Path, prompt: str, n: int) -> str:
    """The oracle: transformers' own generate, greedy, one prompt alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def complete(base: str, **body) -> httpx.Response:
    return httpx.post(base + "/v1/completions", json={"model": "m", **body}, timeout=120)


def test_requests_join_a_running_batch_and_decode_what_generate_decodes(export):
    """A long stream is decoding; requests with prompts of other lengths arrive mid-way, join its
    batch, and finish before it. Each greedy text is transformers' generate on its prompt alone,
    so the merged, left-padded KV cache changes nothing; a seeded sample is the same alone."""
    prompts = ["def f(x):", "import os\nimport sys\n\nclass Parser:", "x"]
    n = 24
    with running(serve_cfg(export, max_batch=8, max_tokens_limit=2048)) as base:
        alone = complete(base, prompt="for i in", max_tokens=n, temperature=0.9, seed=5).json()["choices"][0]["text"]
        long_done = threading.Event()
        order = []

        def long_stream():
            body = {"model": "m", "prompt": "while True:", "max_tokens": 2000, "temperature": 0, "stream": True}
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=300) as s:
                for line in s.iter_lines():
                    if line == "data: [DONE]":
                        break
            order.append("long")
            long_done.set()

        t = threading.Thread(target=long_stream)
        t.start()
        time.sleep(1.0)  # the long row is decoding
        assert not long_done.is_set()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(complete, base, prompt=p, max_tokens=n, temperature=0) for p in prompts]
            seeded = pool.submit(complete, base, prompt="for i in", max_tokens=n, temperature=0.9, seed=5)
            texts = [f.result().json()["choices"][0]["text"] for f in futs]
        order.append("short")
        joined_seeded = seeded.result().json()["choices"][0]["text"]
        t.join(timeout=300)
    assert order == ["short", "long"], "the short requests waited for the long one: they never joined its batch"
    assert texts == [hf_greedy(export, p, n) for p in prompts]
    assert joined_seeded == alone


def test_one_failing_row_fails_only_its_own_request(export):
    """Straight to the decoder, past the API's checks: a prompt with a token id outside the
    vocabulary breaks its prefill; the request prefilled with it still completes."""
    from serving import engine

    m = engine.load(export, "m", None)
    batcher = engine.Batcher(max_batch=4, batch_wait_ms=200)

    async def both():
        loop = asyncio.get_running_loop()

        def req(ids, i):
            return engine.Request(m, ids, 5, 0.0, 1.0, None, [], None, i, loop, asyncio.Queue(), stream=False)

        good, bad = req(m.tokenizer("def").input_ids, 0), req([m.vocab_size + 5], 1)
        batcher.submit([good, bad])
        return await asyncio.wait_for(good.events.get(), 60), await asyncio.wait_for(bad.events.get(), 60)

    good, bad = asyncio.run(both())
    assert good.get("done") and good["finish_reason"] == "length" and good["completion_tokens"] == 5, good
    assert "error" in bad and "index" in bad["error"].lower(), bad
    assert batcher.depth == 0


def test_a_failure_in_the_decoding_loop_fails_its_batch_and_the_decoder_keeps_serving(export, monkeypatch):
    from serving import engine

    m = engine.load(export, "m", None)
    batcher = engine.Batcher(max_batch=4)
    real, calls = engine.sample, []

    def broken_once(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("planted")
        return real(*a, **kw)

    monkeypatch.setattr(engine, "sample", broken_once)

    async def run(n):
        loop = asyncio.get_running_loop()
        reqs = [engine.Request(m, m.tokenizer("def").input_ids, 3, 0.0, 1.0, None, [], None, i, loop,
                               asyncio.Queue(), stream=False) for i in range(n)]
        batcher.submit(reqs)
        return [await asyncio.wait_for(r.events.get(), 60) for r in reqs]

    first = asyncio.run(run(1))
    assert "planted" in first[0].get("error", ""), first
    after = asyncio.run(run(2))  # the decoder thread is still there
    assert all(e.get("done") and e["completion_tokens"] == 3 for e in after), after
    assert batcher.depth == 0


LIMITS = {"max_prompts": 3, "max_prompt_tokens": 40, "max_stop_sequences": 2, "max_stop_chars": 8,
          "max_body_bytes": 4096}
BAD = [  # (raw JSON body after '{"model": "m", ', status, param)
    ('"prompt": ["a", "b", "c", "d"]', 400, "prompt"),                    # more prompts than max_prompts
    ('"prompt": ' + json.dumps([[5] * 30, [5] * 30]), 400, "prompt"),    # token ids past max_prompt_tokens
    ('"prompt": "' + "word " * 60 + '"', 400, "prompt"),                  # text past max_prompt_tokens
    ('"prompt": [1, 2, 999999]', 400, "prompt"),                          # a token id outside the vocabulary
    ('"prompt": [-1]', 400, "prompt"),
    ('"prompt": [[]]', 400, "prompt"),
    ('"prompt": "lone \\ud800 surrogate"', 400, "prompt"),
    ('"prompt": "x", "stop": ["a", "b", "c"]', 400, "stop"),
    ('"prompt": "x", "stop": "' + "s" * 9 + '"', 400, "stop"),
    ('"prompt": "x", "stop": [""]', 400, "stop"),
    ('"prompt": "x", "stop": "\\udc00"', 400, "stop"),
    ('"prompt": "x", "seed": 18446744073709551616', 400, "seed"),
    ('"prompt": "x", "seed": -1', 400, "seed"),
]


def test_every_limit_is_a_4xx_naming_its_field_and_reaches_no_model(export):
    with running(serve_cfg(export, **LIMITS)) as base:
        for raw, status, param in BAD:
            r = httpx.post(base + "/v1/completions", content=('{"model": "m", ' + raw + "}").encode(),
                           headers={"content-type": "application/json"}, timeout=30)
            assert r.status_code == status, (raw[:80], r.status_code, r.text)
            assert r.json()["error"]["param"] == param, (raw[:80], r.text)
        big = json.dumps({"model": "m", "prompt": "x" * 5000}).encode()
        r = httpx.post(base + "/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"], r.text

        def chunks():  # no Content-Length: the limit holds while the body streams in
            yield b'{"model": "m", "prompt": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}'

        r = httpx.post(base + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        metrics = httpx.get(base + "/metrics").text
        assert "lmpipe_tokens_generated_total 0.0" in metrics  # none of them reached the model
        # a temperature too small to divide by decodes greedily, as temperature 0 does
        tiny = complete(base, prompt="def", max_tokens=8, temperature=1e-39).json()["choices"][0]["text"]
        assert tiny == complete(base, prompt="def", max_tokens=8, temperature=0).json()["choices"][0]["text"]
        ids = complete(base, prompt=[[10, 20, 30]], max_tokens=2, echo=True).json()
        assert ids["usage"]["prompt_tokens"] == 3


def test_endpoints_hold_no_internals_and_bounded_metrics(export, tmp_path, monkeypatch):
    with running(serve_cfg(export, api_key=KEY)) as base:
        assert httpx.get(base + "/readyz").json() == {"status": "ready"}
        for path in ("/docs", "/openapi.json", "/redoc", "/v1/models", "/no/such/path"):
            assert httpx.get(base + path).status_code == 401, path
        for path in ("/healthz", "/readyz", "/metrics"):
            assert httpx.get(base + path).status_code == 200, path
        auth = {"Authorization": f"Bearer {KEY}"}
        for i in range(50):
            httpx.get(f"{base}/junk/{i}", headers=auth)
        metrics = httpx.get(base + "/metrics").text
        routes = {line.split('route="')[1].split('"')[0] for line in metrics.splitlines()
                  if line.startswith("lmpipe_requests_total{")}
        assert routes <= {"/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/redoc", "/v1/models",
                          "unmatched"}, routes
        assert "unmatched" in routes
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with running(config.build(ServeConfig, {"model": "models:/nothing@champion", "watch_interval_s": 0}),
                 wait_ready=False) as base:
        r = httpx.get(base + "/readyz")
        assert r.status_code == 503 and r.json() == {"status": "loading"}, r.text  # no error text


HOSTILE = [
    {"prompt": "x", "stop": ["s" * 100_000] * 4, "stream": True, "max_tokens": 32},
    {"prompt": "x", "seed": 2**64, "temperature": 1.0},
    {"prompt": "x", "temperature": 1e-39},
    {"prompt": ["y"] * 1000},
    {"prompt": [[999999]]},
    {"prompt": "x", "max_tokens": 10**9},
    {"prompt": "x", "logprobs": 99},
    {"prompt": {"nested": ["object"]}},
]


def test_hostile_requests_never_disturb_a_well_behaved_client(export):
    """While a well-behaved client sends its requests, others send hostile ones: raw bodies with
    lone surrogates and oversize payloads, the bodies above, junk paths, and streams dropped half
    way. The well-behaved client sees only 200s, and no request gets a 5xx."""
    with running(serve_cfg(export, max_body_bytes=65536)) as base:
        stop, codes, good = threading.Event(), [], []

        def hostile():
            raw = [b'{"model": "m", "prompt": "\\ud800"}', b'{"model": "m", "prompt": "' + b"x" * 70000 + b'"}',
                   b'{"model": "m", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", b"\xff\xfe"]
            for i in range(200):  # bounded in count and time
                if stop.is_set():
                    return
                body = HOSTILE[i % len(HOSTILE)]
                codes.append(httpx.post(base + "/v1/completions", json={"model": "m", **body}, timeout=60).status_code)
                codes.append(httpx.post(base + "/v1/completions", content=raw[i % len(raw)], timeout=60,
                                        headers={"content-type": "application/json"}).status_code)
                codes.append(httpx.get(f"{base}/v1/{'x' * (i % 50)}", timeout=60).status_code)
                with httpx.stream("POST", base + "/v1/completions", timeout=60,
                                  json={"model": "m", "prompt": "x", "max_tokens": 400, "stream": True}) as s:
                    next(s.iter_lines())  # and leave

        workers = [threading.Thread(target=hostile) for _ in range(2)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 90
        while len(good) < 30 and time.monotonic() < deadline:
            good.append(complete(base, prompt="def ", max_tokens=8, temperature=0.7).status_code)
        stop.set()
        for w in workers:
            w.join(timeout=120)
    assert len(good) >= 30 and set(good) == {200}, good
    assert codes and all(c < 500 for c in codes), sorted(set(codes))


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(export, tmp_path):
    """Schemathesis generates requests from the server's own OpenAPI schema, valid and invalid
    ones, for a bounded time (fuzzing repeats until it is spent), and checks that none gets a
    5xx. Its bodies name the served model (tests/fuzz_hooks.py), so they reach the decoder.
    ``/admin/reload`` takes no input and reloads the model each time: it is left out."""
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "fuzz_hooks", "LMPIPE_FUZZ_MODEL": "m",
           "PYTHONPATH": str(Path(__file__).parent)}
    with running(serve_cfg(export, max_tokens_limit=16, max_n=2)) as base:
        r = subprocess.run([str(Path(sys.executable).parent / "st"), "run", f"{base}/openapi.json",
                            "--checks", "not_a_server_error", "--seed", "1", "--max-time", "45",
                            "--request-timeout", "60", "--workers", "1", "--exclude-path", "/admin/reload"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        tokens = float(next(x for x in httpx.get(base + "/metrics").text.splitlines()
                            if x.startswith("lmpipe_tokens_generated_total ")).split()[1])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert "Test cases:" in out and "generated" in out, out[-3000:]
    assert tokens > 0, "no fuzzed request reached the decoder"


def test_prompt_logprobs_and_tokenizer_endpoints_match_transformers(export):
    """What lm-evaluation-harness's local-completions model sends (echo, logprobs, max_tokens 0
    or 1) gets the prompt's own token logprobs, checked against a forward pass with transformers;
    /tokenize and /detokenize agree with the tokenizer itself."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    prompt = "def add(a, b):\n    return a + b"
    ids = tok(prompt).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    expected = [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    with running(serve_cfg(export)) as base:
        zero = complete(base, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0).json()
        choice = zero["choices"][0]
        assert choice["text"] == prompt and zero["usage"]["completion_tokens"] == 0
        lp = choice["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
        assert "".join(lp["tokens"]) == prompt and lp["text_offset"][-1] == len(prompt) - len(lp["tokens"][-1])
        one = complete(base, prompt=[ids], max_tokens=1, echo=True, logprobs=1, temperature=0).json()
        lp1 = one["choices"][0]["logprobs"]
        assert len(lp1["token_logprobs"]) == len(ids) + 1  # the prompt's, then the one generated token
        assert lp1["token_logprobs"][1:len(ids)] == pytest.approx(expected, abs=1e-4)
        greedy = int(torch.argmax(model(torch.tensor([ids])).logits[0, -1]))
        assert lp1["tokens"][-1] == tok.decode([greedy])
        assert complete(base, prompt="x", max_tokens=0).status_code == 400  # 0 needs echo

        t = httpx.post(base + "/tokenize", json={"model": "m", "prompt": prompt}).json()
        assert t["tokens"] == ids and t["count"] == len(ids) and t["max_model_len"] == 2304
        assert httpx.post(base + "/detokenize", json={"tokens": ids}).json()["prompt"] == tok.decode(ids)
        bad = httpx.post(base + "/detokenize", json={"tokens": [10**6]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
        info = httpx.get(base + "/tokenizer_info").json()
        assert info["eos_token"] == tok.eos_token and info["model_max_length"] == 2304


def test_chat_completions_with_the_exports_template_through_the_openai_client(export):
    import openai
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]
    by_hand = ("<|im_start|>system\nYou write Python.<|im_end|>\n<|im_start|>user\ndef add(a, b):<|im_end|>\n"
               "<|im_start|>assistant\n")
    tok = AutoTokenizer.from_pretrained(export)
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == by_hand
    with running(serve_cfg(export, api_key=KEY)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=60)
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0, logprobs=True,
                                           top_logprobs=2)
        plain = client.completions.create(model="m", prompt=by_hand, max_tokens=16, temperature=0, stop=["<|im_end|>"])
        msg = r.choices[0].message
        assert r.object == "chat.completion" and msg.role == "assistant"
        assert msg.content == plain.choices[0].text and r.choices[0].finish_reason == plain.choices[0].finish_reason
        assert r.usage.prompt_tokens == plain.usage.prompt_tokens == len(tok(by_hand).input_ids)
        assert len(r.choices[0].logprobs.content) >= 1 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2
        chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="m", messages=[], max_tokens=4)


def test_lmpipe_serve_terminates_tls_with_its_certificate(export, tmp_path):
    import signal

    import openai

    from serving_helpers import free_port

    import ssl

    cert, key = self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))
    serve = [sys.executable, "-m", "lmpipe.cli", "serve", "--model", str(export), "watch_interval_s=0"]
    r = subprocess.run([*serve, f"tls_certfile={cert}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "tls_certfile and tls_keyfile go together" in r.stderr, r.stderr
    port = free_port()
    proc = subprocess.Popen([*serve, "--port", str(port), f"tls_certfile={cert}", f"tls_keyfile={key}",
                             "shutdown_grace_s=5"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"https://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/readyz", verify=trust, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the TLS server did not become ready"
            time.sleep(0.3)
        with httpx.Client(verify=trust) as http:
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60, http_client=http)
            assert client.completions.create(model="m", prompt="def", max_tokens=3, temperature=0).usage.completion_tokens
        with pytest.raises(httpx.HTTPError):  # plain HTTP gets no answer
            httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        with pytest.raises(httpx.ConnectError):  # and a client that does not trust the certificate refuses it
            httpx.get(base + "/readyz", timeout=10)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.mark.parametrize("overrides, message", [
    ({"redis_url": "localhost:6379"}, "must be a redis://"),
    ({"tls_keyfile": "/etc/hostname"}, "go together"),
    ({"tls_certfile": "/nonexistent.pem", "tls_keyfile": "/nonexistent.key"}, "is not a file"),
])
def test_serving_settings_that_cannot_work_are_refused_before_the_server_starts(overrides, message):
    from lmpipe.errors import ConfigError
    from serving.serve import resolve

    with pytest.raises(ConfigError, match=message):
        resolve(config.build(ServeConfig, {"model": "x", **overrides}))
