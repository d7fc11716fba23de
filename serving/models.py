"""Which model the server serves, and zero-downtime swaps when the registry alias moves."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from pathlib import Path

from lmpipe import tracking
from lmpipe.errors import LmpipeError
from lmpipe.storage import open_store
from serving import engine

log = logging.getLogger("lmpipe.serve")


class ModelManager:
    """Resolves ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or a folder; loads in the
    background; swaps atomically; keeps the old model when a new one fails to load."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.ref = cfg.model
        self.current: engine.Loaded | None = None
        self.last_error: str | None = None
        self.on_swap = lambda old, new: None
        self.on_failure = lambda exc: None
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # -- resolution -------------------------------------------------------------------------
    def target(self) -> tuple[str, str | None, str]:
        """(name, version, source) the ref points at right now."""
        ref = self.ref
        if ref.startswith("models:/"):
            c = tracking.client(self.cfg.tracking)
            name, _, rest = ref[len("models:/"):].partition("/")
            name, _, alias = name.partition("@")
            v = tracking.alias_version(c, name, alias) if alias else c.get_model_version(name, rest)
            if v is None:
                raise LmpipeError(f"{ref}: no version of {name} has alias {alias!r}")
            return name, str(v.version), f"models:/{name}/{v.version}"
        return Path(ref.rstrip("/")).name or "model", None, ref

    def _fetch(self, name: str, version: str | None, source: str) -> Path:
        if source.startswith("models:/"):
            import mlflow

            dest = tracking.home() / "serving" / name / str(version)
            if not (dest / ".complete").is_file():
                mlflow.artifacts.download_artifacts(source, dst_path=str(dest))
                (dest / ".complete").touch()
            return dest
        if source.startswith("s3://"):
            dest = tracking.home() / "serving" / hashlib.sha256(source.encode()).hexdigest()[:16]
            open_store(source, self.cfg.storage).download_prefix("", dest)
            return dest
        return Path(open_store(source).root)

    # -- loading ----------------------------------------------------------------------------
    def reload(self) -> bool:
        """Load what the ref points at if it differs from what is served; swap atomically."""
        with self._lock:
            try:
                name, version, source = self.target()
                if self.current is not None and self.current.version == version and version is not None:
                    return False
                new = engine.load(self._fetch(name, version, source), name, version)
            except Exception as exc:
                self.last_error = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {exc}"
                self.on_failure(exc)
                log.error("reload failed; still serving %s: %s", self.current and self.current.label, exc)
                raise exc if isinstance(exc, LmpipeError) else LmpipeError(str(exc)) from exc
            old, self.current = self.current, new  # one reference assignment: atomic
            self.last_error = None
            self.on_swap(old, new)
            log.warning("now serving %s (was %s)", new.label, old and old.label)
            return True

    def start(self) -> None:
        def first():
            while not self._stop.is_set() and self.current is None:
                try:
                    self.reload()
                except LmpipeError:
                    self._stop.wait(self.cfg.watch_interval_s)
            self._watch()

        threading.Thread(target=first, daemon=True, name="model-loader").start()

    def _watch(self) -> None:
        if not self.ref.startswith("models:/") or "@" not in self.ref or self.cfg.watch_interval_s <= 0:
            return
        while not self._stop.wait(self.cfg.watch_interval_s):
            try:
                self.reload()
            except LmpipeError:
                pass  # logged and counted; the old model keeps serving

    def stop(self) -> None:
        self._stop.set()
