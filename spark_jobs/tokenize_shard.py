"""Spark job: tokenize a corpus and pack it into fixed-length Parquet shards.

    spark-submit --master spark://host:7077 spark_jobs/tokenize_shard.py \\
        --corpus s3://bucket/corpus/ --out s3://bucket/shards/run1 [key=value ...]

Importable too: ``run(cfg)`` does the work and returns the manifest.

The plan, in one Spark action:
1. the driver lists the corpus files and trains (or loads) the tokenizer;
2. ``mapInArrow`` reads the files into documents, tagging each bad record with a reason;
3. one shuffle by content hash puts exact duplicates in the same partition, sorted by id;
4. ``mapInArrow`` dedups, tokenizes in Arrow batches (``encode_batch``), packs, writes
   and uploads its own shards (no hadoop-aws jars needed), and returns their stats;
5. the driver writes ``manifest.json`` last: until then the shard set does not exist.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import sys
import time
import uuid
from collections import Counter
from dataclasses import field, replace
from typing import Literal

from lmpipe import config as cfglib
from lmpipe import corpus, manifest
from lmpipe.config import stage_config
from lmpipe.corpus import CorpusConfig
from lmpipe.errors import ConfigError, CorpusError, LmpipeError, StorageError
from lmpipe.log import log, warn
from lmpipe.storage import StorageConfig, open_store
from lmpipe.tokenizer import TokenizerConfig

DOC_BATCH = 512  # documents per Arrow batch handed to encode_batch


@stage_config
class TokenizeConfig:
    corpus: str = ""  # file, folder or prefix (local, file:// or s3://)
    out: str = ""  # shard set prefix (local, file:// or s3://)
    seq_len: int = 1024
    validation_fraction: float = 0.02
    spark_master: str = "local[*]"
    spark_conf: dict[str, str] = field(default_factory=dict)
    # Input MB per shuffle partition. The partition count follows from the data, never
    # from the cluster size, so shard names are the same on any cluster.
    partition_mb: int = 16
    shard_sequences: int = 8192
    compression: Literal["zstd", "snappy", "none"] = "zstd"
    dedup: bool = True
    overwrite: bool = False  # replace a published shard set under ``out``
    run_id: str | None = None
    reader: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


def check(cfg: TokenizeConfig) -> None:
    if not cfg.corpus:
        raise ConfigError("config key 'corpus' is required (--corpus URI)")
    if not cfg.out:
        raise ConfigError("config key 'out' is required (--out URI)")
    if cfg.seq_len < 1:
        raise ConfigError(f"config key 'seq_len' must be >= 1 (got {cfg.seq_len})")
    if not 0 <= cfg.validation_fraction < 1:
        raise ConfigError(f"config key 'validation_fraction' must be in [0, 1) (got {cfg.validation_fraction})")
    if cfg.shard_sequences < 1 or cfg.partition_mb < 1:
        raise ConfigError("config keys 'shard_sequences' and 'partition_mb' must be >= 1")
    if cfg.tokenizer.vocab_size < 260 and not cfg.tokenizer.path:
        raise ConfigError(f"config key 'tokenizer.vocab_size' must be >= 260 for byte-level BPE (got {cfg.tokenizer.vocab_size})")


# ---------------------------------------------------------------- executors


def _read_docs(corpus_uri: str, storage: StorageConfig, reader: CorpusConfig, val_fraction: float):
    """mapInArrow: corpus file keys -> documents (doc_id, text, hash, split, reason)."""
    import pyarrow as pa

    def fn(batches):
        store = open_store(corpus_uri, storage)
        for batch in batches:
            for key in batch.column("key").to_pylist():
                rows = {"doc_id": [], "text": [], "hash": [], "split": [], "reason": []}
                for rec in corpus.read_file(store, key, reader):
                    rows["doc_id"].append(rec.doc_id)
                    rows["text"].append(rec.text)
                    rows["hash"].append(corpus.text_hash(rec.text) if rec.text is not None else None)
                    rows["split"].append(corpus.split_of(rec.doc_id, val_fraction) if rec.text is not None else None)
                    rows["reason"].append(rec.reason)
                    if len(rows["doc_id"]) >= DOC_BATCH:
                        yield pa.RecordBatch.from_pydict(rows, schema=DOC_SCHEMA)
                        rows = {k: [] for k in rows}
                if rows["doc_id"]:
                    yield pa.RecordBatch.from_pydict(rows, schema=DOC_SCHEMA)

    return fn


def _pack(cfg: TokenizeConfig, tokenizer_json: str, eos_id: int, vocab_size: int):
    """mapInArrow: sorted documents -> shards written to storage, one row per shard + a stats row."""
    import numpy as np
    import pyarrow as pa
    from pyspark import TaskContext

    from lmpipe.shards import Packer, token_dtype
    from lmpipe.tokenizer import from_json

    def fn(batches):
        part = TaskContext.get().partitionId()
        tok = from_json(tokenizer_json, cfg.tokenizer.eos_token)
        out = open_store(cfg.out, cfg.storage)
        dtype = token_dtype(vocab_size)
        packers = {
            s: Packer(s, part, cfg.seq_len, dtype, cfg.shard_sequences, lambda tmp, rel: out.put_file(rel, tmp), cfg.compression)
            for s in manifest.SPLITS
        }
        seen: set[bytes] = set()
        stats = Counter()
        eos = np.array([eos_id], dtype=np.uint32)
        for batch in batches:
            cols = batch.to_pydict()
            stats["documents_read"] += len(cols["doc_id"])
            texts, splits = [], []
            for text, h, split, reason in zip(cols["text"], cols["hash"], cols["split"], cols["reason"]):
                if reason is not None:
                    stats["skipped." + reason] += 1
                elif cfg.dedup and h in seen:
                    stats["duplicates_removed"] += 1
                else:
                    seen.add(h)
                    texts.append(text)
                    splits.append(split)
            for enc, split in zip(tok.encode_batch_fast(texts, add_special_tokens=False), splits):
                packers[split].add(np.concatenate([np.asarray(enc.ids, dtype=np.uint32), eos]))
        rows = {k: [] for k in RESULT_SCHEMA.names}
        for split, packer in packers.items():
            for s in packer.close():
                for k, v in (("kind", "shard"), ("split", split), ("path", s.path), ("sequences", s.sequences),
                             ("tokens", s.tokens), ("bytes", s.bytes), ("sha256", s.sha256), ("stats", None)):
                    rows[k].append(v)
            stats[f"{split}.documents"] += packer.documents
            stats[f"{split}.document_tokens"] += packer.document_tokens
            stats[f"{split}.dropped_tokens"] += packer.dropped_tokens
        for k, v in (("kind", "stats"), ("split", None), ("path", None), ("sequences", None), ("tokens", None),
                     ("bytes", None), ("sha256", None), ("stats", json.dumps(dict(stats)))):
            rows[k].append(v)
        yield pa.RecordBatch.from_pydict(rows, schema=RESULT_SCHEMA)

    return fn


def _schemas():
    import pyarrow as pa

    doc = pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("hash", pa.binary()),
                     ("split", pa.string()), ("reason", pa.string())])
    res = pa.schema([("kind", pa.string()), ("split", pa.string()), ("path", pa.string()), ("sequences", pa.int64()),
                     ("tokens", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string()), ("stats", pa.string())])
    return doc, res


DOC_SCHEMA, RESULT_SCHEMA = _schemas()
DOC_DDL = "doc_id string, text string, hash binary, split string, reason string"
RESULT_DDL = "kind string, split string, path string, sequences long, tokens long, bytes long, sha256 string, stats string"


# ---------------------------------------------------------------- driver


def _tokenizer(cfg: TokenizeConfig, store, files):
    """Load ``tokenizer.path`` or train a byte-level BPE on a deterministic sample of whole files."""
    from lmpipe import tokenizer as toklib

    if cfg.tokenizer.path:
        parent, name = _parent(cfg.tokenizer.path)
        try:
            text = open_store(parent, cfg.storage).get_bytes(name).decode("utf-8")
        except StorageError as exc:
            raise LmpipeError(f"cannot read tokenizer {cfg.tokenizer.path}: {exc}") from None
        return toklib.from_json(text, cfg.tokenizer.eos_token, cfg.tokenizer.path)
    budget = cfg.tokenizer.train_sample_mb * 1024 * 1024
    ordered = sorted(files, key=lambda o: hashlib.blake2b(o.key.encode(), digest_size=8).digest())

    def sample():
        used = 0
        for obj in ordered:
            for rec in corpus.read_file(store, obj.key, cfg.reader):
                if rec.text is None:
                    continue
                yield rec.text
                used += len(rec.text)
                if used >= budget:
                    return

    t0 = time.monotonic()
    tok = toklib.train(sample(), cfg.tokenizer)
    if tok.get_vocab_size() <= len(cfg.tokenizer.special_tokens or [1, 2]):
        raise CorpusError(f"corpus {cfg.corpus} has zero usable documents (nothing to train a tokenizer on)")
    log(f"trained byte-level BPE tokenizer: vocab {tok.get_vocab_size()} in {time.monotonic() - t0:.1f}s")
    return tok


def _parent(uri: str):
    from lmpipe.storage import split_uri

    return split_uri(uri)


def _prepare_out(cfg: TokenizeConfig):
    out = open_store(cfg.out, cfg.storage)
    if out.exists(manifest.MANIFEST):
        if not cfg.overwrite:
            raise LmpipeError(
                f"{out.url(manifest.MANIFEST)} already exists: {cfg.out} holds a published shard set. "
                "Write to a new prefix, or pass overwrite=true to replace it"
            )
        # Unpublish first, so no reader ever sees the old manifest over new shards.
        out.delete_prefix(manifest.MANIFEST)
        log(f"overwrite: removed the old manifest under {cfg.out}")
    for prefix in manifest.SPLITS:  # stale shards of an unfinished or replaced run
        if n := out.delete_prefix(prefix):
            log(f"removed {n} stale files under {out.url(prefix)}")
    return out


def run(cfg: TokenizeConfig) -> dict:
    """Tokenize ``cfg.corpus`` into shards under ``cfg.out``; return the manifest written last."""
    from lmpipe import sparkutil
    from lmpipe.tokenizer import sha256_text

    check(cfg)
    t0 = time.monotonic()
    run_id = cfg.run_id or uuid.uuid4().hex[:12]
    cstore, files, ignored = corpus.resolve(cfg.corpus, cfg.storage)
    total_bytes = sum(o.size for o in files)
    if ignored:
        warn(f"ignoring {len(ignored)} files that are not corpus files, e.g. {ignored[:3]}")
    log(f"corpus {cfg.corpus}: {len(files)} files, {total_bytes / 1e6:.1f} MB")
    out = _prepare_out(cfg)

    tok = _tokenizer(cfg, cstore, files)
    tok_json = tok.to_str()
    eos_id, vocab_size = tok.token_to_id(cfg.tokenizer.eos_token), tok.get_vocab_size()
    out.put_bytes("tokenizer.json", tok_json.encode())

    partitions = max(1, math.ceil(total_bytes / (cfg.partition_mb * 1024 * 1024)))
    spark = sparkutil.session(cfg.spark_master, f"lmpipe-tokenize-{run_id}", {
        "spark.sql.shuffle.partitions": str(partitions), **cfg.spark_conf})
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(DOC_BATCH))
    log(f"spark {spark.version} master {spark.sparkContext.master}: {partitions} partitions, seq_len {cfg.seq_len}")
    keys = spark.createDataFrame([(o.key,) for o in files], "key string")
    keys = keys.repartition(min(len(files), max(partitions, spark.sparkContext.defaultParallelism)))
    docs = keys.mapInArrow(_read_docs(cstore.uri, cfg.storage, cfg.reader, cfg.validation_fraction), DOC_DDL)
    packed = docs.repartition(partitions, "hash").sortWithinPartitions("doc_id", "hash")
    result = packed.mapInArrow(_pack(cfg, tok_json, eos_id, vocab_size), RESULT_DDL)
    try:
        with sparkutil.progress(spark, "tokenize"):
            rows = result.collect()
    except Exception as exc:
        for marker, kind in (("CorpusError", CorpusError), ("StorageError", StorageError), ("LmpipeError", LmpipeError)):
            if msg := sparkutil.task_error_message(exc, marker):
                raise kind(msg) from None
        raise
    elapsed = time.monotonic() - t0

    stats = Counter()
    for r in rows:
        if r["kind"] == "stats":
            stats.update(json.loads(r["stats"]))
    used = stats["train.documents"] + stats["validation.documents"]
    if used == 0:
        raise CorpusError(f"corpus {cfg.corpus} has zero usable documents: skipped {_skipped(stats) or 'none'}")
    splits = {}
    for split in manifest.SPLITS:
        shards = sorted(
            ({k: r[k] for k in ("path", "sequences", "tokens", "bytes", "sha256")} for r in rows
             if r["kind"] == "shard" and r["split"] == split),
            key=lambda s: s["path"],
        )
        splits[split] = {
            "sequences": sum(s["sequences"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "documents": stats[f"{split}.documents"],
            "document_tokens": stats[f"{split}.document_tokens"],
            "dropped_tokens": stats[f"{split}.dropped_tokens"],
            "shards": shards,
        }
        if not shards:
            warn(f"the {split} split has no full sequence: too little data for seq_len {cfg.seq_len}")
    resolved = cfglib.to_dict(replace(cfg, run_id=run_id))
    m = {
        "format_version": manifest.FORMAT_VERSION,
        "seq_len": cfg.seq_len,
        "dtype": "uint16" if vocab_size <= 2**16 else "uint32",
        "tokenizer": {"path": "tokenizer.json", "sha256": sha256_text(tok_json), "vocab_size": vocab_size,
                      "eos_id": eos_id},
        "splits": splits,
        "input": {
            "uri": cfg.corpus,
            "files": len(files),
            "bytes": total_bytes,
            "ignored_files": ignored,
            "documents_read": stats["documents_read"],
            "documents_used": used,
            "duplicates_removed": stats["duplicates_removed"],
            "skipped": _skipped(stats),
        },
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "run_id": run_id,
        "elapsed_s": round(elapsed, 2),
        "spark": {"version": spark.version, "master": spark.sparkContext.master, "partitions": partitions},
        "config": resolved,
    }
    out.put_bytes("tokenize_config.json", cfglib.dump(replace(cfg, run_id=run_id)).encode())
    url = manifest.write(out, m)  # last: this publishes the shard set
    log(summary(m, url))
    return m


def _skipped(stats: Counter) -> dict[str, int]:
    return {k.split(".", 1)[1]: v for k, v in sorted(stats.items()) if k.startswith("skipped.")}


def summary(m: dict, url: str) -> str:
    sp, inp = m["splits"], m["input"]
    tokens = sp["train"]["tokens"] + sp["validation"]["tokens"]
    skipped = ", ".join(f"{k} {v}" for k, v in inp["skipped"].items()) or "none"
    return (
        f"Tokenized {inp['documents_used']:,} of {inp['documents_read']:,} documents "
        f"({inp['duplicates_removed']:,} exact duplicates removed; skipped: {skipped}) into "
        f"{tokens:,} tokens: train {sp['train']['sequences']:,} sequences in {len(sp['train']['shards'])} shards, "
        f"validation {sp['validation']['sequences']:,} sequences in {len(sp['validation']['shards'])} shards, "
        f"seq_len {m['seq_len']}, vocab {m['tokenizer']['vocab_size']}. "
        f"{m['elapsed_s']:.1f}s end to end, {tokens / max(m['elapsed_s'], 1e-9):,.0f} tokens/s, "
        f"{inp['bytes'] / 1e6 / max(m['elapsed_s'], 1e-9):.2f} MB/s. Manifest: {url}"
    )


# ---------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", help="corpus file, folder or prefix (local, file://, s3://)")
    p.add_argument("--out", help="output prefix for shards and manifest (local, file://, s3://)")
    p.add_argument("--vocab-size", type=int, help="vocab size of the BPE tokenizer to train")
    p.add_argument("--seq-len", type=int, help="tokens per training sequence (each row holds seq_len + 1)")
    p.add_argument("--tokenizer", help="an existing tokenizer.json to use instead of training one")
    p.add_argument("--spark-master", help="local[*] (default), spark://host:7077, k8s://...")
    p.add_argument("--config", help="YAML or JSON config file (a 'tokenize:' section is used if present)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. reader.text_field=body")


def config_from_args(args: argparse.Namespace) -> TokenizeConfig:
    flags = {"corpus": args.corpus, "out": args.out, "tokenizer.vocab_size": args.vocab_size,
             "seq_len": args.seq_len, "tokenizer.path": args.tokenizer, "spark_master": args.spark_master}
    extra = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    return cfglib.load(TokenizeConfig, args.config, [*args.overrides, *extra], section="tokenize")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenize_shard", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(config_from_args(args))
    except LmpipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
