"""What runs on the Spark executors: the two ``mapInArrow`` stages of the tokenize job.

Each read task (a list of corpus file segments, planned by the driver and broadcast) is
addressed by its index, a row of ``spark.range``. Stage 1 hashes its documents for exact
dedup; stage 2 reads them again, drops duplicates, tokenizes in Arrow batches, packs, and
writes and uploads its own shards, returning one row per shard plus one stats row (whose
``path`` holds the files of the task that could not be read, with why).
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

    hashes = pa.schema([("hash", pa.binary()), ("task", pa.int32()), ("idx", pa.int64())])
    res = pa.schema([("kind", pa.string()), ("split", pa.string()), ("path", pa.string()), ("sequences", pa.int64()),
                     ("tokens", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string()), ("stats", pa.string())])
    return hashes, res


HASH_SCHEMA, RESULT_SCHEMA = _schemas()
HASH_DDL = "hash binary, task int, idx long"
RESULT_DDL = "kind string, split string, path string, sequences long, tokens long, bytes long, sha256 string, stats string"


def _records(store, segments, reader: CorpusConfig):
    """Every record of one read task, in a fixed order (so stage 1's indexes match stage 2's)."""
    return corpus.read_segments(store, segments, reader)


def _tasks(batches, plan):
    """(task index, segments) for the ``spark.range`` ids in ``batches``; ``plan`` is broadcast."""
    for batch in batches:
        for task in batch.column("id").to_pylist():
            yield task, plan.value[task]


def hash_docs(corpus_uri: str, storage: StorageConfig, reader: CorpusConfig, plan):
    """Stage 1: read tasks -> (content hash, task, record index) of every usable document."""
    import pyarrow as pa

    def fn(batches):
        store = open_store(corpus_uri, storage)
        for task, segments in _tasks(batches, plan):
            hashes, idxs = [], []
            for i, rec in enumerate(_records(store, segments, reader)):
                if rec.text is not None:
                    hashes.append(corpus.text_hash(rec.text))
                    idxs.append(i)
            yield pa.RecordBatch.from_pydict({"hash": hashes, "task": [task] * len(idxs), "idx": idxs}, schema=HASH_SCHEMA)

    return fn


def pack(cfg, corpus_uri: str, tokenizer_json: str, eos_id: int, vocab_size: int, plan, drop, part_offset: int = 0):
    """Stage 2: read tasks -> tokenized, packed shards written to storage by the task itself.
    ``drop`` is a broadcast {task: record indexes} of the exact duplicates found in stage 1."""

    def fn(batches):
        from spark_jobs.tokenizer import from_json

        tok = from_json(tokenizer_json, cfg.tokenizer.eos_token)
        src, out = open_store(corpus_uri, cfg.storage), open_store(cfg.out, cfg.storage)
        for task, segments in _tasks(batches, plan):
            dropped = set(drop.value.get(task, ())) if drop is not None else set()
            yield _pack_task(cfg, tok, src, out, segments, part_offset + task, dropped, eos_id, vocab_size)

    return fn


def _pack_task(cfg, tok, src, out, segments, part: int, dropped: set, eos_id: int, vocab_size: int):
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

    texts, splits = [], []
    for i, rec in enumerate(_records(src, segments, cfg.reader)):
        if rec.reason == "unreadable_file":  # counted per file by the driver, which decides
            unreadable[rec.doc_id] = rec.error
            continue
        stats["documents_read"] += 1
        if rec.reason is not None:
            stats["skipped." + rec.reason] += 1
        elif i in dropped:
            stats["duplicates_removed"] += 1
        else:
            texts.append(rec.text)
            splits.append(corpus.split_of(rec.split_key, cfg.validation_fraction))
            if len(texts) >= DOC_BATCH:
                encode(texts, splits)
                texts, splits = [], []
    if texts:
        encode(texts, splits)
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
