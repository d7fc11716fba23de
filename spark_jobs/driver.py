"""The tokenize job's driver: plan, tokenizer, the Spark stages, and the manifest written last.

1. the driver lists the corpus files and trains (or loads) the tokenizer, while Spark starts;
2. stage 1 (``mapInArrow``, :mod:`spark_jobs.worker`) hashes every document, and a window over
   the hashes finds the exact duplicates (the first by position is kept);
3. stage 2 (``mapInArrow``) reads each task again, drops the duplicates, tokenizes, packs, and
   writes and uploads its own shards (no hadoop-aws jars needed), returning their stats;
4. the driver writes ``manifest.json`` last: until then the shard set does not exist.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import time
import uuid
from collections import Counter
from dataclasses import replace

from lmpipe import config as cfglib
from lmpipe import manifest
from lmpipe.errors import ConfigError, CorpusError, LmpipeError, StorageError
from lmpipe.log import log
from lmpipe.storage import open_store, split_uri
from spark_jobs import corpus, worker
from spark_jobs.config import TokenizeConfig, check

CONFIG_FILE = "tokenize_config.json"  # the resolved config, beside the manifest that points at it


def run(cfg: TokenizeConfig) -> dict:
    """Tokenize ``cfg.corpus`` into shards under ``cfg.out``; return the manifest written last."""
    filter_names = check(cfg)
    t0 = time.monotonic()
    index = None
    if cfg.curate.decontaminate:
        from spark_jobs.curate import decontam

        index = decontam.load_index(cfg.curate.decontaminate, cfg.curate.decontaminate_ngram, cfg.storage)
    cfg = replace(cfg, run_id=cfg.run_id or uuid.uuid4().hex[:12])
    cstore, files, ignored = corpus.resolve(cfg.corpus, cfg.storage)
    total_bytes = sum(o.size for o in files)
    if ignored:
        log(f"ignoring {len(ignored)} files that are not corpus files, e.g. {ignored[:3]}", level="warning")
    log(f"corpus {cfg.corpus}: {len(files)} files, {total_bytes / 1e6:.1f} MB")
    base_m, base_store = _base(cfg)
    todo = files
    if base_m:
        todo = _new_files(files, base_m, cfg)
        eos = base_m["config"].get("tokenizer", {}).get("eos_token", cfg.tokenizer.eos_token)
        cfg = replace(cfg, tokenizer=replace(cfg.tokenizer, path=f"{base_store.uri}/{base_m['tokenizer']['path']}",
                                             eos_token=eos))
    if (published := _already_published(cfg, len(files), total_bytes)) is not None:
        return published
    out = _prepare_out(cfg)

    # The JVM and Python workers take ~10 s to start: overlap that with tokenizer training.
    pool = concurrent.futures.ThreadPoolExecutor(1)
    spark_future = pool.submit(_start_spark, cfg) if todo else None
    pool.shutdown(wait=False)
    tok, tok_info = _publish_tokenizer(cfg, cstore, files, out, base_m)

    rows, tags, spark_info = [], Counter(), {"version": None, "master": None, "tasks": 0}
    sets = signature_sets(out.uri, base_m, base_store and base_store.uri)
    if spark_future:
        rows, tags, spark_info = _spark_pack(cfg, cstore, todo, tok.to_str(), tok_info, spark_future.result(),
                                             manifest.read_parts(base_m) if base_m else 0, index, sets[1:],
                                             curating(cfg, filter_names))
    stats = _stats(rows)
    listing = {"uri": cfg.corpus, "files": len(files), "new_files": len(todo), "bytes": total_bytes,
               "ignored_files": ignored, "file_list": [{"key": o.key, "size": o.size} for o in todo],
               "unreadable_files": _quarantine(cfg, rows, stats)}
    if todo and stats["train.documents"] + stats["validation.documents"] == 0:
        skipped = {k.split(".", 1)[1]: v for k, v in sorted(stats.items()) if k.startswith("skipped.")}
        raise CorpusError(f"corpus {cfg.corpus} has zero usable documents"
                          f"{' in its new files' if base_m else ''}: skipped {skipped or 'none'}")
    shards = [r for r in rows if r["kind"] == "shard"]
    m = manifest.build(seq_len=cfg.seq_len, tokenizer=tok_info, shards=shards, stats=stats, input=listing,
                       run_id=cfg.run_id, elapsed_s=time.monotonic() - t0, spark=spark_info,
                       config=cfglib.to_dict(cfg), config_file=CONFIG_FILE,
                       curation={**_curation(cfg, tags, filter_names), "signatures": sets})
    if base_m:
        m = manifest.merge(base_m, m, base_store.uri)
    for split in manifest.SPLITS:
        if not m["splits"][split]["shards"]:
            log(f"the {split} split has no full sequence: too little data for seq_len {cfg.seq_len}", level="warning")
    out.put_bytes(CONFIG_FILE, cfglib.dump(cfg).encode())
    url = manifest.write(out, m)  # last: this publishes the shard set
    log(summary(m, url))
    return m


def _curation(cfg: TokenizeConfig, tags: Counter, filter_names: list[str]) -> dict:
    """What :func:`manifest.build` needs for the funnel: the steps that ran, in order, plus the
    languages seen, the scrubbed items by kind, and the near-dup signature scheme."""
    from spark_jobs.curate import neardup

    steps = ["reader"] + (["decontaminate"] if cfg.curate.decontaminate else []) + list(filter_names)
    steps += (["exact_dedup"] if cfg.dedup else []) + (["near_dedup"] if cfg.curate.near_dedup.enabled else [])
    return {
        "steps": steps,
        "languages": {k[5:]: v for k, v in sorted(tags.items()) if k.startswith("lang.")},
        "scrubbed": {k[9:]: v for k, v in sorted(tags.items()) if k.startswith("scrubbed.")},
        "kept_languages": list(cfg.curate.languages),
        "removed_samples": f"{manifest.REMOVED}/" if cfg.curate.keep_removed != "none" else None,
        "signature_scheme": neardup.SCHEME,
    }


def _new_files(files, base_m: dict, cfg: TokenizeConfig):
    """The corpus files an incremental run reads: those its base has not seen."""
    seen = {f["key"]: f["size"] for f in base_m["input"]["file_list"]}
    changed = [o.key for o in files if o.key in seen and seen[o.key] != o.size]
    if changed:
        log(f"{len(changed)} corpus files changed size since the base was tokenized; their old content is kept "
            f"and they are not re-read, e.g. {changed[:3]}", level="warning")
    todo = [o for o in files if o.key not in seen]
    log(f"incremental: {len(todo)} new corpus files ({sum(o.size for o in todo) / 1e6:.1f} MB) on top of base "
        f"{cfg.base} ({len(seen)} files); reusing its tokenizer")
    return todo


def _publish_tokenizer(cfg: TokenizeConfig, cstore, files, out, base_m: dict | None):
    """Train or load the tokenizer, write it beside the shards, and describe it for the manifest."""
    from spark_jobs.tokenizer import sha256_text

    tok = _tokenizer(cfg, cstore, files)
    tok_json = tok.to_str()
    out.put_bytes(manifest.TOKENIZER, tok_json.encode())
    sha = sha256_text(tok_json)
    if base_m and sha != base_m["tokenizer"]["sha256"]:
        raise LmpipeError(f"base {cfg.base}: tokenizer.json does not match the sha256 in its manifest")
    info = {"path": manifest.TOKENIZER, "sha256": sha, "vocab_size": tok.get_vocab_size(),
            "eos_id": tok.token_to_id(cfg.tokenizer.eos_token)}
    return tok, info


def _tokenizer(cfg: TokenizeConfig, store, files):
    """Load ``tokenizer.path`` or train a byte-level BPE on a deterministic sample of whole files."""
    from spark_jobs import tokenizer as toklib

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
            for rec in corpus.read_segments(store, [(obj.key, 0, -1)], cfg.reader):
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


def _already_published(cfg: TokenizeConfig, n_files: int, n_bytes: int) -> dict | None:
    """A cleared or retried run whose shard set is already published from the same corpus listing
    and the same config: its shards are checked against the manifest's sha256 and the manifest is
    returned untouched. Anything else at ``out`` is left to :func:`_prepare_out`'s refusal."""
    out = open_store(cfg.out, cfg.storage)
    if cfg.overwrite or not out.exists(manifest.MANIFEST):
        return None
    m = manifest.read(out)

    def settings(c: dict) -> dict:
        return {k: v for k, v in c.items() if k not in ("run_id", "overwrite")}

    if settings(m["config"]) != settings(cfglib.to_dict(cfg)) or \
            (m["input"].get("uri"), m["input"].get("files"), m["input"].get("bytes")) != (cfg.corpus, n_files, n_bytes):
        return None
    shards = [s for split in manifest.SPLITS for s in m["splits"][split]["shards"]]
    for s in shards:
        src, key = manifest.shard_location(out, s, cfg.storage)  # a base's shard is checked where it lives
        try:
            actual = src.sha256(key)
        except StorageError as exc:
            actual = f"unreadable ({exc})"
        if actual != s["sha256"]:
            raise LmpipeError(f"{cfg.out} was published from this corpus and config, but {src.url(key)} does not match "
                              f"its sha256 in the manifest ({actual}): pass overwrite=true to rebuild the shard set")
    log(f"{cfg.out} was already published from this corpus and config (run {m['run_id']}): "
        f"{len(shards)} shards verified, nothing to do")
    return m


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
    for prefix in (*manifest.SPLITS, manifest.REMOVED, worker.SIGNATURES):  # stale files of an unfinished or replaced run
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
    from spark_jobs.curate import neardup

    neardup.compatible(cfg.curate.near_dedup, (m["config"].get("curate") or {}).get("near_dedup"),
                       (m.get("curation") or {}).get("signature_scheme"), cfg.base)
    roots = {sh["root"] for sp in m["splits"].values() for sh in sp["shards"] if "root" in sh}
    if open_store(cfg.out, cfg.storage).uri in {store.uri} | {open_store(r, cfg.storage).uri for r in roots}:
        raise ConfigError(f"config key 'out': {cfg.out} holds shards that base {cfg.base} references: "
                          "write to a new prefix")
    return m, store


