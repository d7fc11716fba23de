"""What runs on the Spark executors: the two ``mapInArrow`` stages of the tokenize job.

Each read task (a list of corpus file segments, planned by the driver and broadcast) is
addressed by its index, a row of ``spark.range``. Stage 1 (curate) runs the filter chain on
its documents and emits one row per document: why it is removed, or its content hash and
MinHash band keys for dedup, its tags, and its text when a scrubber rewrote it. Stage 2
reads each task again with its edits joined on (the documents to drop, by reason, and the
rewritten texts), writes a sample of the removed documents, tokenizes in Arrow batches,
packs, and writes and uploads its own shards, returning one row per shard plus one stats
row (whose ``path`` holds the files of the task that could not be read, with why).
"""

from __future__ import annotations

import json
import time
from collections import Counter

from lmpipe import manifest
from lmpipe.storage import StorageConfig, open_store
from spark_jobs import corpus
from spark_jobs.corpus import CorpusConfig

DOC_BATCH = 512  # documents per Arrow batch handed to encode_batch


def _schemas():
    import pyarrow as pa

    docs = pa.schema([("task", pa.int32()), ("idx", pa.int64()), ("reason", pa.string()), ("hash", pa.binary()),
                      ("sig", pa.list_(pa.int64())), ("bands", pa.list_(pa.int64())), ("tags", pa.list_(pa.string())),
                      ("text", pa.string())])
    res = pa.schema([("kind", pa.string()), ("split", pa.string()), ("path", pa.string()), ("sequences", pa.int64()),
                     ("tokens", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string()), ("stats", pa.string())])
    history = pa.schema([("id", pa.int64()), ("hash", pa.binary()), ("sig", pa.list_(pa.int64())),
                         ("bands", pa.list_(pa.int64()))])
    return docs, res, history


DOCS_SCHEMA, RESULT_SCHEMA, HISTORY_SCHEMA = _schemas()
SIGNATURES = "signatures"  # <out>/signatures/part-TTTTT.parquet: hash, sig, bands of each document the filters kept
HISTORY_DDL = "id long, hash binary, sig array<long>, bands array<long>"
DOCS_DDL = ("task int, idx long, reason string, hash binary, sig array<long>, bands array<long>, tags array<string>, "
            "text string")
RESULT_DDL = "kind string, split string, path string, sequences long, tokens long, bytes long, sha256 string, stats string"


def _records(store, segments, reader: CorpusConfig):
    """Every record of one read task, in a fixed order (so stage 1's indexes match stage 2's)."""
    return corpus.read_segments(store, segments, reader)


def _tasks(batches, plan):
    """(task index, segments, edits) for the task ids in ``batches``; ``plan`` is broadcast.
    ``edits`` maps a record index to (reason it is removed, or None; its rewritten text, or
    None), from the batch's ``edits`` column when stage 1 ran."""
    for batch in batches:
        ids = batch.column("id").to_pylist()
        edits = batch.column("edits").to_pylist() if "edits" in batch.schema.names else [None] * len(ids)
        for task, rows in zip(ids, edits):
            yield task, plan.value[task], {e["idx"]: (e["reason"], e["text"]) for e in rows or ()}


def curate_docs(cfg, corpus_uri: str, plan, index, part_offset: int = 0):
    """Stage 1: read tasks -> one row per usable document (see :data:`DOCS_SCHEMA`). ``index``
    is the broadcast decontamination index, or None. Each task also writes the signatures of
    the documents the filters kept to ``signatures/part-TTTTT.parquet``: later incremental runs
    dedup against them."""

    def fn(batches):
        from spark_jobs.curate import filters as flib
        from spark_jobs.curate.decontam import Decontaminate, DecontaminateConfig

        chain = flib.build(cfg.curate.filters, cfg.curate.languages)
        if index is not None:
            chain.insert(0, Decontaminate(index.value, DecontaminateConfig(ngram=cfg.curate.decontaminate_ngram)))
        store, out = open_store(corpus_uri, cfg.storage), open_store(cfg.out, cfg.storage)
        for task, segments, _ in _tasks(batches, plan):
            batch = _curate_task(cfg, chain, store, task, segments)
            _write_signatures(out, batch, part_offset + task)
            yield batch

    return fn


