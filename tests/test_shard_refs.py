"""Incremental runs reference their base's shards where they live, every reader follows the
references, and ``lmpipe compact`` makes a lineage self-contained again. Expected values come
from the files themselves, read with ``json``, ``pyarrow`` and ``hashlib``, never with the code
under test."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from data_checks import check_data
from lmpipe import config
from lmpipe.cli import main as lmpipe_main
from lmpipe.errors import ConfigError, LmpipeError, StorageError
from test_tokenize_shard import run
from training.data import ShardSet

SPLITS = ("train", "validation")
SETTINGS = {"shard_sequences": 300, "validation_fraction": 0.25}


def days(demo_corpus_dir: Path) -> list[list[str]]:
    lines = next(Path(demo_corpus_dir).glob("*.jsonl")).read_text().splitlines()
    return [lines[:30], lines[30:50], lines[50:70]]


def manifest_json(shards: Path) -> dict:
    return json.loads((shards / "manifest.json").read_text())


def file_of(shards: Path, entry: dict) -> Path:
    return Path(entry.get("root", str(shards))) / entry["path"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows_of(files: list[Path]) -> np.ndarray:
    return np.concatenate([np.array(pq.read_table(f).column("input_ids").to_pylist(), dtype=np.int64) for f in files])


def compact(*args: str) -> int:
    return lmpipe_main(["compact", *args])


def parquet_files(folder: Path) -> set[str]:
    """The shard files under a set's own train/ and validation/ (signatures/ holds Parquet too)."""
    return {str(Path(d, f).relative_to(folder)) for d, _, fs in os.walk(folder) for f in fs
            if f.endswith(".parquet") and Path(d, f).relative_to(folder).parts[0] in ("train", "validation")}


@pytest.fixture(scope="module")
def lineage(tmp_path_factory, demo_corpus_dir):
    """Three nightly runs of one local corpus, each on top of the one before."""
    root = tmp_path_factory.mktemp("lineage").resolve()  # roots are resolved paths
    corpus, runs = root / "corpus", root / "runs"
    for i, day in enumerate(days(demo_corpus_dir)):
        write_jsonl(corpus / f"date=2026-11-2{i}" / "part-0.jsonl", day)
        run(corpus, runs / str(i), base=str(runs / str(i - 1)) if i else None, **SETTINGS)
    return {"corpus": corpus, "runs": [runs / str(i) for i in range(3)]}


@pytest.mark.slow
def test_an_incremental_run_references_its_base_and_copies_no_shard(lineage):
    first, second = lineage["runs"][:2]
    base, m = manifest_json(first), manifest_json(second)
    base_paths = {e["path"] for sp in SPLITS for e in base["splits"][sp]["shards"]}
    assert not parquet_files(second) & base_paths, "a shard of the base was copied"
    for split in SPLITS:
        entries = m["splits"][split]["shards"]
        referenced = [e for e in entries if e["path"] in base_paths]
        assert len(referenced) == len(base["splits"][split]["shards"]) and referenced
        assert all(e["root"] == str(first) for e in referenced)
        own = [e for e in entries if e["path"] not in base_paths]
        assert own and all("root" not in e for e in own)
        assert {e["path"] for e in own} <= parquet_files(second)
        assert all(sha(file_of(second, e)) == e["sha256"] for e in entries)


@pytest.mark.slow
def test_a_chain_references_the_original_files_not_the_intermediate_set(lineage):
    first, second, third = lineage["runs"]
    by_root = {}
    for sp in SPLITS:
        for e in manifest_json(third)["splits"][sp]["shards"]:
            by_root.setdefault(e.get("root"), set()).add(e["path"])
    own = {p for p in parquet_files(first)}
    assert by_root[str(first)] == own  # the first run's files, at the first run
    assert by_root[str(second)] == parquet_files(second)  # only the second run's own files
    assert by_root[None] == parquet_files(third)


@pytest.mark.slow
def test_the_training_reader_follows_references(lineage, tmp_path):
    third = lineage["runs"][2]
    m = manifest_json(third)
    for split in SPLITS:
        data = ShardSet(str(third), tmp_path / "cache", split=split)
        expected = rows_of([file_of(third, e) for e in m["splits"][split]["shards"]])
        assert len(data) == len(expected) == m["splits"][split]["sequences"]
        assert np.array_equal(data.rows(np.arange(len(data))), expected)


@pytest.mark.slow
def test_an_incremental_run_never_writes_over_shards_its_base_references(lineage):
    first, second, _ = lineage["runs"]
    for out in (second, first):  # the base itself, or a set whose files the base lists
        before = (out / "manifest.json").read_bytes()
        with pytest.raises(ConfigError, match=re.escape(f"{out} holds shards that base {second} references")):
            run(lineage["corpus"], out, base=str(second), overwrite=True, **SETTINGS)
        assert (out / "manifest.json").read_bytes() == before and parquet_files(out)


