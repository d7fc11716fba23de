"""``lmpipe compact``: one self-contained shard set from a lineage of incremental runs.

    lmpipe compact --shards URI --out URI [--overwrite] [key=value ...]

An incremental run references its base's shards where they live (their manifest entries carry
a ``root``), so a nightly lineage shares its files instead of copying them, and a shard set
stays readable only while the sets it references do. Compaction copies every shard the
manifest lists, referenced or its own, into ``--out`` (a server-side copy within one S3
endpoint, a hard link between local folders, a download and upload otherwise), checks each
copy's sha256 against the manifest, copies the set's other files, and writes
``tokenizer.json`` and then the manifest, without roots, last. The result depends on no other
shard set.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import time
from dataclasses import field

from lmpipe import config as cfglib
from lmpipe import manifest
from lmpipe.config import stage_config
from lmpipe.errors import ConfigError, LmpipeError, StorageError
from lmpipe.log import log
from lmpipe.storage import StorageConfig, Store, copy, open_store

SKIP = ("_checks/",)  # a set's check results judge that set, not its copy


@stage_config
class CompactConfig:
    shards: str = ""  # the shard set to compact (local, file:// or s3://)
    out: str = ""  # a new prefix for the self-contained copy (local, file:// or s3://)
    overwrite: bool = False  # replace a shard set already published under ``out``
    workers: int = 8  # files copied and verified at once
    log_every: int = 100  # a progress line every this many shards
    storage: StorageConfig = field(default_factory=StorageConfig)


def run(cfg: CompactConfig) -> dict:
    """Copy the shard set ``cfg.shards`` and every shard it references into ``cfg.out``; return
    what was done (``out``, ``manifest``, ``shards``, ``bytes``, ``seconds``)."""
    if not cfg.shards or not cfg.out:
        raise ConfigError("config keys 'shards' and 'out' are required (--shards URI --out URI)")
    if cfg.workers < 1 or cfg.log_every < 1:
        raise ConfigError("config keys 'workers' and 'log_every' must be >= 1")
    t0 = time.monotonic()
    src = open_store(cfg.shards, cfg.storage)
    m = manifest.read(src)  # refuses a prefix that is not a published shard set
    entries = [e for split in manifest.SPLITS for e in m["splits"][split]["shards"]]
    out = _prepare_out(cfg, src, m)
    roots = sorted({e["root"] for e in entries if "root" in e})
    log(f"compact: {len(entries)} shards of {src.uri} ({len(entries) - sum('root' in e for e in entries)} own, "
        f"the rest in {len(roots)} referenced shard set(s)) into {out.uri}")
    total = _copy_shards(cfg, src, out, entries)
    tok = m["tokenizer"]["path"]
    others = [o.key for o in src.list() if not _is_set_file(o.key, tok)]
    for key in others:  # the resolved config, and whatever else the run kept beside its shards
        copy(src, key, out)
    _copy_verified(src, tok, out, m["tokenizer"]["sha256"], f"tokenizer {src.url(tok)},")
    compacted = json.loads(json.dumps(m))
    for e in (e for split in manifest.SPLITS for e in compacted["splits"][split]["shards"]):
        e.pop("root", None)
    if compacted.get("curation", {}).get("signatures"):
        compacted["curation"]["signatures"] = _copy_signatures(cfg, m["curation"]["signatures"][1:], out)
    url = manifest.write(out, compacted)  # last: this publishes the compacted set
    secs = time.monotonic() - t0
    log(f"compacted {len(entries)} shards ({total / 1e6:.1f} MB) and {len(others) + 1} other files of {src.uri} "
        f"into {out.uri} in {secs:.1f}s; every copy matches its sha256. Manifest: {url}")
    return {"out": out.uri, "manifest": url, "shards": len(entries), "bytes": total, "seconds": round(secs, 2)}


def _copy_signatures(cfg: CompactConfig, earlier: list[str], out: Store) -> list[str]:
    """The dedup signatures of the earlier runs the set references, copied beside its own (file
    names never collide: read-task numbers continue along a lineage): later incremental runs
    then dedup against the compacted set alone."""
    n = 0
    for uri in earlier:
        store = open_store(uri, cfg.storage)
        for o in store.list(""):
            copy(store, o.key, out, f"signatures/{o.key}")
            n += 1
    if earlier:
        log(f"compact: {n} signature files of {len(earlier)} earlier run(s) copied")
    return [f"{out.uri.rstrip('/')}/signatures"]


def _is_set_file(key: str, tokenizer: str) -> bool:
    """Whether ``key`` is copied by its own step (shards, tokenizer, manifest) or not at all."""
    return (key in (manifest.MANIFEST, tokenizer) or key.startswith(SKIP)
            or key.split("/", 1)[0] in manifest.SPLITS)


def _prepare_out(cfg: CompactConfig, src: Store, m: dict) -> Store:
    """The output store, refused when it would overlap what is read; a published set there is
    replaced only with ``overwrite`` (its manifest removed first, so no reader sees it half
    replaced), and stale shards of an interrupted compaction are removed."""
    out = open_store(cfg.out, cfg.storage)
    roots = {open_store(e["root"], cfg.storage).uri for sp in m["splits"].values() for e in sp["shards"] if "root" in e}
    if out.uri == src.uri or out.uri.startswith(src.uri.rstrip("/") + "/") or out.uri in roots:
        raise ConfigError(f"config key 'out': {cfg.out} is {cfg.shards}, lies inside it, or holds shards it "
                          "references: compact into a new prefix")
    if out.exists(manifest.MANIFEST):
        if not cfg.overwrite:
            raise LmpipeError(f"{out.url(manifest.MANIFEST)} already exists: {cfg.out} holds a published shard "
                              "set. Compact into a new prefix, or pass --overwrite to replace it")
        out.delete_prefix(manifest.MANIFEST)
        log(f"overwrite: removed the old manifest under {cfg.out}")
    for prefix in manifest.SPLITS:
        if n := out.delete_prefix(prefix):
            log(f"removed {n} stale files under {out.url(prefix)}")
    return out


def _copy_shards(cfg: CompactConfig, src: Store, out: Store, entries: list[dict]) -> int:
    """Copy and verify every shard, ``cfg.workers`` at once; return the bytes copied."""
    def one(entry: dict) -> int:
        store, key = manifest.shard_location(src, entry, cfg.storage)
        _copy_verified(store, key, out, entry["sha256"], f"shard {store.url(key)}, listed in "
                       f"{src.url(manifest.MANIFEST)},")
        return entry["bytes"]

    done = total = 0
    with concurrent.futures.ThreadPoolExecutor(cfg.workers) as pool:
        for size in pool.map(one, entries):
            done, total = done + 1, total + size
            if done % cfg.log_every == 0 or done == len(entries):
                log(f"compact: {done}/{len(entries)} shards copied and verified ({total / 1e6:.1f} MB)")
    return total


def _copy_verified(store: Store, key: str, out: Store, sha256: str, what: str) -> None:
    """Copy ``key`` to the same key under ``out`` and check the copy against ``sha256``."""
    try:
        copy(store, key, out)
        actual = out.sha256(key)
    except StorageError as exc:
        raise StorageError(f"{what} cannot be copied: {exc}") from None
    if actual != sha256:
        raise LmpipeError(f"{what} copied to {out.url(key)}, has sha256 {actual}, the manifest says {sha256}: "
                          "the file changed after it was published")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", help="the shard set to compact: local, file:// or s3:// (shards; required)")
    p.add_argument("--out", help="a new prefix for the self-contained copy: local, file:// or s3:// (out; required)")
    p.add_argument("--overwrite", action="store_true", help="replace a shard set already published under --out")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="workers=N (files copied at once, 8), log_every=N (a progress line every N shards, 100), "
                        "storage.* (e.g. storage.endpoint_url=http://minio:9000)")


def config_from_args(args: argparse.Namespace) -> CompactConfig:
    flags = {"shards": args.shards, "out": args.out, "overwrite": True if args.overwrite else None}
    return cfglib.from_cli(CompactConfig, None, args.overrides, flags, "compact")
