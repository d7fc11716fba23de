"""Read corpus files (JSONL, plain text, Parquet; plain, gzip or zstd) into documents.

Bad records never raise: each comes out as a ``Record`` with a ``reason`` so the
caller can count it. Only a file that cannot be read at all raises, naming the file;
:func:`read_segments` turns that into one ``unreadable_file`` record for the caller to
quarantine.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from lmpipe.config import stage_config
from lmpipe.errors import CorpusError, StorageError
from lmpipe.storage import ObjectInfo, Store, StorageConfig, open_store, split_uri

COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd"}
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".txt": "text", ".parquet": "parquet"}

# The reasons a record is skipped; they are the keys of manifest["input"]["skipped"].
SKIP_REASONS = (
    "invalid_utf8",
    "unparseable_json",
    "not_an_object",
    "null_text",
    "empty_text",
    "text_not_string",
    "too_long",
    "invalid_unicode",  # lone or reversed surrogates (JSON \\ud800 escapes): not encodable as UTF-8
    "nul_character",  # a NUL (U+0000) in the text: binary data, not a document
    "nested_too_deep",  # JSON nested deeper than the parser's recursion limit
    "line_too_long",  # a line over reader.max_line_mb, never held in memory whole
    "unreadable_file",  # a file that cannot be read at all (counted per file, listed in the manifest)
)


@stage_config
class CorpusConfig:
    text_field: str = "text"  # the field (JSONL) or column (Parquet) holding the text
    id_field: str = "id"  # the document id; default: the file and line or row
    # Documents longer than this many characters are split into pieces, capped, or skipped.
    max_doc_chars: int = 1_000_000
    long_doc_policy: Literal["split", "cap", "skip"] = "split"  # split long documents into pieces, cap them, or skip them
    max_line_mb: int = 64  # a JSONL line longer than this is skipped (line_too_long) without being held in memory
    # Files that cannot be read at all (corrupt gzip/zstd/Parquet) are quarantined up to this
    # many: counted, listed in the manifest and left out. One more fails the run, with no manifest.
    max_bad_files: int = 0


@dataclass(frozen=True)
class Record:
    doc_id: str
    text: str | None
    reason: str | None = None  # set when the record is skipped
    source_id: str | None = None  # a piece of a long document: that document's id
    error: str | None = None  # an unreadable_file record: why the file cannot be read

    @property
    def split_key(self) -> str:
        """What decides the split: the whole document's id, so all its pieces land together."""
        return self.source_id or self.doc_id


def file_format(key: str) -> tuple[str | None, str | None]:
    """(format, compression) from a file name, or (None, None) if it is not a corpus file."""
    name = key.rsplit("/", 1)[-1].lower()
    root, ext = os.path.splitext(name)
    compression = COMPRESSIONS.get(ext)
    if compression:
        ext = os.path.splitext(root)[1]
    return FORMATS.get(ext), compression


def resolve(uri: str, storage: StorageConfig | None = None) -> tuple[Store, list[ObjectInfo], list[str]]:
    """The store, the corpus files under ``uri`` (a file, folder or prefix), and ignored names."""
    parent, name = split_uri(uri)
    if name:
        try:
            store = open_store(parent, storage)
            objs = [o for o in store.list(name) if o.key == name]
            if objs:
                files, ignored = _pick(objs)
                if files:
                    return store, files, ignored
                raise CorpusError(f"corpus file {uri} is not a supported format (.jsonl, .txt, .parquet, optionally .gz/.zst)")
        except StorageError as exc:
            if "no object" not in str(exc) and "does not exist" not in str(exc):
                raise
    store = open_store(uri, storage)
    objs = store.list("") if not _is_missing_local(store) else []
    if not objs:
        raise CorpusError(f"corpus {uri} does not exist or is empty")
    files, ignored = _pick(objs)
    if not files:
        raise CorpusError(f"no corpus files (.jsonl, .txt, .parquet, optionally .gz/.zst) under {uri}")
    return store, files, ignored


def _is_missing_local(store: Store) -> bool:
    root = getattr(store, "root", None)
    return root is not None and not root.exists()


def _pick(objs: list[ObjectInfo]) -> tuple[list[ObjectInfo], list[str]]:
    files, ignored = [], []
    for o in objs:
        if any(part.startswith((".", "_")) for part in o.key.split("/")):
            continue  # _SUCCESS, .crc, _checks/ results and friends
        (files if file_format(o.key)[0] else ignored).append(o)
    return files, [o.key for o in ignored]


