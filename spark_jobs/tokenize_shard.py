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
import concurrent.futures
import datetime as dt
import hashlib
import json
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
from lmpipe.storage import StorageConfig, open_store, split_uri
from lmpipe.storage import copy as copy_object
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
    # Input MB per read task. Tasks follow from the data, never from the cluster size,
    # so shard names and contents are the same on any cluster.
    partition_mb: int = 8
    shard_sequences: int = 8192
    compression: Literal["zstd", "snappy", "none"] = "zstd"
    dedup: bool = True
    overwrite: bool = False  # replace a published shard set under ``out``
    # A previous shard set of the same corpus: tokenize only the corpus files it has not seen
    # (e.g. new date partitions), with its tokenizer, and merge its shards into ``out``.
    base: str | None = None
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


def _records(store, segments, reader: CorpusConfig):
    """Every record of one read task, in a fixed order (so stage 1's indexes match stage 2's)."""
    for key, start, end in segments:
        yield from corpus.read_file(store, key, reader, start, end)


def _tasks(batches, plan):
    """(task index, segments) for the ``spark.range`` ids in ``batches``; ``plan`` is broadcast."""
    for batch in batches:
        for task in batch.column("id").to_pylist():
            yield task, plan.value[task]


def _hash_docs(corpus_uri: str, storage: StorageConfig, reader: CorpusConfig, plan):
    """mapInArrow, stage 1: read tasks -> (content hash, task, record index) of every usable document."""
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


def _pack(cfg: TokenizeConfig, corpus_uri: str, tokenizer_json: str, eos_id: int, vocab_size: int, plan, drop,
          part_offset: int = 0):
    """mapInArrow, stage 2: read tasks -> tokenized, packed shards written to storage by the task
    itself; returns one row per shard plus one stats row. ``drop`` is a broadcast
    {task: record indexes} of exact duplicates found in stage 1."""
    import numpy as np
    import pyarrow as pa

    from lmpipe.shards import Packer, token_dtype
    from lmpipe.tokenizer import from_json

    def fn(batches):
        tok = from_json(tokenizer_json, cfg.tokenizer.eos_token)
        src, out = open_store(corpus_uri, cfg.storage), open_store(cfg.out, cfg.storage)
        dtype = token_dtype(vocab_size)
        eos = np.array([eos_id], dtype=np.uint32)
        for task, segments in _tasks(batches, plan):
            dropped = set(drop.value.get(task, ())) if drop is not None else set()
            packers = {
                s: Packer(s, part_offset + task, cfg.seq_len, dtype, cfg.shard_sequences, lambda tmp, rel: out.put_file(rel, tmp),
                          cfg.compression, eos_id)
                for s in manifest.SPLITS
            }
            stats = Counter()
            timer = Counter()

            def encode(texts, splits):
                t = time.perf_counter()
                encoded = tok.encode_batch_fast(texts, add_special_tokens=False)
                timer["encode"] += time.perf_counter() - t
                for enc, split in zip(encoded, splits):
                    packers[split].add(np.concatenate([np.asarray(enc.ids, dtype=np.uint32), eos]))

            texts, splits = [], []
            for i, rec in enumerate(_records(src, segments, cfg.reader)):
                stats["documents_read"] += 1
                if rec.reason is not None:
                    stats["skipped." + rec.reason] += 1
                elif i in dropped:
                    stats["duplicates_removed"] += 1
                else:
                    texts.append(rec.text)
                    splits.append(corpus.split_of(rec.doc_id, cfg.validation_fraction))
                    if len(texts) >= DOC_BATCH:
                        encode(texts, splits)
                        texts, splits = [], []
            if texts:
                encode(texts, splits)
            rows = {k: [] for k in RESULT_SCHEMA.names}
            for split, packer in packers.items():
                for s in packer.close():
                    for k, v in (("kind", "shard"), ("split", split), ("path", s.path), ("sequences", s.sequences),
                                 ("tokens", s.tokens), ("bytes", s.bytes), ("sha256", s.sha256), ("stats", None)):
                        rows[k].append(v)
                stats[f"{split}.documents"] += packer.documents
                stats[f"{split}.document_tokens"] += packer.document_tokens
                stats[f"{split}.dropped_tokens"] += packer.dropped_tokens
                stats[f"{split}.dropped_documents"] += packer.dropped_documents
            stats["seconds.encode"] = round(timer["encode"], 3)
            for k, v in (("kind", "stats"), ("split", None), ("path", None), ("sequences", None), ("tokens", None),
                         ("bytes", None), ("sha256", None), ("stats", json.dumps(dict(stats)))):
                rows[k].append(v)
            yield pa.RecordBatch.from_pydict(rows, schema=RESULT_SCHEMA)

    return fn


