import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from collections import Counter

from conftest import HOSTILE_READER, write_hostile_corpus, write_jsonl
from spark_jobs import corpus
from spark_jobs.corpus import CorpusConfig
from lmpipe.errors import CorpusError
from lmpipe.storage import open_store

DOCS = [{"id": f"d{i}", "text": f"document number {i} " * (i + 1)} for i in range(5)]


def _all(uri, cfg=CorpusConfig(), storage=None):
    store, files, ignored = corpus.resolve(str(uri), storage)
    return [r for f in files for r in corpus.read_file(store, f.key, cfg)], ignored


def _expected():
    return [(d["id"], d["text"]) for d in DOCS]


def test_jsonl_plain_gzip_zstd(tmp_path):
    lines = "".join(json.dumps(d) + "\n" for d in DOCS).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (tmp_path / "README.md").write_text("not a corpus file")
    records, ignored = _all(tmp_path)
    assert [(r.doc_id, r.text) for r in records] == _expected() * 3
    assert ignored == ["README.md"]
    records, _ = _all(tmp_path / "b.jsonl.gz")  # a single file works too
    assert [(r.doc_id, r.text) for r in records] == _expected()


def test_txt_and_parquet_with_configurable_fields(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "one.txt").write_text("first doc")
    (tmp_path / "t" / "two.txt.gz").write_bytes(gzip.compress(b"second doc"))
    records, _ = _all(tmp_path / "t")
    assert [(r.doc_id, r.text) for r in records] == [("one.txt", "first doc"), ("two.txt.gz", "second doc")]
    pq.write_table(pa.table({"body": ["p1", None, "p3"], "key": ["k1", "k2", "k3"]}), tmp_path / "x.parquet")
    records, _ = _all(tmp_path / "x.parquet", CorpusConfig(text_field="body", id_field="key"))
    assert [(r.doc_id, r.text, r.reason) for r in records] == [("k1", "p1", None), ("k2", None, "null_text"), ("k3", "p3", None)]
    with pytest.raises(CorpusError, match="no column 'text'"):
        _all(tmp_path / "x.parquet")


def test_jsonl_with_custom_field_names(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"uid": 7, "body": "hi"}])
    records, _ = _all(tmp_path, CorpusConfig(text_field="body", id_field="uid"))
    assert [(r.doc_id, r.text) for r in records] == [("7", "hi")]


def test_bad_records_are_tagged_never_raised(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b"\n".join([
        json.dumps({"id": "ok", "text": "fine"}).encode(),
        b'{"id": "u", "text": "\xff\xfe broken"}',
        b"{not json",
        b"[1, 2]",
        json.dumps({"id": "n", "text": None}).encode(),
        json.dumps({"id": "e", "text": "   "}).encode(),
        json.dumps({"id": "i", "text": 42}).encode(),
        json.dumps({"id": "m"}).encode(),
    ]) + b"\n")
    records, _ = _all(p)
    assert [r.reason for r in records] == [None, "invalid_utf8", "unparseable_json", "not_an_object", "null_text",
                                          "empty_text", "text_not_string", "null_text"]


@pytest.mark.parametrize("policy,expected", [
    ("split", [("d#0", "abcd"), ("d#1", "efgh"), ("d#2", "ij")]),
    ("cap", [("d", "abcd")]),
    ("skip", [("d", None)]),
])
def test_long_documents(tmp_path, policy, expected):
    write_jsonl(tmp_path / "l.jsonl", [{"id": "d", "text": "abcdefghij"}])
    records, _ = _all(tmp_path, CorpusConfig(max_doc_chars=4, long_doc_policy=policy))
    assert [(r.doc_id, r.text) for r in records] == expected


