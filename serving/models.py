"""Which model the server serves, and zero-downtime swaps when the registry alias moves."""

from __future__ import annotations

import threading
import time

from lmpipe.errors import LmpipeError
from lmpipe.log import log
from registry import resolve as resolver
from serving import engine

FIRST_LOAD_RETRY_S = 5.0  # between tries of the first load when the alias is not watched


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
    def target(self) -> resolver.ModelRef:
        """What the reference points at right now."""
        return resolver.lookup(self.ref, self.cfg.tracking, self.cfg.storage)

    # -- loading ----------------------------------------------------------------------------
    def reload(self) -> bool:
        """Load what the ref points at if it differs from what is served; swap atomically."""
        with self._lock:
            try:
                ref = self.target()
                if self.current is not None and self.current.version == ref.version and ref.version is not None:
                    return False
                new = engine.load(resolver.fetch(ref, self.cfg.storage), ref.name, ref.version)
            except Exception as exc:
                self.last_error = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {exc}"
                self.on_failure(exc)
                log(f"reload failed; still serving {self.current and self.current.label}: {exc}", level="error")
                raise exc if isinstance(exc, LmpipeError) else LmpipeError(str(exc)) from exc
            old, self.current = self.current, new  # one reference assignment: atomic
            self.last_error = None
            self.on_swap(old, new)
            log(f"now serving {new.label} (was {old and old.label})")
            return True

    def start(self) -> None:
        def first():
            while not self._stop.is_set() and self.current is None:
                try:
                    self.reload()
                except LmpipeError:  # nothing to serve yet (no champion, registry away): try again
                    self._stop.wait(self.cfg.watch_interval_s or FIRST_LOAD_RETRY_S)
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
