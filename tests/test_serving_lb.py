"""Serving replicas (real ``lmpipe serve`` processes) behind Debian's HAProxy on loopback: the
health checks and retries that hide a dead replica, TLS at the balancer, and ``roll_out``
(lm_serving_rollout's task body, called directly) never draining the last replica in rotation.
The rollout through Airflow under load is in test_pipeline_dag.py."""

from __future__ import annotations

import os
import ssl
import time

import httpx
import pytest

from lb_helpers import Load, StateLog, haproxy, replicas
from serving_helpers import make_champion, register, self_signed, tiny_export

pytestmark = pytest.mark.slow


def addresses(reps) -> dict[str, str]:
    return {name: addr for name, (addr, _) in reps.items()}


def model_id(url: str, **kw) -> str:
    return httpx.get(url + "/v1/models", trust_env=False, **kw).json()["data"][0]["id"]


def until(check, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)
    return value


def test_a_replica_killed_mid_load_costs_only_retried_requests(real_shards, tmp_path):
    model = tiny_export(tmp_path / "model", real_shards, seed=3)
    with replicas(2, str(model), tmp_path / "replicas") as reps, \
            haproxy(addresses(reps), tmp_path / "lb") as (url, rt), \
            Load(url, model_id(url), clients=6, max_s=180) as load:
        load.wait_for(40)
        # SIGKILL replica-1 while requests are in flight on it
        until(lambda: rt.server("replica-1").sessions > 0, "no request ever in flight on replica-1")
        reps["replica-1"][1].kill()
        reps["replica-1"][1].wait()
        killed_at = load.total
        until(lambda: not rt.server("replica-1").up, "HAProxy never marked the killed replica down")
        load.wait_for(60)
        dead = rt.server("replica-1")
    assert load.failures == [], load.failures[:5]
    assert load.total > killed_at + 60 and set(load.counts) == {200}, load.counts
    # requests it had in flight were sent again (wretr), and new ones moved to replica-2 (wredis)
    assert dead.retries + dead.redispatches > 0, dead


def test_tls_terminates_at_the_load_balancer(real_shards, tmp_path):
    model = tiny_export(tmp_path / "model", real_shards, seed=3)
    cert, key = self_signed(tmp_path)
    pem = tmp_path / "lb.pem"  # HAProxy takes the certificate and its key in one file
    pem.write_bytes(cert.read_bytes() + key.read_bytes())
    with replicas(1, str(model), tmp_path / "replicas") as reps, \
            haproxy(addresses(reps), tmp_path / "lb", tls_pem=pem) as (url, _):
        assert url.startswith("https://")
        trusted = ssl.create_default_context(cafile=str(cert))
        name = model_id(url, verify=trusted)
        r = httpx.post(url + "/v1/completions", json={"model": name, "prompt": "def ", "max_tokens": 4},
                       verify=trusted, trust_env=False, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(url + "/healthz", trust_env=False, timeout=10)  # the system's CAs do not know it
        with pytest.raises(httpx.HTTPError):
            r = httpx.get(url.replace("https://", "http://") + "/healthz", trust_env=False, timeout=10)
            r.raise_for_status()  # plain HTTP on the TLS port gets no answer


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A SQLite MLflow registry for this test; MLflow's process-wide tracking URI is put back after."""
    import mlflow

    from registry import tracking

    prior = os.environ.get("MLFLOW_TRACKING_URI")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = tracking.TrackingConfig(uri=uri)
    yield cfg, tracking.client(cfg)
    mlflow.set_tracking_uri(prior)


def test_roll_out_never_drains_the_last_replica_in_rotation(real_shards, tmp_path, registry, monkeypatch):
    from lmpipe_airflow import lm_serving_rollout as rollout

    cfg, c = registry
    v1 = register(tiny_export(tmp_path / "v1", real_shards, seed=3), "lmpipe", cfg)
    make_champion(c, v1)
    with replicas(2, "models:/lmpipe@champion", tmp_path / "replicas", env={"MLFLOW_TRACKING_URI": cfg.uri}) as reps, \
            haproxy(addresses(reps), tmp_path / "lb") as (url, rt):
        reps["replica-1"][1].kill()
        reps["replica-1"][1].wait()
        until(lambda: not rt.server("replica-1").up, "HAProxy never marked the killed replica down")
        v2 = register(tiny_export(tmp_path / "v2", real_shards, seed=7), "lmpipe", cfg)
        make_champion(c, v2)
        monkeypatch.setenv("LMPIPE_LB_ADMIN", rt.address)
        monkeypatch.setenv("LMPIPE_SERVE_URL", url)
        with StateLog(rt) as states, Load(url, model_id(url), clients=4, max_s=180) as load:
            load.wait_for(10)
            rollout.roll(v2)
            load.wait_for(10)
        survivor = "http://" + reps["replica-2"][0]
        assert str(rollout.served(survivor)["version"]) == v2
    assert load.failures == [], load.failures[:5]
    lb_log = (tmp_path / "lb" / "haproxy.log").read_text()
    assert "replica-2 enters drain" not in lb_log  # never drained: it was the last one in rotation
    assert set(states.statuses("replica-2")) == {"UP"}, states.seen
    assert set(states.statuses("replica-1")) == {"DOWN"}, states.seen


def test_a_replica_started_before_any_champion_loads_it_when_it_appears_without_polling_hard(
        real_shards, tmp_path, registry):
    cfg, c = registry
    tracking_env = {"MLFLOW_TRACKING_URI": cfg.uri}
    with replicas(1, "models:/lmpipe@champion", tmp_path / "replicas", env=tracking_env) as reps:
        url = "http://" + reps["replica-1"][0]
        time.sleep(8)
        assert httpx.get(url + "/readyz", trust_env=False).status_code == 503
        log = (tmp_path / "replicas" / "replica-1.log").read_text()
        assert 1 <= log.count("reload failed") <= 3, log[-2000:]  # a try every 5 s, not a busy loop
        make_champion(c, register(tiny_export(tmp_path / "v1", real_shards, seed=3), "lmpipe", cfg))
        until(lambda: httpx.get(url + "/readyz", trust_env=False).status_code == 200, "never loaded it", timeout=60)