def signature_sets(out_uri: str, base_m: dict | None, base_uri: str | None) -> list[str]:
    """The signature folders of a lineage, this run's first: an incremental run references its
    base's (and those the base references) where they live, as it references their shards."""
    own = [f"{out_uri.rstrip('/')}/{worker.SIGNATURES}"]
    if not base_m:
        return own
    listed = (base_m.get("curation") or {}).get("signatures")
    return own + (list(listed) if listed is not None else [f"{base_uri.rstrip('/')}/{worker.SIGNATURES}"])


def _quarantine(cfg: TokenizeConfig, rows, stats: Counter) -> list[str]:
    """The corpus files no task could read: quarantined (counted and listed) up to
    ``reader.max_bad_files``; past it the run fails here, before any manifest exists."""
    bad = {}
    for r in rows:
        if r["kind"] == "stats" and r["path"]:
            bad.update(json.loads(r["path"]))
    limit = cfg.reader.max_bad_files
    if len(bad) > limit:
        shown = "; ".join(bad[k] for k in sorted(bad)[:3])
        raise CorpusError(f"{len(bad)} corpus file(s) cannot be read, more than reader.max_bad_files={limit} "
                          f"(raise it to quarantine them): {shown}")
    if bad:
        stats["skipped.unreadable_file"] = len(bad)
        log(f"quarantined {len(bad)} unreadable corpus file(s) (reader.max_bad_files={limit}): {sorted(bad)[:3]}",
            level="warning")
    return sorted(bad)


