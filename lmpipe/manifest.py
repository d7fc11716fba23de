"""The shard set: the contract between data prep and every later stage.

A shard set is a prefix holding ``manifest.json``, ``tokenizer.json`` and Parquet shards
under ``train/`` and ``validation/``. ``manifest.json`` is written last, so its presence
means the shard set is complete; a reader refuses a prefix without one.

Shard format: a Parquet file with one column ``input_ids``, a fixed-size list of
``seq_len + 1`` unsigned ints (uint16 when the vocab fits, else uint32). Each row holds
seq_len inputs plus the shifted target.

A shard entry may carry a ``root``: the URI of the shard set that holds its file (an
incremental run references its base's shards where they live instead of copying them);
without one the file lives under the manifest's own prefix. :func:`shard_location` is where
every reader resolves an entry.

This module builds manifests (:func:`build`), merges an incremental run's into its base's
(:func:`merge`), validates, reads and writes them, and reads and writes shard files.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

import jsonschema

from lmpipe.errors import ManifestError, StorageError
from lmpipe.storage import StorageConfig, Store, open_store

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
REMOVED = "removed"  # <out>/removed/<step>/: the documents curation removed, for inspection
FORMAT_VERSION = 1
SPLITS = ("train", "validation")

_SHARD = {
    "type": "object",
    "required": ["path", "sequences", "tokens", "bytes", "sha256"],
    "properties": {
        "path": {"type": "string", "pattern": r"^(train|validation)/[^/]+\.parquet$"},
        "sequences": {"type": "integer", "minimum": 0},
        "tokens": {"type": "integer", "minimum": 0},
        "bytes": {"type": "integer", "minimum": 0},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        # The shard set holding the file, as an absolute URI: a relative one would depend on the
        # reader's working directory.
        "root": {"type": "string", "pattern": "^(s3://[^/]+|file:///|/)"},
    },
}
_SPLIT = {
    "type": "object",
    "required": ["sequences", "tokens", "shards"],
    "properties": {
        "sequences": {"type": "integer", "minimum": 0},
        "tokens": {"type": "integer", "minimum": 0},
        "shards": {"type": "array", "items": _SHARD},
    },
}
SCHEMA = {
    "type": "object",
    "required": ["format_version", "seq_len", "tokenizer", "splits", "input", "created_at", "run_id", "config"],
    "properties": {
        "format_version": {"const": FORMAT_VERSION},
        "seq_len": {"type": "integer", "minimum": 1},
        "dtype": {"enum": ["uint16", "uint32"]},
        "tokenizer": {
            "type": "object",
            "required": ["path", "sha256", "vocab_size", "eos_id"],
            "properties": {
                "path": {"type": "string"},
                "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                "vocab_size": {"type": "integer", "minimum": 1},
                "eos_id": {"type": "integer", "minimum": 0},
            },
        },
        "splits": {"type": "object", "required": list(SPLITS), "properties": {s: _SPLIT for s in SPLITS}},
        "input": {
            "type": "object",
            "required": ["uri", "documents_read", "documents_used", "duplicates_removed", "skipped"],
            "properties": {
                "skipped": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
                "unreadable_files": {"type": "array", "items": {"type": "string"}},
            },
        },
        "curation": {
            "type": "object",
            "required": ["documents_in", "funnel", "documents_out"],
            "properties": {
                "documents_in": {"type": "integer", "minimum": 0},
                "documents_out": {"type": "integer", "minimum": 0},
                "funnel": {"type": "array", "items": {
                    "type": "object", "required": ["step", "removed", "reasons"],
                    "properties": {"step": {"type": "string"}, "removed": {"type": "integer", "minimum": 0},
                                   "reasons": {"type": "object", "additionalProperties": {"type": "integer"}}}}},
                "languages": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
                "scrubbed": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
            },
        },
        "created_at": {"type": "string"},
        "run_id": {"type": "string"},
        "config": {"type": "object"},
        "config_file": {"type": "string"},
    },
}


def validate(manifest: Any, where: str = MANIFEST) -> dict[str, Any]:
    """Raise ManifestError naming the first schema violation."""
    try:
        jsonschema.validate(manifest, SCHEMA)
    except jsonschema.ValidationError as exc:
        path = ".".join(str(p) for p in exc.absolute_path) or "<root>"
        raise ManifestError(f"{where} is invalid at {path}: {exc.message}") from None
    return manifest


def read(store: Store) -> dict[str, Any]:
    """The validated manifest under ``store``; a prefix without one is refused."""
    where = store.url(MANIFEST)
    try:
        raw = store.get_bytes(MANIFEST)
    except StorageError as exc:
        if "no object" in str(exc):
            raise ManifestError(
                f"no {MANIFEST} under {store.uri}: not an lmpipe shard set, or its data prep did not finish"
            ) from None
        raise
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{where} is not valid JSON: {exc}") from None
    return validate(data, where)


def write(store: Store, manifest: dict[str, Any]) -> str:
    """Validate and write the manifest. Call this last: it publishes the shard set."""
    validate(manifest)
    store.put_bytes(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return store.url(MANIFEST)


# ---------------------------------------------------------------- building


SPLIT_COUNTS = ("documents", "document_tokens", "dropped_tokens", "dropped_documents")
SHARD_KEYS = ("path", "sequences", "tokens", "bytes", "sha256")


def build(*, seq_len: int, tokenizer: Mapping[str, Any], shards: list[Mapping[str, Any]], stats: Mapping[str, int],
          input: Mapping[str, Any], run_id: str, elapsed_s: float, spark: Mapping[str, Any],
          config: Mapping[str, Any], config_file: str,
          curation: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of one tokenize run.

    ``shards`` are the written shards (``split`` plus :data:`SHARD_KEYS`); ``stats`` the
    summed counters of the read tasks (``documents_read``, ``duplicates_removed``,
    ``skipped.<reason>``, ``<split>.<count>`` for :data:`SPLIT_COUNTS`); ``input`` the corpus
    listing (``uri``, ``files``, ``new_files``, ``bytes``, ``ignored_files``, ``file_list``).
    ``config_file`` names the resolved config written beside the manifest. ``curation`` names
    the curation ``steps`` in order (``reader`` first), whose removals are the ``skipped.<reason>``
    and ``removed.<step>.<reason>`` counters, plus its ``languages`` and ``scrubbed`` tags.
    """
    splits = {}
    for split in SPLITS:
        mine = sorted(({k: s[k] for k in SHARD_KEYS} for s in shards if s["split"] == split), key=lambda s: s["path"])
        splits[split] = {"sequences": sum(s["sequences"] for s in mine), "tokens": sum(s["tokens"] for s in mine),
                         "shards": mine, **{k: int(stats.get(f"{split}.{k}", 0)) for k in SPLIT_COUNTS}}
    skipped = {k.split(".", 1)[1]: int(v) for k, v in sorted(stats.items()) if k.startswith("skipped.")}
    used = sum(splits[s]["documents"] for s in SPLITS)
    exact = int(stats.get("duplicates_removed", 0)) + int(stats.get("removed.exact_dedup.duplicate", 0))
    extra = {"curation": funnel(curation, stats, used)} if curation else {}
    return {**extra,
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "dtype": "uint16" if tokenizer["vocab_size"] <= 2**16 else "uint32",
        "tokenizer": dict(tokenizer),
        "splits": splits,
        "input": {**input, "documents_read": int(stats.get("documents_read", 0)),
                  "documents_used": used, "duplicates_removed": exact, "skipped": skipped},
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "run_id": run_id,
        "elapsed_s": round(elapsed_s, 2),
        "spark": dict(spark),
        "config": dict(config),
        "config_file": config_file,
    }


