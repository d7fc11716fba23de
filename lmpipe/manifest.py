"""The shard-set manifest: the contract between data prep and every later stage.

``manifest.json`` is written last, so its presence means the shard set is complete.
A reader refuses a prefix without one.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from lmpipe.errors import ManifestError, StorageError
from lmpipe.storage import Store

MANIFEST = "manifest.json"
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
            },
        },
        "created_at": {"type": "string"},
        "run_id": {"type": "string"},
        "config": {"type": "object"},
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
