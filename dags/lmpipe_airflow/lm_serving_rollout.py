"""What ``lm_serving_rollout``'s tasks do: move the serving replicas to the new champion one at
a time, prove each answers, and put the old champion back everywhere when one does not.

With ``LMPIPE_LB_ADMIN`` set, the replicas are the servers of HAProxy's ``serving`` backend,
found through its runtime API. Each in turn is drained (no new requests; those in flight
finish), reloaded, waited on until it reports the new version, smoke-tested directly and put
back in rotation. A replica is never drained while it is the only one in rotation: it then
swaps in place, which its atomic reload allows. Without ``LMPIPE_LB_ADMIN`` there is one
serving job, at ``LMPIPE_SERVE_URL``, reloaded in place.
"""

from __future__ import annotations

import time

from lmpipe import settings
from lmpipe.log import log
from lmpipe_airflow.common import links


def _http(base_url: str):
    import httpx

    key = settings.get("LMPIPE_API_KEY")
    return httpx.Client(base_url=base_url, timeout=120, trust_env=False,
                        headers={"Authorization": f"Bearer {key}"} if key else {})


def _balancer():
    from lmpipe import balancer

    admin = settings.get("LMPIPE_LB_ADMIN")
    return balancer.Runtime(admin) if admin else None


def champion_version() -> str:
    from registry import tracking

    cfg = tracking.TrackingConfig()
    v = tracking.alias_version(tracking.client(cfg), cfg.model_name, tracking.CHAMPION)
    if v is None:
        raise RuntimeError(f"models:/{cfg.model_name} has no champion to roll out")
    return str(v.version)


def reload(url: str) -> dict:
    with _http(url) as c:
        r = c.post("/admin/reload", timeout=600)
        if r.status_code >= 400:
            raise RuntimeError(f"{url}/admin/reload answered {r.status_code}: {r.text[:500]}")
        log(f"{url} reloaded: {r.json()}")
        return r.json()


def served(url: str) -> dict | None:
    with _http(url) as c:
        data = c.get("/v1/models").json()["data"]
        return data[0] if data else None


def wait_for(version: str, url: str, timeout_s: float = 300, poll_s: float = 1) -> dict:
    deadline, seen = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        seen = served(url)
        if seen and str(seen["version"]) == version:
            log(f"{url}/v1/models reports version {version}")
            return seen
        time.sleep(poll_s)
    raise RuntimeError(f"{url} did not switch to version {version} within {timeout_s:.0f}s (it reports {seen})")


def smoke(model: str, url: str, prompt: str = "def ", max_tokens: int = 16) -> str:
    with _http(url) as c:
        r = c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                            "temperature": 0})
        if r.status_code != 200:
            raise RuntimeError(f"smoke completion at {url} failed: {r.status_code} {r.text[:500]}")
        text = r.json()["choices"][0]["text"]
        if not text:
            raise RuntimeError(f"smoke completion at {url} returned no text")
        log(f"smoke completion at {url}: {prompt!r} -> {text!r}")
        return text


def move(url: str, version: str) -> str:
    """Reload one server, wait until it serves ``version``, smoke-test it; returns the model id."""
    reload(url)
    model = wait_for(version, url)["id"]
    smoke(model, url)
    return model


def roll(version: str) -> str:
    """Move every replica to ``version``, one at a time; returns the completion the public URL gave."""
    public, lb = settings.get("LMPIPE_SERVE_URL"), _balancer()
    if lb is None:
        model = move(public, version)
    else:
        names = [s.name for s in lb.servers()]
        log(f"rolling {len(names)} replicas behind HAProxy ({lb.address}) to v{version}, one at a time")
        for name in names:
            _roll_one(lb, name, version)
        model = wait_for(version, public)["id"]
    text = smoke(model, public)
    links(smoke_completion=f"def  -> {text!r}", served_by=public)
    return text


def _roll_one(lb, name: str, version: str) -> None:
    s = lb.server(name)
    if s.status.startswith("MAINT"):
        log(f"{name}: in maintenance, skipped", level="warning")
        return
    if not s.up:
        log(f"{name}: down ({s.status}), skipped; a replica with no model keeps trying to load the champion, "
            f"and one that restarts loads it", level="warning")
        return
    drain = _others_in_rotation(lb, name)
    if not drain:
        log(f"{name}: the only replica in rotation, so it stays in and swaps in place")
    elif (seen := served(s.url)) and str(seen["version"]) == version:
        log(f"{name}: already serves v{version}")
    else:
        lb.set_state(name, "drain")
        log(f"{name}: draining ({s.sessions} requests in flight)")
        lb.wait(name, lambda x: x.sessions == 0 or not _others_in_rotation(lb, name), "idle")
        if not _others_in_rotation(lb, name):  # the others went down meanwhile: take it back now
            lb.set_state(name, "ready")
            log(f"{name}: back in rotation at once, the others went down", level="warning")
            drain = False
    move(s.url, version)
    if drain or s.status.startswith("DRAIN"):  # a drain an earlier try left behind is undone too
        lb.set_state(name, "ready")
        lb.wait(name, lambda x: x.in_rotation, "back in rotation", timeout=60)
        log(f"{name}: back in rotation on v{version}")


def _others_in_rotation(lb, name: str) -> bool:
    return any(o.in_rotation for o in lb.servers() if o.name != name)


def restore(version: str) -> None:
    """Every replica back on ``version`` and in rotation (each swaps in place); an error names
    the replicas it could not restore, after trying them all."""
    lb = _balancer()
    if lb is None:
        reload(settings.get("LMPIPE_SERVE_URL"))
        wait_for(version, settings.get("LMPIPE_SERVE_URL"))
        return
    failed = []
    for s in lb.servers():
        if not s.up:
            log(f"{s.name}: down ({s.status}); it loads the champion when it starts", level="warning")
            continue
        try:
            reload(s.url)
            wait_for(version, s.url, timeout_s=120)
            lb.set_state(s.name, "ready")
        except Exception as exc:
            log(f"{s.name}: not restored to v{version}: {exc}", level="error")
            failed.append(s.name)
    if failed:
        raise RuntimeError(f"replicas not restored to v{version} (left out of rotation or on their model): "
                           f"{', '.join(failed)}")


def rollback(version: str) -> str | None:
    """Put the champion back once, only if it is still the version that failed (so a retry is
    harmless), then every replica on the champion; returns the version rolled back to."""
    from registry import promote, tracking

    current, to = champion_version(), None
    if current == version:
        to = promote.rollback(tracking.TrackingConfig())["to"]
    else:
        log(f"champion is v{current}, not v{version}: the registry needs no rollback")
    restore(str(to) if to else current)
    return to
