"""The response cache for deterministic completions: greedy (temperature under
:data:`~serving.sampling.GREEDY_BELOW`) or seeded, and not streamed.

The key is a digest of the served model's version and the whole request, so a new version
never answers from the old one's entries. With ``LMPIPE_REDIS_URL`` the entries live in Redis,
shared by every replica and kept ``cache_ttl_s``; otherwise in an LRU of ``cache_entries``
responses per process, cleared when the model is swapped. A cache that fails (Redis away)
counts as a miss and is logged; it never fails a request.
"""

from __future__ import annotations

import hashlib
import json
import threading

from lmpipe.log import log
from serving.sampling import GREEDY_BELOW

PREFIX = "lmpipe:completion:"


def model_version(cur) -> str:
    """What identifies the weights: the registry version, or the folder and when it was loaded."""
    return f"{cur.name}:v{cur.version}" if cur.version else f"{cur.path}@{cur.loaded_at}"


class ResponseCache:
    def __init__(self, redis_url: str | None, entries: int, ttl_s: int, metrics):
        from cachetools import LRUCache

        self.metrics, self.ttl_s, self.redis_url = metrics, ttl_s, redis_url
        self._lru, self._lock = LRUCache(maxsize=max(1, entries)), threading.Lock()
        self._redis = None
        self.enabled = entries > 0 or bool(redis_url)
        if redis_url:
            import redis.asyncio

            self._redis = redis.asyncio.from_url(redis_url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self._warned = False

    def key(self, cur, body) -> str | None:
        """The key of a cacheable request, or None."""
        deterministic = body.temperature < GREEDY_BELOW or body.seed is not None
        if not self.enabled or body.stream or not deterministic:
            return None
        request = body.model_dump(mode="json", exclude={"stream", "stream_options"})
        blob = json.dumps([model_version(cur), request], sort_keys=True, separators=(",", ":"))
        return PREFIX + hashlib.sha256(blob.encode()).hexdigest()

    async def get(self, key: str) -> dict | None:
        value = None
        if self._redis is not None:
            try:
                raw = await self._redis.get(key)
                value = json.loads(raw) if raw else None
            except Exception as exc:
                self._failed(exc)
        else:
            with self._lock:
                value = self._lru.get(key)
        (self.metrics.cache_hits if value is not None else self.metrics.cache_misses).inc()
        return value

    async def put(self, key: str, value: dict) -> None:
        if self._redis is not None:
            try:
                await self._redis.set(key, json.dumps(value), ex=self.ttl_s)
            except Exception as exc:
                self._failed(exc)
            return
        with self._lock:
            self._lru[key] = value

    def clear(self) -> None:
        """A new model is served: the in-process entries go (Redis keys carry the version)."""
        with self._lock:
            self._lru.clear()

    def _failed(self, exc: Exception) -> None:
        if not self._warned:
            where = self.redis_url.rsplit("@", 1)[-1]  # never the password
            log(f"response cache at {where} failed ({type(exc).__name__}); serving without it until it answers",
                level="warning")
            self._warned = True