def flipped(path: Path) -> bytes:
    """Flip one byte in the middle of ``path``; return the original bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:])
    return data


@pytest.mark.slow
def test_a_changed_or_missing_referenced_shard_is_refused_naming_its_url(lineage, tmp_path, capsys):
    first, second, third = lineage["runs"]
    entry = next(e for e in manifest_json(third)["splits"]["train"]["shards"] if e.get("root") == str(first))
    target = file_of(third, entry)
    original = flipped(target)
    try:
        with pytest.raises(LmpipeError, match=re.escape(f"shard {target} has sha256")):
            ShardSet(str(third), tmp_path / "a")
        with pytest.raises(LmpipeError, match=re.escape(f"{target} does not match its sha256")):  # a retried run
            run(lineage["corpus"], third, base=str(second), **SETTINGS)
        assert compact("--shards", str(third), "--out", str(tmp_path / "c")) == 1
        assert f"shard {target}, listed in {third}/manifest.json, copied to" in capsys.readouterr().err
        assert not (tmp_path / "c" / "manifest.json").exists()
        target.unlink()
        with pytest.raises(StorageError, match=re.escape(f"shard {target}, listed in {third}/manifest.json, "
                                                         "does not exist")):
            ShardSet(str(third), tmp_path / "b")
        assert compact("--shards", str(third), "--out", str(tmp_path / "d")) == 1
        assert f"shard {target}, listed in {third}/manifest.json, cannot be copied: no object" in capsys.readouterr().err
    finally:
        target.write_bytes(original)
    assert run(lineage["corpus"], third, base=str(second), **SETTINGS) == manifest_json(third)  # verified and kept


def failed(result) -> dict[str, list]:
    """{failed column: offending rows}."""
    return {(f["kwargs"].get("column") or f["kwargs"]["column_A"]): f["offending"] for f in result["failed"]}


def check(shards: Path) -> dict:
    return check_data.run(config.build(check_data.CheckConfig, {"shards": str(shards)}))


@pytest.mark.slow
def test_the_shard_check_reads_referenced_shards_where_they_live(lineage):
    third = lineage["runs"][2]
    result = check(third)
    assert result["success"], result["failed"]
    rows = {r["path"]: r for r in result["tables"]["shards"]}
    m = manifest_json(third)
    assert len(rows) == sum(len(m["splits"][sp]["shards"]) for sp in SPLITS)
    assert {r["url"] for r in rows.values()} == {str(file_of(third, e)) for sp in SPLITS for e in m["splits"][sp]["shards"]}

    entry = next(e for e in m["splits"]["validation"]["shards"] if e.get("root") == str(lineage["runs"][0]))
    target = file_of(third, entry)
    original = flipped(target)
    try:
        result = check(third)
        bad = failed(result)
        assert bad["sha256_matches"] == [{"sha256_matches": False, "path": entry["path"], "url": str(target),
                                          "error": bad["sha256_matches"][0]["error"]}]
        assert str(target) in bad["sha256_matches"][0]["error"]
        target.unlink()
        result = check(third)
        bad = failed(result)
        assert bad["exists"][0]["path"] == entry["path"]
        assert f"{target} is listed in the manifest but does not exist" == bad["exists"][0]["error"]
        assert "listed_in_manifest" not in bad  # the referenced set's files are not this set's own
    finally:
        target.write_bytes(original)


# ---------------------------------------------------------------- lmpipe compact


@pytest.mark.slow
def test_compact_makes_a_self_contained_set(lineage, tmp_path, capsys):
    third, out = lineage["runs"][2], tmp_path.resolve() / "compacted"
    assert compact("--shards", str(third), "--out", str(out), "log_every=2") == 0
    assert capsys.readouterr().out.strip() == str(out)
    src, m = manifest_json(third), manifest_json(out)
    assert "\"root\"" not in json.dumps(m)
    listed = {e["path"]: e for sp in SPLITS for e in src["splits"][sp]["shards"]}
    assert parquet_files(out) == set(listed)
    for path, e in listed.items():
        assert sha(out / path) == sha(file_of(third, e)) == e["sha256"]
    assert (out / "tokenizer.json").read_bytes() == (third / "tokenizer.json").read_bytes()
    assert (out / "tokenize_config.json").read_bytes() == (third / "tokenize_config.json").read_bytes()
    assert not (out / "_checks").exists()
    # The dedup signatures of the whole lineage come along: later runs dedup against this set alone.
    lineage_sigs = {p.name for r in lineage["runs"] for p in (r / "signatures").iterdir()}
    assert len(lineage_sigs) >= 3 and {p.name for p in (out / "signatures").iterdir()} == lineage_sigs
    assert m["curation"]["signatures"] == [f"{out}/signatures"]
    for split in SPLITS:
        assert m["splits"][split]["sequences"] == src["splits"][split]["sequences"]
        expected = rows_of([file_of(third, e) for e in src["splits"][split]["shards"]])
        data = ShardSet(str(out), tmp_path / "cache", split=split)
        assert np.array_equal(data.rows(np.arange(len(data))), expected)

    # a published set is never replaced without --overwrite
    before = (out / "manifest.json").read_bytes()
    assert compact("--shards", str(third), "--out", str(out)) == 1
    assert "already exists" in capsys.readouterr().err and (out / "manifest.json").read_bytes() == before
    assert compact("--shards", str(third), "--out", str(out), "--overwrite") == 0
    assert manifest_json(out)["splits"] == m["splits"]


def test_compact_refuses_bad_inputs_naming_them(tmp_path, capsys):
    tmp_path = tmp_path.resolve()
    assert compact("--shards", "ftp://host/shards", "--out", str(tmp_path / "o")) == 1
    assert "unsupported storage URI 'ftp://host/shards'" in capsys.readouterr().err
    assert compact("--shards", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")) == 1
    assert f"no manifest.json under {tmp_path / 'nothing'}" in capsys.readouterr().err
    assert compact("--out", str(tmp_path / "o")) == 2
    assert "'shards' and 'out' are required" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_compact_refuses_an_out_that_the_lineage_reads(lineage, capsys):
    first, _, third = lineage["runs"]
    for out in (third, first, third / "inside"):
        assert compact("--shards", str(third), "--out", str(out), "--overwrite") == 2
        assert "compact into a new prefix" in capsys.readouterr().err
    assert (third / "manifest.json").exists() and (first / "manifest.json").exists()
