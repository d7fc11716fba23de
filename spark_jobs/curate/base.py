"""The filter interface, the registry of filters by name, and the chain that runs them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

FILTERS: dict[str, type[Filter]] = {}


@dataclass
class Doc:
    """One document on its way through the filters."""

    text: str
    # Tags counted into the manifest's funnel: ``lang.<code>``, ``scrubbed.<kind>``.
    counts: Counter = field(default_factory=Counter)
    changed: bool = False  # a filter rewrote ``text`` (a scrubber replaced something)


class Filter:
    """One curation step. Subclasses set ``name`` and ``Config`` (a ``stage_config`` class)
    and implement :meth:`apply`."""

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, cfg=None):
        self.cfg = cfg if cfg is not None else self.Config()

    def apply(self, doc: Doc) -> str | None:
        """``None`` keeps ``doc`` (its text may have been rewritten); a reason removes it."""
        raise NotImplementedError


def register(cls: type[Filter]) -> type[Filter]:
    FILTERS[cls.name] = cls
    return cls


def run_chain(filters: list[Filter], doc: Doc) -> tuple[str, str] | None:
    """Run ``filters`` in order: ``(filter, reason)`` of the first that removes ``doc``, or
    ``None`` when every filter keeps it. A filter that raises on a document removes it under
    the reason ``error``: one odd document never fails the job, and it is still counted."""
    for f in filters:
        try:
            reason = f.apply(doc)
        except Exception:  # noqa: BLE001 - counted as the filter's "error" reason
            reason = "error"
        if reason is not None:
            return f.name, reason
    return None