def test_byte_range_tasks_cover_every_record_once(tmp_path):
    docs = [{"id": f"d{i}", "text": "x" * (i % 37 + 1)} for i in range(3000)]
    write_jsonl(tmp_path / "big.jsonl", docs)
    write_jsonl(tmp_path / "small.jsonl", docs[:3])
    store, files, _ = corpus.resolve(str(tmp_path))
    tasks = corpus.plan_tasks(files, 4096)
    assert len(tasks) > 10
    got = [r.doc_id for t in tasks for key, s, e in t for r in corpus.read_file(store, key, CorpusConfig(), s, e)]
    assert got == [d["id"] for d in docs] + ["d0", "d1", "d2"]


def test_missing_corrupt_and_empty_corpora(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        corpus.resolve(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("x")
    with pytest.raises(CorpusError, match="no corpus files"):
        corpus.resolve(str(tmp_path / "empty"))
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 1000)[:-20])
    with pytest.raises(CorpusError, match=r"bad\.jsonl\.gz cannot be read"):
        _all(tmp_path / "bad.jsonl.gz")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(CorpusError, match=r"bad\.parquet cannot be read"):
        _all(tmp_path / "bad.parquet")


def test_corpus_on_s3(tmp_path, bucket, storage_cfg):
    store = open_store(f"s3://{bucket}/corpus", storage_cfg)
    store.put_bytes("a.jsonl.gz", gzip.compress("".join(json.dumps(d) + "\n" for d in DOCS).encode()))
    pq.write_table(pa.table({"text": ["pq"]}), tmp_path / "p.parquet")
    store.put_file("sub/p.parquet", tmp_path / "p.parquet")
    records, _ = _all(f"s3://{bucket}/corpus", storage=storage_cfg)
    assert [r.text for r in records] == [d["text"] for d in DOCS] + ["pq"]
    with pytest.raises(CorpusError, match="does not exist"):
        corpus.resolve(f"s3://{bucket}/nothing-here", storage_cfg)


def test_split_is_deterministic_and_near_the_fraction():
    ids = [f"doc-{i}" for i in range(20000)]
    a = [corpus.split_of(i, 0.1) for i in ids]
    assert a == [corpus.split_of(i, 0.1) for i in ids]
    assert 0.09 < a.count("validation") / len(a) < 0.11


def test_hostile_records_are_counted_under_named_reasons_and_never_raise(tmp_path):
    expected = write_hostile_corpus(tmp_path / "c")
    store, files, _ = corpus.resolve(str(tmp_path / "c"))
    cfg = CorpusConfig(**HOSTILE_READER)
    records = list(corpus.read_segments(store, [(f.key, 0, -1) for f in files], cfg))
    assert Counter(r.reason for r in records if r.reason) == expected["skipped"]
    assert sum(r.reason is None for r in records) == expected["used"]
    assert all(r.text.encode("utf-8") for r in records if r.text is not None)  # every usable text is valid UTF-8
    bom = next(r for r in records if r.doc_id == "bom")
    assert not bom.text.startswith("\ufeff")
    (bad,) = [r for r in records if r.reason == "unreadable_file"]
    assert bad.doc_id == "c-broken.jsonl.gz" and "cannot be read" in bad.error


def test_an_over_long_line_is_skipped_and_byte_ranges_still_cover_every_record_once(tmp_path):
    docs = [json.dumps({"id": f"d{i}", "text": "y" * 50}).encode() for i in range(2000)]
    long_line = json.dumps({"id": "huge", "text": "x" * (5 << 20)}).encode()
    (tmp_path / "f.jsonl").write_bytes(b"\n".join(docs[:1000] + [long_line] + docs[1000:]) + b"\n")
    store, files, _ = corpus.resolve(str(tmp_path))
    cfg = CorpusConfig(max_line_mb=1)
    for task_bytes in (len(long_line) * 10, 1 << 20, 300_000):  # the long line whole, cut in 6, and in 18
        got = [r for t in corpus.plan_tasks(files, task_bytes) for r in corpus.read_segments(store, t, cfg)]
        assert [r.doc_id for r in got if r.reason is None] == [f"d{i}" for i in range(2000)], task_bytes
        assert [r.reason for r in got if r.reason] == ["line_too_long"], task_bytes
