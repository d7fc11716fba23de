"""The OpenAI-compatible server: a real uvicorn server on 127.0.0.1 and the official openai client."""

import concurrent.futures
import shutil
import threading
import time

import httpx
import openai
import pytest

from lmpipe import config
from registry import tracking
from serving.serve import ServeConfig
from serving_helpers import register, running, tiny_export

KEY = "sk-test-123"


@pytest.fixture(scope="module")
def exports(real_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving")
    a = tiny_export(root / "a", real_shards, seed=1)
    b = tiny_export(root / "b", real_shards, seed=2)
    broken = root / "broken"
    shutil.copytree(a, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    return {"a": a, "b": b, "broken": broken}


def serve_cfg(**kw) -> ServeConfig:
    return config.build(ServeConfig, {"watch_interval_s": 0, **kw})


def test_openai_client_completes_streams_and_reports_usage(exports):
    with running(serve_cfg(model=str(exports["a"]), api_key=KEY)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=60)
        r = client.completions.create(model="a", prompt="def add(a, b):", max_tokens=12, temperature=0)
        choice = r.choices[0]
        assert isinstance(choice.text, str) and choice.finish_reason in ("length", "stop")
        assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 12
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

        # greedy streaming gives the same text, in SSE chunks ending with [DONE] (the client checks)
        chunks = list(client.completions.create(model="a", prompt="def add(a, b):", max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

        same = [client.completions.create(model="a", prompt="import", max_tokens=10, temperature=1.0, seed=7).choices[0].text
                for _ in range(2)]
        assert same[0] == same[1]  # seeded sampling is reproducible

        multi = client.completions.create(model="a", prompt=["x = ", "y = "], n=2, max_tokens=4, echo=True, logprobs=2)
        assert sorted(c.index for c in multi.choices) == [0, 1, 2, 3]
        assert multi.choices[0].text.startswith("x = ") and multi.choices[3].text.startswith("y = ")
        lp = multi.choices[0].logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
        # echo: the prompt's tokens come first, the first with no logprob, then at most 4 generated
        assert lp.token_logprobs[0] is None and "".join(lp.tokens).startswith("x = ")
        assert all(len(t) <= 2 for t in lp.top_logprobs[1:])

        full = client.completions.create(model="a", prompt="class ", max_tokens=20, temperature=0).choices[0].text
        if len(full) > 6:
            stop = full[3:6]
            cut = client.completions.create(model="a", prompt="class ", max_tokens=20, temperature=0, stop=[stop])
            assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"

        models = client.models.list().data
        assert [m.id for m in models] == ["a"]
        for bad in (None, "wrong"):
            headers = {} if bad is None else {"Authorization": f"Bearer {bad}"}
            resp = httpx.post(base + "/v1/completions", json={"model": "a", "prompt": "x"}, headers=headers)
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).completions.create(model="a", prompt="x")
        assert httpx.get(base + "/healthz").status_code == 200 and httpx.get(base + "/readyz").status_code == 200
        metrics = httpx.get(base + "/metrics").text
        for name in ("lmpipe_requests_total", "lmpipe_request_seconds_bucket", "lmpipe_tokens_generated_total",
                     "lmpipe_queue_depth", 'lmpipe_model_info{name="a"'):
            assert name in metrics


BAD_REQUESTS = [  # (body, status, param, code): every 4xx docs/serving.md lists
    ({"prompt": "word " * 300, "max_tokens": 4}, 400, "prompt", "context_length_exceeded"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
    ({"prompt": "x", "max_tokens": 100000}, 400, "max_tokens", None),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens", None),
    ({"prompt": "x", "n": 50}, 400, "n", None),
    ({"prompt": "x", "temperature": 3.5}, 400, "temperature", None),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", None),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p", None),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs", None),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({"prompt": []}, 400, "prompt", None),
    ({"prompt": 42}, 400, "prompt", None),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ({"max_tokens": 3}, 400, "prompt", None),
]


def test_bad_requests_get_openai_errors_and_never_reach_the_model(exports):
    with running(serve_cfg(model=str(exports["a"]))) as base:
        for body, status, param, code in BAD_REQUESTS:
            r = httpx.post(base + "/v1/completions", json={"model": "a", **body}, timeout=30)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert err["param"] == param and param.split(".")[0] in err["message"], (body, err)
            assert code is None or err["code"] == code, (body, err)
        r = httpx.post(base + "/v1/completions", content=b'{"model": "a", "prompt": ', timeout=30,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
        metrics = httpx.get(base + "/metrics").text
        assert "lmpipe_tokens_generated_total 0.0" in metrics  # none of them reached the model
        assert httpx.get(base + "/healthz").status_code == 200  # still up


def test_admin_needs_the_key_and_a_server_without_a_model_answers_503(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with running(serve_cfg(model="models:/nothing-registered@champion", api_key=KEY), wait_ready=False) as base:
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.post(base + "/admin/reload", timeout=30).status_code == 401
        assert httpx.get(base + "/readyz", timeout=30).status_code == 503
        r = httpx.post(base + "/v1/completions", json={"model": "lmpipe", "prompt": "x"}, headers=auth, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready", r.text


def test_burst_past_the_queue_gets_429_quickly(exports):
    with running(serve_cfg(model=str(exports["a"]), max_queue=2, max_batch=1, cache_entries=0)) as base:
        def call():
            t = time.monotonic()
            r = httpx.post(base + "/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 80,
                                                           "temperature": 0}, timeout=120)
            return r.status_code, time.monotonic() - t

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda _: call(), range(12)))
        codes = [c for c, _ in results]
        assert codes.count(429) >= 6 and codes.count(200) >= 2, codes
        assert max(t for c, t in results if c == 429) < 5.0  # refused fast, not queued



def metric(base: str, name: str) -> float:
    line = next(x for x in httpx.get(base + "/metrics").text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def test_a_client_that_leaves_mid_stream_stops_its_decode_and_frees_its_slot(real_shards, tmp_path):
    """The oracle is the token counter: a stream of 2,000 tokens whose client leaves after the first
    chunk must stop long before 2,000 tokens are decoded (without cancellation it runs to the end)."""
    export = tiny_export(tmp_path / "long", real_shards, seed=3, positions=2304)
    with running(serve_cfg(model=str(export), max_batch=1, max_queue=2, max_tokens_limit=2048)) as base:
        body = {"model": "long", "prompt": "x", "max_tokens": 2000, "temperature": 0, "stream": True}
        before = metric(base, "lmpipe_tokens_generated_total")
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as s:
            next(s.iter_lines())
        deadline = time.monotonic() + 300  # bounded; a decode that is never cancelled ends by itself
        while metric(base, "lmpipe_queue_depth") > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        decoded = metric(base, "lmpipe_tokens_generated_total") - before
        assert decoded < 1000, f"{decoded:.0f} tokens decoded for a client that left after the first chunk"
        r = httpx.post(base + "/v1/completions", json={"model": "long", "prompt": "x", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200  # its slot is free


def test_alias_moves_under_load_with_zero_failures_and_broken_versions_are_kept_out(exports):
    cfg = tracking.TrackingConfig(model_name="servetest")
    c = tracking.client(cfg)
    va, vb, vbroken = (register(exports[k], "servetest", cfg) for k in ("a", "b", "broken"))
    c.set_registered_model_alias("servetest", "champion", va)
    # the cache off: the load must keep decoding, or repeated greedy requests would be answered from it
    with running(serve_cfg(model="models:/servetest@champion", api_key=KEY, watch_interval_s=0.5,
                           cache_entries=0)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=60)
        seen, failures, stop = [], [], threading.Event()

        def load():
            deadline = time.monotonic() + 120
            for _ in range(400):  # bounded in count and time
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    r = client.completions.create(model="servetest", prompt="def ", max_tokens=3, temperature=0)
                    seen.append(r.system_fingerprint)
                except Exception as exc:  # any failure counts
                    failures.append(repr(exc))

        workers = [threading.Thread(target=load) for _ in range(3)]
        for w in workers:
            w.start()
        time.sleep(1.5)
        c.set_registered_model_alias("servetest", "champion", vb)
        deadline = time.monotonic() + 60
        while f"servetest:v{vb}" not in seen[-5:] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert f"servetest:v{vb}" in seen[-5:]

        c.set_registered_model_alias("servetest", "champion", vbroken)
        time.sleep(3)  # several watch intervals: every reload of the broken version fails
        n = len(seen)
        time.sleep(1)
        stop.set()
        for w in workers:
            w.join(timeout=120)
        assert failures == []
        assert seen[0] == f"servetest:v{va}" and set(seen[n:]) == {f"servetest:v{vb}"}
        m = client.models.list().data[0]
        assert m.model_extra["version"] == vb and "cannot load model" in m.model_extra["last_reload_error"]
        metrics = httpx.get(base + "/metrics").text
        failed = [x for x in metrics.splitlines() if x.startswith("lmpipe_reload_failures_total")]
        assert failed and float(failed[0].split()[-1]) >= 1
        assert f'lmpipe_model_info{{name="servetest",version="{vb}"}} 1.0' in metrics

        c.set_registered_model_alias("servetest", "champion", va)
        r = httpx.post(base + "/admin/reload", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == f"servetest:v{va}"
        assert httpx.post(base + "/admin/reload", timeout=10).status_code == 401


def cache_counts(base: str) -> tuple[float, float]:
    return metric(base, "lmpipe_cache_hits_total"), metric(base, "lmpipe_cache_misses_total")


def test_deterministic_requests_are_cached_per_version_and_others_never(exports):
    cfg = tracking.TrackingConfig(model_name="cachetest")
    c = tracking.client(cfg)
    va, vb = (register(exports[k], "cachetest", cfg) for k in ("a", "b"))
    c.set_registered_model_alias("cachetest", "champion", va)
    with running(serve_cfg(model="models:/cachetest@champion")) as base:
        greedy = {"model": "cachetest", "prompt": "def add(", "max_tokens": 12, "temperature": 0}
        first = httpx.post(base + "/v1/completions", json=greedy, timeout=60).json()
        tokens = metric(base, "lmpipe_tokens_generated_total")
        again = httpx.post(base + "/v1/completions", json=greedy, timeout=60).json()
        assert again["choices"] == first["choices"] and again["id"] != first["id"]
        assert cache_counts(base) == (1, 1)
        assert metric(base, "lmpipe_tokens_generated_total") == tokens  # the hit decoded nothing
        seeded = {**greedy, "temperature": 0.9, "seed": 3}
        for _ in range(2):
            httpx.post(base + "/v1/completions", json=seeded, timeout=60)
        assert cache_counts(base) == (2, 2)
        for _ in range(2):  # sampled without a seed: never cached, never counted
            httpx.post(base + "/v1/completions", json={**seeded, "seed": None}, timeout=60)
        assert cache_counts(base) == (2, 2)

        c.set_registered_model_alias("cachetest", "champion", vb)  # a new version: none of the old entries
        assert httpx.post(base + "/admin/reload", timeout=60).json()["model"] == f"cachetest:v{vb}"
        new = httpx.post(base + "/v1/completions", json=greedy, timeout=60).json()
        assert new["system_fingerprint"] == f"cachetest:v{vb}" and cache_counts(base) == (2, 3)


@pytest.fixture
def redis_server(tmp_path):
    """Debian's redis-server on a free loopback port, stopped by its pid."""
    import subprocess

    from serving_helpers import free_port

    port = free_port()
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    import redis

    deadline = time.monotonic() + 30
    while True:
        try:
            redis.Redis(port=port, socket_timeout=1).ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline and proc.poll() is None, "redis-server did not start"
            time.sleep(0.1)
    yield {"url": f"redis://127.0.0.1:{port}/1", "proc": proc}
    proc.terminate()
    proc.wait(timeout=30)


def test_replicas_share_the_cache_in_redis_and_serve_on_when_it_is_gone(exports, redis_server):
    import redis

    greedy = {"model": "a", "prompt": "class ", "max_tokens": 10, "temperature": 0}
    with running(serve_cfg(model=str(exports["a"]), redis_url=redis_server["url"])) as one, \
            running(serve_cfg(model=str(exports["a"]), redis_url=redis_server["url"])) as two:
        first = httpx.post(one + "/v1/completions", json=greedy, timeout=60).json()
        assert cache_counts(one) == (0, 1)
        keys = redis.Redis.from_url(redis_server["url"]).keys("lmpipe:completion:*")
        assert len(keys) == 1 and redis.Redis.from_url(redis_server["url"]).ttl(keys[0]) > 0
        # the other replica loaded the same folder at another time: for a folder, the load is the version
        httpx.post(two + "/v1/completions", json=greedy, timeout=60)
        assert cache_counts(two) == (0, 1)
    cfg = tracking.TrackingConfig(model_name="redistest")
    v = register(exports["a"], "redistest", cfg)
    tracking.client(cfg).set_registered_model_alias("redistest", "champion", v)
    greedy["model"] = "redistest"
    with running(serve_cfg(model="models:/redistest@champion", redis_url=redis_server["url"])) as one, \
            running(serve_cfg(model="models:/redistest@champion", redis_url=redis_server["url"])) as two:
        first = httpx.post(one + "/v1/completions", json=greedy, timeout=60).json()
        second = httpx.post(two + "/v1/completions", json=greedy, timeout=60).json()
        assert cache_counts(two) == (1, 0) and second["choices"] == first["choices"]  # one version, one entry
        redis_server["proc"].terminate()
        redis_server["proc"].wait(timeout=30)
        r = httpx.post(two + "/v1/completions", json={**greedy, "prompt": "import"}, timeout=60)
        assert r.status_code == 200 and cache_counts(two) == (1, 1)  # Redis gone: a miss, never a failure
