"""A deterministic JSONL corpus of real text that every Python installation has.

Sources, in a fixed order: the interpreter's own documentation topics
(``pydoc_data.topics``, the text behind ``help()``), then the standard library's
source files, sorted by path. With ``site-packages`` it also takes the installed
packages' Python sources (for corpora larger than the stdlib's ~30 MB).
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from lmpipe.log import log
from lmpipe.storage import join, open_store

PART_BYTES = 64 * 1024 * 1024


def _py_files(root: Path, skip: tuple[str, ...]) -> Iterator[Path]:
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in skip and d != "__pycache__")
        for name in sorted(files):
            if name.endswith((".py", ".rst", ".txt")):
                yield Path(dirpath) / name


def documents(sources: tuple[str, ...] = ("docs", "stdlib")) -> Iterator[dict]:
    if "docs" in sources:
        from pydoc_data.topics import topics

        for name in sorted(topics):
            yield {"id": f"pydoc/{name}", "text": topics[name], "source": "python-docs"}
    roots = []
    if "stdlib" in sources:
        roots.append(("stdlib", Path(sysconfig.get_paths()["stdlib"]), ("site-packages", "dist-packages")))
    if "site-packages" in sources:
        roots.append(("site-packages", Path(sysconfig.get_paths()["purelib"]), ()))
    for label, root, skip in roots:
        for path in _py_files(root, skip):
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # a few test files are deliberately not UTF-8
            if text.strip():
                yield {"id": f"{label}/{path.relative_to(root).as_posix()}", "text": text, "source": label}


def write(out: str, max_mb: float | None = None, sources: tuple[str, ...] = ("docs", "stdlib"), storage=None) -> dict:
    """Write the corpus as JSONL under ``out`` (a ``.jsonl`` file, or a folder of parts)."""
    single = out.rstrip("/").endswith(".jsonl")
    parent, name = (out.rstrip("/").rsplit("/", 1) if single else (out, None))
    store = open_store(parent, storage)
    limit = int(max_mb * 1024 * 1024) if max_mb else None
    docs = total = part = 0
    buf = io.BytesIO()
    keys = []

    def flush():
        nonlocal part, buf
        key = name if single else f"part-{part:05d}.jsonl"
        store.put_bytes(key, buf.getvalue())
        keys.append(key)
        part += 1
        buf = io.BytesIO()

    for doc in documents(sources):
        line = (json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8")
        if limit is not None and total + len(line) > limit:
            break
        buf.write(line)
        docs += 1
        total += len(line)
        if not single and buf.tell() >= PART_BYTES:
            flush()
    if buf.tell() or not keys:
        flush()
    uri = join(store.uri, name) if single else store.uri
    log(f"demo corpus: {docs} documents, {total / 1e6:.1f} MB in {len(keys)} file(s) at {uri}")
    return {"uri": uri, "documents": docs, "bytes": total, "files": keys}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="a .jsonl file, or a folder/prefix for parts (local, file://, s3://)")
    p.add_argument("--max-mb", type=float, default=None, help="stop at this many MB (default: everything)")
    p.add_argument("--sources", default="docs,stdlib", help="comma list of docs, stdlib, site-packages")