def _schemas():
    import pyarrow as pa

    hashes = pa.schema([("hash", pa.binary()), ("task", pa.int32()), ("idx", pa.int64())])
    res = pa.schema([("kind", pa.string()), ("split", pa.string()), ("path", pa.string()), ("sequences", pa.int64()),
                     ("tokens", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string()), ("stats", pa.string())])
    return hashes, res


HASH_SCHEMA, RESULT_SCHEMA = _schemas()
HASH_DDL = "hash binary, task int, idx long"
RESULT_DDL = "kind string, split string, path string, sequences long, tokens long, bytes long, sha256 string, stats string"


# ---------------------------------------------------------------- driver


def _tokenizer(cfg: TokenizeConfig, store, files):
    """Load ``tokenizer.path`` or train a byte-level BPE on a deterministic sample of whole files."""
    from lmpipe import tokenizer as toklib

    if cfg.tokenizer.path:
        parent, name = split_uri(cfg.tokenizer.path)
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


def _base(cfg: TokenizeConfig) -> tuple[dict | None, object]:
    """The base shard set's manifest and store (``base=``), checked against this run's settings."""
    if not cfg.base:
        return None, None
    store = open_store(cfg.base, cfg.storage)
    m = manifest.read(store)
    if "file_list" not in m["input"]:
        raise LmpipeError(f"base shard set {cfg.base} does not list its corpus files (written by an older lmpipe): "
                          "tokenize the whole corpus once without base=")
    if m["input"]["uri"].rstrip("/") != cfg.corpus.rstrip("/"):
        raise ConfigError(f"config key 'base': {cfg.base} was tokenized from {m['input']['uri']}, not {cfg.corpus}")
    if m["seq_len"] != cfg.seq_len:
        raise ConfigError(f"config key 'seq_len' is {cfg.seq_len} but base {cfg.base} has seq_len {m['seq_len']}")
    return m, store


def _parts(m: dict) -> int:
    """One past the highest read-task number in a manifest's shard names (part-TTTTT-NNNNN)."""
    return 1 + max((int(sh["path"].split("/")[1].split("-")[1]) for sp in m["splits"].values()
                    for sh in sp["shards"]), default=-1)


def _copy_base(base_store, base_m: dict, out) -> None:
    keys = [sh["path"] for sp in base_m["splits"].values() for sh in sp["shards"]]
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: copy_object(base_store, k, out), keys))
    log(f"merged {len(keys)} shards of the base shard set {base_store.uri} in {time.monotonic() - t0:.1f}s")


