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
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) <= 4
        assert all(len(t) <= 2 for t in lp.top_logprobs)

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


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "word " * 300, "max_tokens": 4}, 400, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": "x", "n": 50}, 400, "n"),
    ({"prompt": "x", "temperature": 3.5}, 400, "temperature"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"max_tokens": 3}, 400, "prompt"),
])
def test_bad_requests_get_openai_errors(exports, body, status, param):
    with running(serve_cfg(model=str(exports["a"]))) as base:
        r = httpx.post(base + "/v1/completions", json={"model": "a", **body}, timeout=30)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["param"] == param and param.split(".")[0] in err["message"]
        r = httpx.post(base + "/v1/completions", content=b'{"model": "a", "prompt": ', timeout=30,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
        assert httpx.get(base + "/healthz").status_code == 200  # still up


def test_burst_past_the_queue_gets_429_quickly_and_disconnects_free_slots(exports):
    with running(serve_cfg(model=str(exports["a"]), max_queue=2, max_batch=1)) as base:
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

        # a client that leaves mid-stream frees its slot
        for _ in range(2):
            with httpx.stream("POST", base + "/v1/completions", timeout=60,
                              json={"model": "a", "prompt": "x", "max_tokens": 120, "stream": True}) as s:
                next(s.iter_lines())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = httpx.post(base + "/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 2}, timeout=60)
            if r.status_code == 200:
                break
            time.sleep(0.2)
        assert r.status_code == 200


def test_alias_moves_under_load_with_zero_failures_and_broken_versions_are_kept_out(exports):
    cfg = tracking.TrackingConfig(model_name="servetest")
    c = tracking.client(cfg)
    va, vb, vbroken = (register(exports[k], "servetest", cfg) for k in ("a", "b", "broken"))
    c.set_registered_model_alias("servetest", "champion", va)
    with running(serve_cfg(model="models:/servetest@champion", api_key=KEY, watch_interval_s=0.5)) as base:
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