def _write_signatures(out, batch, part: int) -> None:
    import tempfile

    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    kept = batch.filter(pc.is_null(batch.column("reason"))).select(["hash", "sig", "bands"])
    with tempfile.NamedTemporaryFile(suffix=".parquet") as tmp:
        pq.write_table(pa.Table.from_batches([kept]), tmp.name, compression="zstd")
        out.put_file(f"{SIGNATURES}/part-{part:05d}.parquet", tmp.name)


def read_signatures(storage: StorageConfig, files):
    """Stage 1 of an incremental run, its history: the signature files of every earlier run of
    the lineage (``files``: broadcast (folder URI, key) pairs) as rows (``id`` < 0: earlier
    documents are always the ones kept)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def fn(batches):
        for batch in batches:
            for i in batch.column("id").to_pylist():
                uri, key = files.value[i]
                t = pq.read_table(pa.BufferReader(open_store(uri, storage).get_bytes(key)))  # S3 bodies do not seek
                ids = [-1 - ((i << 32) | j) for j in range(t.num_rows)]
                yield pa.RecordBatch.from_pydict({"id": ids, **{k: t.column(k).to_pylist() for k in ("hash", "sig", "bands")}},
                                                 schema=HISTORY_SCHEMA)

    return fn


def _curate_task(cfg, chain, store, task: int, segments):
    import pyarrow as pa

    from spark_jobs.curate.base import Doc, run_chain

    near = cfg.curate.near_dedup if cfg.curate.near_dedup.enabled else None
    cols = {k: [] for k in DOCS_SCHEMA.names}
    for i, rec in enumerate(_records(store, segments, cfg.reader)):
        if rec.text is None:
            continue  # skipped by the reader: stage 2 counts it
        doc = Doc(rec.text)
        removed = run_chain(chain, doc)
        kept = removed is None
        values = {"task": task, "idx": i, "reason": None if kept else ".".join(removed),
                  "hash": corpus.text_hash(doc.text) if kept and cfg.dedup else None,
                  "tags": [t for t, n in doc.counts.items() for _ in range(n)] or None,
                  "text": doc.text if kept and doc.changed else None,
                  "sig": doc.text if kept and near else None}  # the text until its signature replaces it
        for k, v in values.items():
            cols[k].append(v)
    cols["sig"], cols["bands"] = _signatures(cols["sig"], near)
    return pa.RecordBatch.from_pydict(cols, schema=DOCS_SCHEMA)


def _signatures(texts: list, near, batch: int = 1024) -> tuple:
    """The signature and band keys of each text (None: of none), as Arrow list columns,
    computed in batches of ``batch`` texts."""
    import numpy as np
    import pyarrow as pa

    from spark_jobs.curate import neardup

    list_type = pa.list_(pa.int64())
    if not near:
        return pa.nulls(len(texts), list_type), pa.nulls(len(texts), list_type)
    sig = np.zeros((len(texts), near.bands * near.rows), np.int64)
    bands = np.zeros((len(texts), near.bands), np.int64)
    todo = [i for i, t in enumerate(texts) if t is not None]
    for at in range(0, len(todo), batch):
        rows = todo[at : at + batch]
        s = neardup.signatures([texts[i] for i in rows], near)
        sig[rows], bands[rows] = s.view(np.int64), neardup.band_key_matrix(s, near)
    mask = pa.array([t is None for t in texts])

    def column(m):
        offsets = pa.array(range(0, m.size + 1, m.shape[1]), pa.int32())
        return pa.ListArray.from_arrays(offsets, pa.array(m.reshape(-1)), type=list_type, mask=mask)

    return column(sig), column(bands)


def pack(cfg, corpus_uri: str, tokenizer_json: str, eos_id: int, vocab_size: int, plan, part_offset: int = 0):
    """Stage 2: read tasks -> tokenized, packed shards written to storage by the task itself.
    Each input row is a task id with its ``edits`` from stage 1 when it ran."""

    def fn(batches):
        from spark_jobs.tokenizer import from_json

        tok = from_json(tokenizer_json, cfg.tokenizer.eos_token)
        src, out = open_store(corpus_uri, cfg.storage), open_store(cfg.out, cfg.storage)
        for task, segments, edits in _tasks(batches, plan):
            yield _pack_task(cfg, tok, src, out, segments, part_offset + task, edits, eos_id, vocab_size)

    return fn


class _Removed:
    """The removed documents of one task, kept for inspection by ``curate.keep_removed``:
    ``removed/<filter>/part-TTTTT.jsonl``, one JSON object (id, reason, text) per line. A
    retried task writes the same names again."""

    def __init__(self, cfg, out, part: int):
        self.mode, self.limit, self.out, self.part = cfg.curate.keep_removed, cfg.curate.removed_sample, out, part
        self.docs: dict[str, list[str]] = {}

    def add(self, rec, reason: str) -> None:
        step = reason.split(".", 1)[0]
        kept = self.docs.setdefault(step, [])
        if self.mode == "all" or (self.mode == "sample" and len(kept) < self.limit):
            kept.append(json.dumps({"id": rec.doc_id, "reason": reason, "text": rec.text}, ensure_ascii=False))

    def write(self) -> None:
        for step, lines in self.docs.items():
            if lines:
                data = ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")
                self.out.put_bytes(f"{manifest.REMOVED}/{step}/part-{self.part:05d}.jsonl", data)


def _pack_task(cfg, tok, src, out, segments, part: int, edits: dict, eos_id: int, vocab_size: int):
    """One read task: its shards written and uploaded, and its rows (shards, then stats)."""
    import numpy as np
    import pyarrow as pa

    from spark_jobs.packing import Packer

    dtype, eos = manifest.token_dtype(vocab_size), np.array([eos_id], dtype=np.uint32)
    packers = {s: Packer(s, part, cfg.seq_len, dtype, cfg.shard_sequences, lambda tmp, rel: out.put_file(rel, tmp),
                         cfg.compression, eos_id) for s in manifest.SPLITS}
    stats, encode_s, unreadable = Counter(), 0.0, {}

    def encode(texts, splits):
        nonlocal encode_s
        t = time.perf_counter()
        encoded = tok.encode_batch_fast(texts, add_special_tokens=False)
        encode_s += time.perf_counter() - t
        for enc, split in zip(encoded, splits):
            packers[split].add(np.concatenate([np.asarray(enc.ids, dtype=np.uint32), eos]))

    texts, splits, removed = [], [], _Removed(cfg, out, part)
    for i, rec in enumerate(_records(src, segments, cfg.reader)):
        if rec.reason == "unreadable_file":  # counted per file by the driver, which decides
            unreadable[rec.doc_id] = rec.error
            continue
        stats["documents_read"] += 1
        reason, text = edits.get(i, (None, None))
        if rec.reason is not None:
            stats["skipped." + rec.reason] += 1
        elif reason is not None:
            stats["removed." + reason] += 1
            removed.add(rec, reason)
        else:
            texts.append(text if text is not None else rec.text)
            splits.append(corpus.split_of(rec.split_key, cfg.validation_fraction))
            if len(texts) >= DOC_BATCH:
                encode(texts, splits)
                texts, splits = [], []
    if texts:
        encode(texts, splits)
    removed.write()
    rows = {k: [] for k in RESULT_SCHEMA.names}

    def row(**values):
        for k in RESULT_SCHEMA.names:
            rows[k].append(values.get(k))

    for split, packer in packers.items():
        for s in packer.close():
            row(kind="shard", split=split, path=s.path, sequences=s.sequences, tokens=s.tokens, bytes=s.bytes,
                sha256=s.sha256)
        for k in manifest.SPLIT_COUNTS:
            stats[f"{split}.{k}"] += getattr(packer, k)
    stats["seconds.encode"] = round(encode_s, 3)
    row(kind="stats", stats=json.dumps(dict(stats)), path=json.dumps(unreadable))
    return pa.RecordBatch.from_pydict(rows, schema=RESULT_SCHEMA)