def funnel(curation: Mapping[str, Any], stats: Mapping[str, int], used: int) -> dict[str, Any]:
    """The curation funnel: documents in, what each step removed by reason, documents out."""
    steps = []
    for step in curation["steps"]:
        prefix = "skipped." if step == "reader" else f"removed.{step}."
        reasons = {k[len(prefix):]: int(v) for k, v in sorted(stats.items())
                   if k.startswith(prefix) and k != "skipped.unreadable_file"}  # files, not documents
        steps.append({"step": step, "removed": sum(reasons.values()), "reasons": reasons})
    return {"documents_in": int(stats.get("documents_read", 0)), "funnel": steps, "documents_out": used,
            **{k: v for k, v in curation.items() if k != "steps"}}


def merge(base: Mapping[str, Any], new: dict[str, Any], base_uri: str) -> dict[str, Any]:
    """An incremental run's manifest covering its base's shards too: ``new`` describes only the
    files the base had not seen; the result lists every shard and counts every document. The
    base's shards are referenced where they live (:func:`referenced`), never copied."""
    out = json.loads(json.dumps(new))
    for split in SPLITS:
        b, n = base["splits"][split], out["splits"][split]
        n["shards"] = sorted(referenced(b["shards"], base_uri) + n["shards"], key=lambda s: s["path"])
        n["sequences"] = sum(s["sequences"] for s in n["shards"])
        n["tokens"] = sum(s["tokens"] for s in n["shards"])
        for k in SPLIT_COUNTS:
            n[k] = n.get(k, 0) + b.get(k, 0)
    inp, binp = out["input"], base["input"]
    inp["file_list"] = binp["file_list"] + inp["file_list"]
    inp["unreadable_files"] = binp.get("unreadable_files", []) + inp.get("unreadable_files", [])
    for k in ("documents_read", "duplicates_removed"):
        inp[k] += binp[k]
    inp["documents_used"] = sum(out["splits"][s]["documents"] for s in SPLITS)
    skipped = dict(binp["skipped"])
    for k, v in inp["skipped"].items():
        skipped[k] = skipped.get(k, 0) + v
    inp["skipped"] = dict(sorted(skipped.items()))
    if "curation" in out and "curation" in base:
        out["curation"] = _merge_curation(base["curation"], out["curation"])
    out["base"] = {"uri": base_uri, "run_id": base["run_id"]}
    return out