def _stats(rows) -> Counter:
    stats = Counter()
    for r in rows:
        if r["kind"] == "stats":
            stats.update(json.loads(r["stats"]))
    if rows:
        log("task seconds (summed over tasks): " + ", ".join(
            f"{k[8:]} {v:.1f}" for k, v in sorted(stats.items()) if k.startswith("seconds.")))
    return stats


def curating(cfg: TokenizeConfig, filter_names: list[str]) -> bool:
    """Whether stage 1 runs: some filter, decontamination, or dedup is configured."""
    return bool(cfg.dedup or cfg.curate.near_dedup.enabled or cfg.curate.decontaminate or filter_names)


def _spark_pack(cfg: TokenizeConfig, cstore, files, tok_json: str, tok_info: dict, spark,
                part_offset: int, decontamination, history_sets=(), curate: bool = True) -> tuple[list, Counter, dict]:
    """Stages 1 and 2 on Spark: one read task per partition; shard names follow the task index,
    never the cluster size."""
    from spark_jobs import sparkutil

    tasks = corpus.plan_tasks(files, cfg.partition_mb * 1024 * 1024)
    sc = spark.sparkContext
    log(f"spark {spark.version} master {sc.master}: {len(tasks)} read tasks, seq_len {cfg.seq_len}")
    task_df = spark.range(0, len(tasks), numPartitions=len(tasks))
    plan = sc.broadcast(tasks)
    docs, tags = None, Counter()
    try:
        todo = task_df
        if curate:
            from spark_jobs.curate import stage

            index = sc.broadcast(decontamination) if decontamination is not None else None
            fn = worker.curate_docs(cfg, cstore.uri, plan, index, part_offset)
            docs = task_df.mapInArrow(fn, worker.DOCS_DDL).persist()
            with sparkutil.progress(spark, "curate (filters, hashes, MinHash signatures)"):
                tags = stage.tag_counts(docs)
            with sparkutil.progress(spark, "dedup (exact and near)"):
                history = _history(spark, cfg, history_sets)
                todo = stage.by_task(spark, task_df, stage.edits(spark, docs, cfg, history), len(tasks)).persist()
                todo.count()
        with sparkutil.progress(spark, "tokenize"):
            fn = worker.pack(cfg, cstore.uri, tok_json, tok_info["eos_id"], tok_info["vocab_size"], plan, part_offset)
            rows = todo.mapInArrow(fn, worker.RESULT_DDL).collect()
    except Exception as exc:
        for marker, kind in (("CorpusError", CorpusError), ("StorageError", StorageError), ("LmpipeError", LmpipeError)):
            if msg := sparkutil.task_error_message(exc, marker):
                raise kind(msg) from None
        raise
    finally:
        if docs is not None:  # the edits too: a long-lived session (a test run, a notebook) keeps no cache
            docs.unpersist()
            todo.unpersist()
    return rows, tags, {"version": spark.version, "master": sc.master, "tasks": len(tasks)}