def run(cfg: TokenizeConfig) -> dict:
    """Tokenize ``cfg.corpus`` into shards under ``cfg.out``; return the manifest written last."""
    from lmpipe.tokenizer import sha256_text

    check(cfg)
    t0 = time.monotonic()
    run_id = cfg.run_id or uuid.uuid4().hex[:12]
    cstore, files, ignored = corpus.resolve(cfg.corpus, cfg.storage)
    total_bytes = sum(o.size for o in files)
    if ignored:
        warn(f"ignoring {len(ignored)} files that are not corpus files, e.g. {ignored[:3]}")
    log(f"corpus {cfg.corpus}: {len(files)} files, {total_bytes / 1e6:.1f} MB")
    base_m, base_store = _base(cfg)
    todo = files
    if base_m:
        seen = {f["key"]: f["size"] for f in base_m["input"]["file_list"]}
        changed = [o.key for o in files if o.key in seen and seen[o.key] != o.size]
        if changed:
            warn(f"{len(changed)} corpus files changed size since the base was tokenized; their old content is "
                 f"kept and they are not re-read, e.g. {changed[:3]}")
        todo = [o for o in files if o.key not in seen]
        log(f"incremental: {len(todo)} new corpus files ({sum(o.size for o in todo) / 1e6:.1f} MB) on top of base "
            f"{cfg.base} ({len(seen)} files); reusing its tokenizer")
        tok_eos = base_m["config"].get("tokenizer", {}).get("eos_token", cfg.tokenizer.eos_token)
        cfg = replace(cfg, tokenizer=replace(cfg.tokenizer, path=f"{base_store.uri}/{base_m['tokenizer']['path']}",
                                             eos_token=tok_eos))
    out = _prepare_out(cfg)

    # The JVM and Python workers take ~10 s to start: overlap that with tokenizer training.
    pool = concurrent.futures.ThreadPoolExecutor(1)
    spark_future = pool.submit(_start_spark, cfg, run_id) if todo else None
    pool.shutdown(wait=False)
    tok = _tokenizer(cfg, cstore, files)
    tok_json = tok.to_str()
    eos_id, vocab_size = tok.token_to_id(cfg.tokenizer.eos_token), tok.get_vocab_size()
    out.put_bytes("tokenizer.json", tok_json.encode())
    if base_m and sha256_text(tok_json) != base_m["tokenizer"]["sha256"]:
        raise LmpipeError(f"base {cfg.base}: tokenizer.json does not match the sha256 in its manifest")

    rows, spark_info = ([], {"version": None, "master": None, "tasks": 0})
    if spark_future:
        rows, spark_info = _spark_pack(cfg, cstore, todo, tok_json, eos_id, vocab_size, spark_future.result(),
                                       _parts(base_m) if base_m else 0)
    elapsed = time.monotonic() - t0

    stats = Counter()
    for r in rows:
        if r["kind"] == "stats":
            stats.update(json.loads(r["stats"]))
    if rows:
        log("task seconds (summed over tasks): " + ", ".join(f"{k[8:]} {v:.1f}" for k, v in sorted(stats.items()) if k.startswith("seconds.")))
    used = stats["train.documents"] + stats["validation.documents"]
    if todo and used == 0:
        raise CorpusError(f"corpus {cfg.corpus} has zero usable documents"
                          f"{' in its new files' if base_m else ''}: skipped {_skipped(stats) or 'none'}")
    if base_m:
        _copy_base(base_store, base_m, out)
        stats.update({k: v for k, v in base_m["input"].items() if k in ("documents_read", "duplicates_removed")})
        stats.update({"skipped." + k: v for k, v in base_m["input"]["skipped"].items()})
    splits = {}
    for split in manifest.SPLITS:
        shards = sorted(
            ({k: r[k] for k in ("path", "sequences", "tokens", "bytes", "sha256")} for r in rows
             if r["kind"] == "shard" and r["split"] == split),
            key=lambda s: s["path"],
        )
        prev = base_m["splits"][split] if base_m else {"shards": []}
        shards = sorted(prev["shards"] + shards, key=lambda s: s["path"])
        splits[split] = {
            "sequences": sum(s["sequences"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
            **{k: stats[f"{split}.{k}"] + prev.get(k, 0)
               for k in ("documents", "document_tokens", "dropped_tokens", "dropped_documents")},
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
            "new_files": len(todo),
            "bytes": total_bytes,
            "ignored_files": ignored,
            "file_list": ((base_m["input"]["file_list"] if base_m else [])
                          + [{"key": o.key, "size": o.size} for o in todo]),
            "documents_read": stats["documents_read"],
            "documents_used": splits["train"]["documents"] + splits["validation"]["documents"],
            "duplicates_removed": stats["duplicates_removed"],
            "skipped": _skipped(stats),
        },
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "run_id": run_id,
        "elapsed_s": round(elapsed, 2),
        "spark": spark_info,
        "config": resolved,
    }
    if base_m:
        m["base"] = {"uri": base_store.uri, "run_id": base_m["run_id"]}
    out.put_bytes("tokenize_config.json", cfglib.dump(replace(cfg, run_id=run_id)).encode())
    url = manifest.write(out, m)  # last: this publishes the shard set
    log(summary(m, url))
    return m


def _spark_pack(cfg: TokenizeConfig, cstore, files, tok_json: str, eos_id: int, vocab_size: int, spark,
                part_offset: int) -> tuple[list, dict]:
    """Steps 2-4 on Spark: one read task per partition; shard names follow the task index, never the cluster size."""
    from lmpipe import sparkutil

    tasks = corpus.plan_tasks(files, cfg.partition_mb * 1024 * 1024)
    sc = spark.sparkContext
    log(f"spark {spark.version} master {sc.master}: {len(tasks)} read tasks, seq_len {cfg.seq_len}")
    task_df = spark.range(0, len(tasks), numPartitions=len(tasks))
    plan = sc.broadcast(tasks)
    try:
        drop = None
        if cfg.dedup:
            with sparkutil.progress(spark, "dedup (hashing documents)"):
                drop = sc.broadcast(_duplicates(task_df.mapInArrow(_hash_docs(cstore.uri, cfg.storage, cfg.reader, plan), HASH_DDL)))
        with sparkutil.progress(spark, "tokenize"):
            rows = task_df.mapInArrow(_pack(cfg, cstore.uri, tok_json, eos_id, vocab_size, plan, drop, part_offset),
                                      RESULT_DDL).collect()
    except Exception as exc:
        for marker, kind in (("CorpusError", CorpusError), ("StorageError", StorageError), ("LmpipeError", LmpipeError)):
            if msg := sparkutil.task_error_message(exc, marker):
                raise kind(msg) from None
        raise
    return rows, {"version": spark.version, "master": sc.master, "tasks": len(tasks)}


def _start_spark(cfg: TokenizeConfig, run_id: str):
    from lmpipe import sparkutil

    spark = sparkutil.session(cfg.spark_master, f"lmpipe-tokenize-{run_id}", cfg.spark_conf)
    spark.conf.set("spark.sql.shuffle.partitions", str(max(2, spark.sparkContext.defaultParallelism)))
    spark.range(0, 2, numPartitions=2).mapInArrow(lambda it: it, "id long").collect()  # start Python workers
    return spark


def _duplicates(hashes) -> dict[int, list[int]]:
    """{task: record indexes} of every exact duplicate but the first (by task, then index)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    rank = F.row_number().over(Window.partitionBy("hash").orderBy("task", "idx"))
    drop: dict[int, list[int]] = {}
    for row in hashes.withColumn("rank", rank).filter("rank > 1").select("task", "idx").collect():
        drop.setdefault(row["task"], []).append(row["idx"])
    return drop


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
    p.add_argument("--base", help="a previous shard set of this corpus: tokenize only new files and merge (incremental)")
    p.add_argument("--spark-master", help="local[*] (default), spark://host:7077, k8s://...")
    p.add_argument("--config", help="YAML or JSON config file (a 'tokenize:' section is used if present)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. reader.text_field=body")


def config_from_args(args: argparse.Namespace) -> TokenizeConfig:
    flags = {"corpus": args.corpus, "out": args.out, "tokenizer.vocab_size": args.vocab_size,
             "seq_len": args.seq_len, "tokenizer.path": args.tokenizer, "spark_master": args.spark_master, "base": args.base}
    return cfglib.from_cli(TokenizeConfig, args.config, args.overrides, flags, "tokenize")


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