def _decompressed(raw, compression: str | None):
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw)
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return raw


def _finish(doc_id: str, text, cfg: CorpusConfig) -> Iterator[Record]:
    if not doc_id.isascii():  # an id from JSON may hold lone surrogates too: keep it printable
        doc_id = doc_id.encode("utf-8", "backslashreplace").decode("utf-8")
    if text is None:
        yield Record(doc_id, None, "null_text")
        return
    if not isinstance(text, str):
        yield Record(doc_id, None, "text_not_string")
        return
    if not text.strip():
        yield Record(doc_id, None, "empty_text")
        return
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            yield Record(doc_id, None, "invalid_unicode")
            return
    if "\x00" in text:
        yield Record(doc_id, None, "nul_character")
        return
    if len(text) <= cfg.max_doc_chars:
        yield Record(doc_id, text)
    elif cfg.long_doc_policy == "skip":
        yield Record(doc_id, None, "too_long")
    elif cfg.long_doc_policy == "cap":
        yield Record(doc_id, text[: cfg.max_doc_chars])
    else:
        for i in range(0, len(text), cfg.max_doc_chars):
            yield Record(f"{doc_id}#{i // cfg.max_doc_chars}", text[i : i + cfg.max_doc_chars], source_id=doc_id)


def _lines(stream, max_bytes: int, chunk: int = 1 << 20) -> Iterator[tuple[bytes | None, int]]:
    """(line with its b"\\n", its length in bytes) from any stream with ``read(n)``: files, gzip,
    zstd, S3 bodies. A line longer than ``max_bytes`` comes out as ``(None, length)``; at most
    ``max_bytes`` plus one chunk of it is ever held in memory."""
    buf, dropped = b"", -1  # dropped >= 0: the bytes of an over-long line discarded so far
    while block := stream.read(chunk):
        start = 0
        while (nl := block.find(b"\n", start)) >= 0:
            piece, start = block[start : nl + 1], nl + 1
            if dropped >= 0:
                yield None, dropped + len(piece)
                dropped = -1
                continue
            line, buf = buf + piece, b""
            yield (line, len(line)) if len(line) <= max_bytes else (None, len(line))
        rest = block[start:]
        if dropped >= 0:
            dropped += len(rest)
        elif len(buf) + len(rest) > max_bytes:
            buf, dropped = b"", len(buf) + len(rest)
        else:
            buf += rest
    if dropped >= 0:
        yield None, dropped
    elif buf:  # never over max_bytes: the loop above drops it first
        yield buf, len(buf)


def _jsonl(stream, key: str, cfg: CorpusConfig, start: int = 0, end: int | None = None) -> Iterator[Record]:
    """Records whose line starts in [start, end). ``stream`` is positioned at ``max(start - 1, 0)``:
    a split that does not begin the file skips the line that began in the previous split."""
    reader = _lines(stream, cfg.max_line_mb << 20)
    pos = 0
    if start > 0:
        pos = start - 1 + next(reader, (b"", 0))[1]
    for raw, length in reader:
        if end is not None and pos >= end:
            break
        offset, pos = pos, pos + length
        fallback_id = f"{key}@{offset}"
        if raw is None:
            yield Record(fallback_id, None, "line_too_long")
            continue
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8").removeprefix("\ufeff")  # a BOM (first line of a file saved by Windows tools)
        except UnicodeDecodeError:
            yield Record(fallback_id, None, "invalid_utf8")
            continue
        try:
            obj = json.loads(line)
        except RecursionError:
            yield Record(fallback_id, None, "nested_too_deep")
            continue
        except ValueError:  # JSONDecodeError, and integers past Python's digit limit
            yield Record(fallback_id, None, "unparseable_json")
            continue
        if not isinstance(obj, dict):
            yield Record(fallback_id, None, "not_an_object")
            continue
        doc_id = obj.get(cfg.id_field)
        yield from _finish(fallback_id if doc_id is None else str(doc_id), obj.get(cfg.text_field), cfg)


def _text(stream, key: str, cfg: CorpusConfig) -> Iterator[Record]:
    data = stream.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        yield Record(key, None, "invalid_utf8")
        return
    yield from _finish(key, text, cfg)