def _history(spark, cfg: TokenizeConfig, sets):
    """The signatures of every earlier run of an incremental run's lineage (``sets``: their
    folders), as rows for :func:`spark_jobs.curate.stage.edits`; None when there are none."""
    files = [(uri, o.key) for uri in sets for o in open_store(uri, cfg.storage).list("") if o.key.endswith(".parquet")]
    if sets:
        log(f"incremental dedup against {len(files)} signature files of {len(sets)} earlier run(s)")
    if not files:
        return None
    plan = spark.sparkContext.broadcast(files)
    return (spark.range(0, len(files), numPartitions=min(len(files), 64))
            .mapInArrow(worker.read_signatures(cfg.storage, plan), worker.HISTORY_DDL))


def _start_spark(cfg: TokenizeConfig):
    from spark_jobs import sparkutil

    spark = sparkutil.session(cfg.spark_master, f"lmpipe-tokenize-{cfg.run_id}", cfg.spark_conf)
    spark.conf.set("spark.sql.shuffle.partitions", str(max(2, spark.sparkContext.defaultParallelism)))
    spark.range(0, 2, numPartitions=2).mapInArrow(lambda it: it, "id long").collect()  # start Python workers
    return spark


def summary(m: dict, url: str) -> str:
    sp, inp = m["splits"], m["input"]
    tokens = sp["train"]["tokens"] + sp["validation"]["tokens"]
    skipped = ", ".join(f"{k} {v}" for k, v in inp["skipped"].items()) or "none"
    curated = ""
    if cur := m.get("curation"):
        steps = [f"{s['step']} {s['removed']:,}" for s in cur["funnel"] if s["step"] != "reader"]
        curated = f"Curation removed: {', '.join(steps) or 'nothing'}. "
    return curated + (
        f"Tokenized {inp['documents_used']:,} of {inp['documents_read']:,} documents "
        f"({inp['duplicates_removed']:,} exact duplicates removed; skipped: {skipped}) into "
        f"{tokens:,} tokens: train {sp['train']['sequences']:,} sequences in {len(sp['train']['shards'])} shards, "
        f"validation {sp['validation']['sequences']:,} sequences in {len(sp['validation']['shards'])} shards, "
        f"seq_len {m['seq_len']}, vocab {m['tokenizer']['vocab_size']}. "
        f"{m['elapsed_s']:.1f}s end to end, {tokens / max(m['elapsed_s'], 1e-9):,.0f} tokens/s, "
        f"{inp['bytes'] / 1e6 / max(m['elapsed_s'], 1e-9):.2f} MB/s. Manifest: {url}"
    )
