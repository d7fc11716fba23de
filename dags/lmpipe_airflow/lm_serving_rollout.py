"""What ``lm_serving_rollout``'s tasks do: move the serving job to the new champion, prove it
answers, and roll the champion back when it does not."""

from __future__ import annotations

import time

from lmpipe import settings
from lmpipe.log import log
from lmpipe_airflow.common import links


def _http():
    import httpx

    key = settings.get("LMPIPE_API_KEY")
    return httpx.Client(base_url=settings.get("LMPIPE_SERVE_URL"), timeout=120,
                        headers={"Authorization": f"Bearer {key}"} if key else {})


def champion_version() -> str:
    from registry import tracking

    cfg = tracking.TrackingConfig()
    v = tracking.alias_version(tracking.client(cfg), cfg.model_name, tracking.CHAMPION)
    if v is None:
        raise RuntimeError(f"models:/{cfg.model_name} has no champion to roll out")
    return str(v.version)


def reload() -> dict:
    with _http() as c:
        r = c.post("/admin/reload", timeout=600)
        if r.status_code >= 400:
            raise RuntimeError(f"{c.base_url}/admin/reload answered {r.status_code}: {r.text[:500]}")
        log(f"serving job reloaded: {r.json()}")
        return r.json()


def wait_for(version: str, timeout_s: float = 300, poll_s: float = 2) -> dict:
    deadline = time.monotonic() + timeout_s
    seen = None
    with _http() as c:
        while time.monotonic() < deadline:
            data = c.get("/v1/models").json()["data"]
            seen = data[0] if data else None
            if seen and str(seen["version"]) == version:
                log(f"{c.base_url}/v1/models reports version {version}")
                return seen
            time.sleep(poll_s)
    raise RuntimeError(f"the serving job did not switch to version {version} within {timeout_s:.0f}s "
                       f"(it reports {seen})")


def smoke(model: str, prompt: str = "def ", max_tokens: int = 16) -> str:
    with _http() as c:
        r = c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                            "temperature": 0})
        if r.status_code != 200:
            raise RuntimeError(f"smoke completion failed: {r.status_code} {r.text[:500]}")
        text = r.json()["choices"][0]["text"]
        if not text:
            raise RuntimeError("smoke completion returned no text")
        links(smoke_completion=f"{prompt!r} -> {text!r}", served_by=str(c.base_url))
        return text


def rollback(version: str) -> str | None:
    """Roll champion back once, only if it is still the version that failed (so a retry is harmless)."""
    from registry import promote, tracking

    current = champion_version()
    if current != version:
        log(f"champion is v{current}, not v{version}: nothing to roll back")
        return None
    d = promote.rollback(tracking.TrackingConfig())
    reload()
    return d["to"]
