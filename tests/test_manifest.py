"""The shard contract: manifests built, merged, validated, and shard files read back by pyarrow itself."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from lmpipe import manifest
from lmpipe.errors import ManifestError
from lmpipe.storage import open_store

TOKENIZER = {"path": "tokenizer.json", "sha256": "a" * 64, "vocab_size": 400, "eos_id": 0}


def shard(split: str, part: int, n: int, seq: int = 8) -> dict:
    return {"split": split, "path": f"{split}/part-{part:05d}-00000.parquet", "sequences": n, "tokens": n * (seq + 1),
            "bytes": 100 + n, "sha256": f"{part:x}".rjust(64, "0")}


def build(shards, stats, files, run_id="r1"):
    listing = {"uri": "/corpus", "files": len(files), "new_files": len(files), "bytes": 10 * len(files),
               "ignored_files": [], "file_list": [{"key": k, "size": 10} for k in files]}
    return manifest.build(seq_len=8, tokenizer=TOKENIZER, shards=shards, stats=stats, input=listing, run_id=run_id,
                          elapsed_s=1.234, spark={"tasks": 1}, config={"seq_len": 8}, config_file="tokenize_config.json")


def test_build_counts_what_the_tasks_report():
    m = build([shard("train", 0, 5), shard("validation", 0, 1), shard("train", 1, 3)],
              {"documents_read": 12, "duplicates_removed": 2, "skipped.null_text": 1, "train.documents": 8,
               "validation.documents": 1, "train.dropped_tokens": 4}, ["a.jsonl"])
    assert manifest.validate(m) is m
    train = m["splits"]["train"]
    assert [s["path"] for s in train["shards"]] == ["train/part-00000-00000.parquet", "train/part-00001-00000.parquet"]
    assert (train["sequences"], train["tokens"], train["documents"], train["dropped_tokens"]) == (8, 72, 8, 4)
    assert m["input"]["documents_used"] == 9 and m["input"]["skipped"] == {"null_text": 1}
    assert m["dtype"] == "uint16" and m["config_file"] == "tokenize_config.json"


def test_merge_covers_the_base_and_the_new_files():
    base = build([shard("train", 0, 5), shard("validation", 0, 1)],
                 {"documents_read": 10, "duplicates_removed": 1, "skipped.empty_text": 2, "train.documents": 6,
                  "validation.documents": 1}, ["day1.jsonl"], run_id="base")
    new = build([shard("train", 1, 2)], {"documents_read": 3, "skipped.empty_text": 1, "skipped.too_long": 1,
                                         "train.documents": 1}, ["day2.jsonl"], run_id="new")
    assert manifest.read_parts(base) == 1
    m = manifest.merge(base, new, "s3://b/runs/base/shards")
    assert manifest.validate(m) is m
    assert m["base"] == {"uri": "s3://b/runs/base/shards", "run_id": "base"} and m["run_id"] == "new"
    assert [s["path"] for s in m["splits"]["train"]["shards"]] == ["train/part-00000-00000.parquet",
                                                                   "train/part-00001-00000.parquet"]
    assert (m["splits"]["train"]["sequences"], m["splits"]["train"]["documents"]) == (7, 7)
    assert [f["key"] for f in m["input"]["file_list"]] == ["day1.jsonl", "day2.jsonl"]
    assert (m["input"]["documents_read"], m["input"]["duplicates_removed"], m["input"]["documents_used"]) == (13, 1, 8)
    assert m["input"]["skipped"] == {"empty_text": 3, "too_long": 1}
    assert new["splits"]["train"]["sequences"] == 2  # the new part is left as it was
    # the base's shards are referenced where they live; the new run's are its own
    roots = {s["path"]: s.get("root") for sp in m["splits"].values() for s in sp["shards"]}
    assert roots == {"train/part-00000-00000.parquet": "s3://b/runs/base/shards",
                     "validation/part-00000-00000.parquet": "s3://b/runs/base/shards",
                     "train/part-00001-00000.parquet": None}
    assert all("root" not in s for sp in base["splits"].values() for s in sp["shards"])  # the base is untouched


def test_a_chain_of_merges_keeps_each_shards_original_root():
    day1 = build([shard("train", 0, 5)], {"train.documents": 5}, ["d1"], run_id="d1")
    day2 = manifest.merge(day1, build([shard("train", 1, 2)], {"train.documents": 2}, ["d2"], run_id="d2"), "/runs/1")
    day3 = manifest.merge(day2, build([shard("train", 2, 3)], {"train.documents": 3}, ["d3"], run_id="d3"),
                          "s3://b/runs/2")
    assert [(s["path"][6:16], s.get("root")) for s in day3["splits"]["train"]["shards"]] == [
        ("part-00000", "/runs/1"), ("part-00001", "s3://b/runs/2"), ("part-00002", None)]
    assert manifest.validate(day3) is day3 and manifest.read_parts(day3) == 3


def test_a_shard_entry_resolves_to_the_set_that_holds_it(tmp_path):
    own = open_store(tmp_path / "own")
    store, key = manifest.shard_location(own, shard("train", 0, 1))
    assert (store, key) == (own, "train/part-00000-00000.parquet")
    store, key = manifest.shard_location(own, {**shard("train", 0, 1), "root": f"file://{tmp_path}/base"})
    assert store.url(key) == f"{tmp_path}/base/train/part-00000-00000.parquet"
    store, _ = manifest.shard_location(own, {**shard("train", 0, 1), "root": "s3://b/runs/1/shards"})
    assert store.uri == "s3://b/runs/1/shards"


@pytest.mark.parametrize("root", ["runs/1/shards", "", "ftp://host/x", "s3://"])
def test_a_root_that_is_not_an_absolute_uri_is_refused(root):
    m = build([shard("train", 0, 5)], {}, ["a.jsonl"])
    m["splits"]["train"]["shards"][0]["root"] = root
    with pytest.raises(ManifestError, match="invalid at splits.train.shards.0.root"):
        manifest.validate(m)


def test_a_broken_manifest_is_refused_naming_the_field(tmp_path):
    m = build([shard("train", 0, 5)], {}, ["a.jsonl"])
    del m["tokenizer"]["eos_id"]
    with pytest.raises(ManifestError, match="invalid at tokenizer: 'eos_id' is a required property"):
        manifest.write(open_store(tmp_path), m)
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(ManifestError, match="no manifest.json"):
        manifest.read(open_store(tmp_path))


def test_shard_files_round_trip_through_pyarrow(tmp_path):
    import numpy as np

    seqs = np.arange(3 * 9, dtype=np.uint16).reshape(3, 9)
    manifest.write_shard(seqs, str(tmp_path / "s.parquet"))
    table = pq.read_table(tmp_path / "s.parquet")  # pyarrow's own reader, not ours
    typ = table.schema.field("input_ids").type
    assert (typ.list_size, str(typ.value_type)) == (9, "uint16")
    assert table.column("input_ids").to_pylist() == seqs.tolist()
    assert np.array_equal(manifest.read_shard(tmp_path / "s.parquet"), seqs)
    assert manifest.token_dtype(65536) == np.uint16 and manifest.token_dtype(65537) == np.uint32