def _merge_curation(base: Mapping[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Funnels add up step by step (a step only one run had keeps its counts)."""
    def add(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
        return {k: a.get(k, 0) + b.get(k, 0) for k in sorted({*a, *b})}

    old = {s["step"]: s for s in base["funnel"]}
    steps = []
    for s in new["funnel"]:
        b = old.pop(s["step"], {"removed": 0, "reasons": {}})
        steps.append({"step": s["step"], "removed": s["removed"] + b["removed"], "reasons": add(b["reasons"], s["reasons"])})
    steps += old.values()
    return {**new, "funnel": steps, "documents_in": new["documents_in"] + base["documents_in"],
            "documents_out": new["documents_out"] + base["documents_out"],
            "languages": add(base.get("languages", {}), new.get("languages", {})),
            "scrubbed": add(base.get("scrubbed", {}), new.get("scrubbed", {}))}


def read_parts(m: Mapping[str, Any]) -> int:
    """One past the highest read-task number in a manifest's shard names (``part-TTTTT-NNNNN``):
    an incremental run numbers its tasks from here, so its shard names never collide."""
    return 1 + max((int(sh["path"].split("/")[1].split("-")[1]) for sp in m["splits"].values()
                    for sh in sp["shards"]), default=-1)


def referenced(entries: list[Mapping[str, Any]], base_uri: str) -> list[dict[str, Any]]:
    """A base's shard entries as another shard set lists them: each with the ``root`` of the set
    holding its file. An entry that has a root keeps it, so a chain of incremental runs points
    at the original files, never at a chain of manifests."""
    return [{**e, "root": e.get("root") or base_uri} for e in entries]


def shard_location(store: Store, entry: Mapping[str, Any], storage: StorageConfig | None = None) -> tuple[Store, str]:
    """Where a shard entry of the manifest under ``store`` lives: the store of its ``root`` (opened
    with the same storage settings), or ``store`` itself, and the file's key there."""
    root = entry.get("root")
    return (open_store(root, storage) if root else store), entry["path"]


# ---------------------------------------------------------------- shard files


def token_dtype(vocab_size: int):
    import numpy as np

    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_table(seqs):
    """A (n, seq_len + 1) array as a table with one fixed-size-list column ``input_ids``."""
    import numpy as np
    import pyarrow as pa

    _n, width = seqs.shape
    flat = pa.array(np.ascontiguousarray(seqs).reshape(-1))
    return pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(flat, width)})


def write_shard(seqs, path: str, compression: str = "zstd") -> None:
    import pyarrow.parquet as pq

    pq.write_table(
        shard_table(seqs),
        path,
        compression=None if compression == "none" else compression,
        row_group_size=1024,
        write_statistics=False,  # per-row min/max of list columns is noise
        store_schema=True,
    )


def read_shard(path):
    """The ``input_ids`` of one shard (a path or a file object) as an (n, seq_len + 1) array."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["input_ids"])
    col = table.column("input_ids").combine_chunks()
    width = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, width)
