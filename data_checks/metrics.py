"""Measure what the data checks judge: small tables of facts, streamed from the data.

Neither the corpus nor the shards are ever loaded whole. The corpus is streamed file by
file into one row per file; each shard is streamed (checksum, then Parquet batches) into
one row per shard, several shards at a time. Great Expectations then validates these
tables (``data_checks.suites``), so every failed expectation can name the offending file
or shard and its values. A file that cannot be read becomes a failed row, never a crash.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from lmpipe import manifest
from lmpipe.errors import CorpusError, LmpipeError, ManifestError, StorageError
from lmpipe.log import log
from spark_jobs import corpus

CHUNK = 4 * 1024 * 1024


# ---------------------------------------------------------------- corpus


COUNTS = ("documents", "usable", "skipped", "null_text", "out_of_bounds", "duplicates")


def corpus_tables(uri: str, cfg) -> tuple[dict[str, pd.DataFrame], bool]:
    """``files`` (one row per corpus file) and ``dataset`` (one row of totals), and whether
    ``uri`` named a single file (results then go beside it)."""
    store, files, _ignored = corpus.resolve(uri, cfg.storage)
    single = len(files) == 1 and store.url(files[0].key).rstrip("/") == uri.rstrip("/")
    seen: set[bytes] = set()
    rows = []
    for i, obj in enumerate(files, 1):
        c = Counter()
        row = {"file": obj.key, "readable": True, "error": None}
        try:
            for rec in corpus.read_file(store, obj.key, cfg.reader):
                c["documents"] += 1
                if rec.reason is not None:
                    c["skipped"] += 1
                    c["null_text"] += rec.reason == "null_text"
                    continue
                c["usable"] += 1
                n = len(rec.text)
                c["out_of_bounds"] += not cfg.min_doc_chars <= n <= cfg.max_doc_chars
                h = corpus.text_hash(rec.text)
                if h in seen:
                    c["duplicates"] += 1
                seen.add(h)
        except CorpusError as exc:
            row.update(readable=False, error=str(exc))
        row.update({k: c[k] for k in COUNTS})
        row.update(_fractions(c))
        rows.append(row)
        if i % 100 == 0:
            log(f"check-data: read {i}/{len(files)} corpus files")
    files_df = pd.DataFrame(rows)
    total = Counter({k: sum(r[k] for r in rows) for k in COUNTS})
    dataset = {"corpus": uri, "files": len(rows), "unreadable_files": sum(not r["readable"] for r in rows),
               **{k: total[k] for k in COUNTS if k != "usable"}, "usable_documents": total["usable"],
               **_fractions(total)}
    return {"dataset": pd.DataFrame([dataset]), "files": files_df}, single


def empty_corpus_tables(uri: str, error: str) -> dict[str, pd.DataFrame]:
    """The tables for a corpus that is missing or has no corpus file: every check can still run."""
    dataset = {"corpus": uri, "files": 0, "unreadable_files": 0, "documents": 0, "usable_documents": 0,
               "error": error, **_fractions(Counter())}
    files = pd.DataFrame(columns=["file", "readable", "error", "documents", "usable", "skipped", "null_text",
                                  "out_of_bounds", "duplicates", "skipped_fraction", "null_text_fraction",
                                  "out_of_bounds_fraction", "duplicate_rate"])
    return {"dataset": pd.DataFrame([dataset]), "files": files}


def _fractions(c: Counter) -> dict[str, float]:
    docs, usable = max(c["documents"], 1), max(c["usable"], 1)
    return {
        "skipped_fraction": c["skipped"] / docs,
        "null_text_fraction": c["null_text"] / docs,
        "out_of_bounds_fraction": c["out_of_bounds"] / usable,
        "duplicate_rate": c["duplicates"] / usable,
    }


# ---------------------------------------------------------------- shards


def shard_tables(store, cfg) -> dict[str, pd.DataFrame]:
    """``dataset`` (manifest and tokenizer facts), ``splits`` and ``shards`` tables."""
    ds = {"shards_uri": store.uri, "manifest_exists": store.exists(manifest.MANIFEST), "manifest_valid": False,
          "manifest_error": None, "tokenizer_sha256_matches": False, "tokenizer_error": None,
          "validation_sequences": 0, "vocab_size": None, "seq_len": None}
    m = None
    if not ds["manifest_exists"]:
        ds["manifest_error"] = f"no {manifest.MANIFEST} under {store.uri}"
    else:
        try:
            m = manifest.read(store)
            ds["manifest_valid"] = True
        except ManifestError as exc:
            ds["manifest_error"] = str(exc)
    listed = {}
    if m:
        for split in manifest.SPLITS:
            for entry in m["splits"][split]["shards"]:
                listed[entry["path"]] = (split, entry)
        ds["validation_sequences"] = m["splits"]["validation"]["sequences"]
        ds["vocab_size"], ds["seq_len"] = m["tokenizer"]["vocab_size"], m["seq_len"]
        ds.update(_tokenizer_facts(store, m))
    on_storage = {o.key: o.size for split in manifest.SPLITS for o in store.list(split) if o.key.endswith(".parquet")}
    jobs = [(p, *listed.get(p, (p.split("/", 1)[0], None))) for p in sorted(set(listed) | set(on_storage))]
    geometry = (m["seq_len"] + 1, m["tokenizer"]["vocab_size"], m["tokenizer"]["eos_id"]) if m else None
    with concurrent.futures.ThreadPoolExecutor(max(1, cfg.workers)) as pool:
        rows = list(pool.map(lambda j: _shard_row(store, j[0], j[1], j[2], on_storage, geometry, cfg.storage), jobs))
    shards = pd.DataFrame(rows, columns=SHARD_COLUMNS)
    splits = pd.DataFrame([_split_row(split, m, shards, cfg) for split in manifest.SPLITS])
    funnel, facts = curation_facts(m, cfg)
    ds.update(facts)
    return {"dataset": pd.DataFrame([ds]), "splits": splits, "shards": shards, "curation": funnel}


CURATION_COLUMNS = ["step", "documents_before", "removed", "removed_fraction", "max_removed_fraction", "reasons"]


def curation_facts(m: dict | None, cfg) -> tuple[pd.DataFrame, dict]:
    """The manifest's curation funnel, one row per step with the share of the documents reaching
    it that it removed and its bound, plus the contamination count and the kept-language share."""
    cur = (m or {}).get("curation")
    facts = {"contaminated_documents": 0, "kept_language_share": 1.0, "documents_in": None, "documents_out": None}
    if not cur:
        return pd.DataFrame(columns=CURATION_COLUMNS), facts
    bounds = {"reader": cfg.max_skipped_fraction, "exact_dedup": cfg.max_duplicate_rate,
              "decontaminate": 1.0, **cfg.max_removed_fraction_by_step}
    rows, before = [], cur["documents_in"]
    for s in cur["funnel"]:
        rows.append({"step": s["step"], "documents_before": before, "removed": s["removed"],
                     "removed_fraction": s["removed"] / before if before else 0.0,
                     "max_removed_fraction": bounds.get(s["step"], cfg.max_removed_fraction),
                     "reasons": json.dumps(s["reasons"], sort_keys=True)})
        before -= s["removed"]
    langs, kept = cur.get("languages") or {}, set(cur.get("kept_languages") or [])
    facts.update(documents_in=cur["documents_in"], documents_out=cur["documents_out"],
                 contaminated_documents=sum(s["removed"] for s in cur["funnel"] if s["step"] == "decontaminate"))
    if langs:
        facts["kept_language_share"] = sum(n for lang, n in langs.items() if lang in kept) / sum(langs.values())
    return pd.DataFrame(rows, columns=CURATION_COLUMNS), facts


SHARD_COLUMNS = [
    "path", "split", "listed_in_manifest", "exists", "bytes", "bytes_expected", "bytes_match", "sha256",
    "sha256_expected", "sha256_matches", "readable", "error", "sequences", "sequences_expected", "sequences_match",
    "tokens", "tokens_expected", "tokens_match", "row_length", "bad_length_rows", "min_token_id", "max_token_id",
    "eos_count", "url",
]


def _tokenizer_facts(store, m) -> dict:
    path = m["tokenizer"]["path"]
    try:
        actual = store.sha256(path)
    except (StorageError, LmpipeError) as exc:
        return {"tokenizer_sha256_matches": False, "tokenizer_error": str(exc)}
    ok = actual == m["tokenizer"]["sha256"]
    return {"tokenizer_sha256_matches": ok,
            "tokenizer_error": None if ok else f"{path} has sha256 {actual}, manifest says {m['tokenizer']['sha256']}"}


def _shard_row(store, path: str, split: str, entry: dict | None, own: dict[str, int], geometry, storage) -> dict:
    """One shard's facts, read where it lives: under ``store``, or in the shard set its manifest
    entry references (``root``). ``own`` holds the sizes of the files under ``store``."""
    row = dict.fromkeys(SHARD_COLUMNS)
    row.update(path=path, split=split, listed_in_manifest=entry is not None, exists=False, readable=False,
               bad_length_rows=0, eos_count=0)
    if entry:
        row.update(bytes_expected=entry["bytes"], sha256_expected=entry["sha256"],
                   sequences_expected=entry["sequences"], tokens_expected=entry["tokens"])
    tmp = None
    try:
        src, key = manifest.shard_location(store, entry, storage) if entry else (store, path)
        row["url"] = src.url(key)
        size = own.get(path) if src is store else next((o.size for o in src.list(key) if o.key == key), None)
        row.update(exists=size is not None, bytes=size)
        if size is None:
            row["error"] = f"{row['url']} is listed in the manifest but does not exist"
            return _compare(row)
        local = getattr(src, "root", None)
        h = hashlib.sha256()
        if local is not None:
            local_path = src.path(key)
            with open(local_path, "rb") as f:
                while block := f.read(CHUNK):
                    h.update(block)
        else:  # one pass over the network: hash while spooling to a temp file for Parquet
            fd, tmp = tempfile.mkstemp(suffix=".parquet")
            with os.fdopen(fd, "wb") as out, src.open(key) as body:
                while block := body.read(CHUNK):
                    h.update(block)
                    out.write(block)
            local_path = tmp
        row["sha256"] = h.hexdigest()
        _read_parquet(local_path, row, geometry)
    except (StorageError, OSError) as exc:
        row["error"] = f"{row['url'] or path}: {exc}"
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
    return _compare(row)


def _read_parquet(local_path, row: dict, geometry) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = row["url"] or row["path"]
    try:
        pf = pq.ParquetFile(local_path)
        if "input_ids" not in pf.schema_arrow.names:
            raise ValueError(f"no column 'input_ids' (columns: {pf.schema_arrow.names})")
        typ = pf.schema_arrow.field("input_ids").type
        if not (pa.types.is_fixed_size_list(typ) or pa.types.is_list(typ) or pa.types.is_large_list(typ)) \
                or not pa.types.is_integer(typ.value_type):
            raise ValueError(f"column 'input_ids' has type {typ}, expected fixed_size_list<uint16 or uint32>")
        width = geometry[0] if geometry else None
        eos_id = geometry[2] if geometry else -1
        n = tokens = 0
        lo, hi, eos = None, None, 0
        for batch in pf.iter_batches(columns=["input_ids"], batch_size=8192):
            col = batch.column(0)
            n += len(col)
            lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
            if len(lengths):
                row["row_length"] = int(lengths[0]) if row["row_length"] is None else row["row_length"]
            if width is not None:
                row["bad_length_rows"] += int(np.count_nonzero(lengths != width))
            values = pc.list_flatten(col).to_numpy(zero_copy_only=False)
            tokens += len(values)
            if len(values):
                bmin, bmax = int(values.min()), int(values.max())
                lo = bmin if lo is None else min(lo, bmin)
                hi = bmax if hi is None else max(hi, bmax)
                eos += int(np.count_nonzero(values == eos_id))
        row.update(readable=True, sequences=n, tokens=tokens, min_token_id=lo, max_token_id=hi, eos_count=eos)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError/... on corrupt files: report, never crash
        row.update(readable=False, error=f"{path} cannot be read as a shard: {type(exc).__name__}: {exc}")


def _compare(row: dict) -> dict:
    if row["bytes_expected"] is None:  # not in the manifest: only "listed_in_manifest" judges it
        return row
    row["bytes_match"] = row["bytes"] == row["bytes_expected"]
    row["sha256_matches"] = row["sha256"] == row["sha256_expected"]
    row["sequences_match"] = row["sequences"] == row["sequences_expected"]
    row["tokens_match"] = row["tokens"] == row["tokens_expected"]
    if row["error"] is None and not (row["bytes_match"] and row["sha256_matches"]):
        row["error"] = (f"{row['url']} has {row['bytes']} bytes, sha256 {row['sha256']}; the manifest says "
                        f"{row['bytes_expected']} bytes, sha256 {row['sha256_expected']}")
    return row


def _split_row(split: str, m: dict | None, shards: pd.DataFrame, cfg) -> dict:
    mine = shards[(shards["split"] == split) & shards["listed_in_manifest"].astype(bool)]
    seqs = int(mine["sequences"].fillna(0).sum())
    toks = int(mine["tokens"].fillna(0).sum())
    eos = int(mine["eos_count"].fillna(0).sum())
    row = {"split": split, "sequences_in_shards": seqs, "tokens_in_shards": toks, "eos_count": eos,
           "sequences_manifest": None, "tokens_manifest": None, "shards_sum_sequences_manifest": None,
           "eos_per_sequence": eos / seqs if seqs else None, "eos_rate_expected": None, "eos_rate_min": None,
           "eos_rate_max": None}
    if m:
        s = m["splits"][split]
        row.update(sequences_manifest=s["sequences"], tokens_manifest=s["tokens"],
                   shards_sum_sequences_manifest=sum(e["sequences"] for e in s["shards"]),
                   shards_sum_tokens_manifest=sum(e["tokens"] for e in s["shards"]))
        if s["sequences"] and "documents" in s:
            # Every document packed ends in exactly one EOS (EOS text inside a document is
            # encoded as plain text), except those whose EOS fell in a dropped tail.
            expected = (s["documents"] - s.get("dropped_documents", 0)) / s["sequences"]
            row["eos_rate_expected"] = expected
            row["eos_rate_min"] = expected * (1 - cfg.eos_rate_tolerance)
            row["eos_rate_max"] = expected * (1 + cfg.eos_rate_tolerance)
    return row


def to_json(tables: dict[str, pd.DataFrame]) -> dict:
    return {name: json.loads(df.to_json(orient="records")) for name, df in tables.items()}