def _parquet(path: str, key: str, cfg: CorpusConfig) -> Iterator[Record]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if cfg.text_field not in names:
        raise CorpusError(f"corpus file {path if key in path else key} has no column {cfg.text_field!r} (columns: {names})")
    cols = [cfg.text_field] + ([cfg.id_field] if cfg.id_field in names else [])
    row = 0
    for batch in pf.iter_batches(columns=cols, batch_size=4096):
        texts = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if len(cols) == 2 else [None] * len(texts)
        for text, doc_id in zip(texts, ids):
            doc_id = f"{key}:{row}" if doc_id is None else str(doc_id)
            row += 1
            if isinstance(text, bytes):
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError:
                    yield Record(doc_id, None, "invalid_utf8")
                    continue
            yield from _finish(doc_id, text, cfg)


def plan_tasks(files: list[ObjectInfo], task_bytes: int) -> list[list[tuple[str, int, int]]]:
    """Read tasks of about ``task_bytes`` each: lists of (key, start, end) segments.

    Uncompressed JSONL files are cut into byte ranges (a record belongs to the range its
    line starts in); other files are read whole (end = -1). Consecutive small files are
    grouped. The plan depends only on the file list, so it is the same on any cluster.
    """
    tasks, current, size = [], [], 0
    for o in sorted(files, key=lambda f: f.key):
        fmt, compression = file_format(o.key)
        if fmt == "jsonl" and compression is None and o.size > task_bytes:
            pieces = [(o.key, s, min(s + task_bytes, o.size), min(task_bytes, o.size - s)) for s in range(0, o.size, task_bytes)]
        else:
            pieces = [(o.key, 0, -1, o.size)]
        for key, start, end, n in pieces:
            if current and size + n > task_bytes:
                tasks.append(current)
                current, size = [], 0
            current.append((key, start, end))
            size += n
    if current:
        tasks.append(current)
    return tasks


def read_file(store: Store, key: str, cfg: CorpusConfig, start: int = 0, end: int = -1) -> Iterator[Record]:
    """Every record of one corpus file (or of the byte range [start, end) of an uncompressed
    JSONL file). A file that cannot be read at all raises CorpusError. Fallback document ids
    use the key relative to the corpus root, so they do not depend on where it is mounted."""
    fmt, compression = file_format(key)
    where = store.url(key)
    try:
        if fmt == "parquet":
            local = getattr(store, "root", None)
            if local is not None and compression is None:
                yield from _parquet(str(store.path(key)), key, cfg)
                return
            with tempfile.NamedTemporaryFile(suffix=".parquet") as tmp:
                with store.open(key) as src:
                    shutil.copyfileobj(_decompressed(src, compression), tmp, 4 << 20)
                tmp.flush()
                yield from _parquet(tmp.name, key, cfg)
            return
        if fmt == "jsonl" and end >= 0:
            with store.open(key, max(start - 1, 0)) as raw:
                yield from _jsonl(raw, key, cfg, start, end)
            return
        with store.open(key) as raw:
            stream = _decompressed(raw, compression)
            yield from (_jsonl if fmt == "jsonl" else _text)(stream, key, cfg)
    except CorpusError:
        raise
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        # gzip/zstd/Parquet corruption (pyarrow raises ArrowInvalid, a ValueError).
        raise CorpusError(f"corpus file {where} cannot be read: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        if type(exc).__module__.startswith(("zstandard", "pyarrow")):
            raise CorpusError(f"corpus file {where} cannot be read: {type(exc).__name__}: {exc}") from exc
        raise


def read_segments(store: Store, segments, cfg: CorpusConfig) -> Iterator[Record]:
    """Every record of (key, start, end) segments, in order. A file that cannot be read ends its
    segment with one ``unreadable_file`` record (``doc_id`` its key, ``error`` why): the caller
    quarantines it or fails. Records read before the error are kept."""
    for key, start, end in segments:
        try:
            yield from read_file(store, key, cfg, start, end)
        except CorpusError as exc:
            yield Record(key, None, "unreadable_file", error=str(exc))


def text_hash(text: str) -> bytes:
    """Content hash for exact-duplicate removal."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def split_of(doc_id: str, validation_fraction: float) -> str:
    """Deterministic train/validation assignment by a hash of the document id."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    return "validation" if h / 2**64 < validation_fraction else "train"
