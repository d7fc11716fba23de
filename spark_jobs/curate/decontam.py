"""Decontamination: documents that share a word n-gram with evaluation texts are removed.

The driver reads the evaluation texts (``curate.decontaminate``: a file, folder or prefix of
JSONL or txt files, optionally .gz/.zst) into an index of their word n-grams (13 words by
default, as in GPT-3's and the Llama papers' contamination studies). Every string value of a
JSONL record counts, so ``{"question": ..., "answer": ...}`` rows need no field setting. The
index is broadcast; :class:`Decontaminate` runs first in each task's filter chain, so every
contaminated document is counted whatever the other filters would say of it.
"""

from __future__ import annotations

import io
import json
import re
from typing import ClassVar

from lmpipe.config import stage_config
from lmpipe.errors import ConfigError, CorpusError, StorageError
from lmpipe.log import log
from spark_jobs.curate.base import Doc, Filter

WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lowercased word tokens: punctuation, case and spacing do not hide an overlap."""
    return WORD.findall(text.lower())


def ngrams(text: str, n: int):
    w = words(text)
    return (" ".join(w[i:i + n]) for i in range(len(w) - n + 1))


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _texts(store, key: str):
    from spark_jobs.corpus import _decompressed, file_format

    fmt, compression = file_format(key)
    with store.open(key) as raw:
        data = _decompressed(raw, compression).read()
    text = data.decode("utf-8")
    if fmt == "text":
        yield text
        return
    if fmt != "jsonl":
        raise CorpusError(f"decontamination file {store.url(key)} is not JSONL or txt")
    for n, line in enumerate(io.StringIO(text), 1):
        if line.strip():
            try:
                yield from _strings(json.loads(line))
            except json.JSONDecodeError as exc:
                raise CorpusError(f"decontamination file {store.url(key)} line {n} is not JSON: {exc}") from None


def load_index(uri: str, n: int, storage=None) -> dict[str, frozenset[str]]:
    """{first word: the n-grams starting with it} of every evaluation text under ``uri``. An
    empty or unreadable source is an error naming it, never an empty index."""
    from spark_jobs import corpus

    try:
        store, files, _ignored = corpus.resolve(uri, storage)
        index: dict[str, set[str]] = {}
        for obj in files:
            for text in _texts(store, obj.key):
                for gram in ngrams(text, n):
                    index.setdefault(gram.split(" ", 1)[0], set()).add(gram)
    except (CorpusError, StorageError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise ConfigError(f"config key 'curate.decontaminate': cannot read {uri}: {exc}") from None
    total = sum(len(v) for v in index.values())
    if not total:
        raise ConfigError(f"config key 'curate.decontaminate': {uri} holds no text of {n} words or more, "
                          "so nothing could be decontaminated against it")
    log(f"decontamination index: {total:,} {n}-grams from {len(files)} file(s) under {uri}")
    return {k: frozenset(v) for k, v in index.items()}


@stage_config
class DecontaminateConfig:
    ngram: int = 13  # words per n-gram


class Decontaminate(Filter):
    """Removes a document that shares one word n-gram with the evaluation texts."""

    name: ClassVar[str] = "decontaminate"
    Config: ClassVar[type] = DecontaminateConfig

    def __init__(self, index: dict[str, frozenset[str]], cfg=None):
        super().__init__(cfg)
        self.index = index

    def apply(self, doc: Doc) -> str | None:
        w, n, index = words(doc.text), self.cfg.ngram, self.index
        for i in range(len(w) - n + 1):
            grams = index.get(w[i])  # most words start no indexed n-gram: one dict lookup each
            if grams is not None and " ".join(w[i:i + n]) in grams:
                return "ngram_overlap"
        return None
