"""The Spark job end to end on local[2], writing to a folder and to a moto S3 server."""

import gzip
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import HOSTILE_READER, write_hostile_corpus, write_jsonl
from lmpipe import config, manifest
from lmpipe.cli import main as lmpipe_main
from lmpipe.errors import CorpusError, LmpipeError, ManifestError
from lmpipe.manifest import read_shard
from lmpipe.storage import open_store
from spark_jobs import corpus
from spark_jobs.tokenizer import from_json
from spark_jobs import tokenize_shard
from spark_jobs.tokenize_shard import TokenizeConfig
from training.data import ShardSet


# Tokenizing and packing as such: no curation filter and no near dedup, whose word-salad
# documents the code preset would remove (tests/test_curate.py covers curation).
BASE = {"seq_len": 64, "spark_master": "local[2]", "shard_sequences": 40, "validation_fraction": 0.1,
        "tokenizer": {"vocab_size": 400, "train_sample_mb": 1},
        "curate": {"filters": "none", "near_dedup": {"enabled": False}}}


def run(corpus_uri, out, storage=None, **kw):
    data = {**BASE, "corpus": str(corpus_uri), "out": str(out), **kw}
    if storage is not None:
        data["storage"] = config.to_dict(storage)
    return tokenize_shard.run(config.build(TokenizeConfig, data))


def shard_stream(store, m, split):
    """{task: token stream} from the shards of ``split``, in manifest order."""
    streams = {}
    for s in m["splits"][split]["shards"]:
        task = int(s["path"].split("-")[1])
        with store.open(s["path"]) as f:
            seqs = read_shard(f)
        assert seqs.shape == (s["sequences"], m["seq_len"] + 1)
        streams.setdefault(task, []).append(seqs.reshape(-1))
    return {t: np.concatenate(v) for t, v in streams.items()}


WORDS = ("river", "stone", "light", "north", "copper", "garden", "signal", "window", "paper", "orbit", "ember",
         "harbor", "quiet", "vector", "maple", "thread", "échelle", "naïve", "日本", "emoji 🙂", "tab\there", "new\nline")


def s3_sha(s3, bucket: str, prefix: str, path: str) -> str:
    return hashlib.sha256(s3.get_object(Bucket=bucket, Key=f"{prefix}/{path}")["Body"].read()).hexdigest()


def s3_rows(s3, bucket: str, prefix: str, path: str) -> np.ndarray:
    table = pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=f"{prefix}/{path}")["Body"].read()))
    return np.array(table.column("input_ids").to_pylist(), dtype=np.int64)


def hand_built_corpus(root: Path) -> tuple[list[list[str]], int]:
    """Two files of about 0.6 MB (so two read tasks of partition_mb=1, in key order), the second
    repeating three texts of the first under new ids. Returns each file's unique texts, in order,
    read back with the json module, and how many duplicates were planted."""
    import random

    rng = random.Random(7)

    def text(i: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(120, 400))) + f" [{i}]"

    a = [{"id": f"a{i}", "text": text(i)} for i in range(300)]
    b = [{"id": f"b{i}", "text": text(1000 + i)} for i in range(300)]
    b[10:10] = [{"id": f"dup{i}", "text": a[i]["text"]} for i in (0, 5, 9)]
    write_jsonl(root / "a.jsonl", a)
    write_jsonl(root / "b.jsonl", b)
    files = [[json.loads(x)["text"] for x in (root / name).read_text().splitlines()] for name in ("a.jsonl", "b.jsonl")]
    seen, unique = set(), []
    for texts in files:
        unique.append([t for t in texts if not (t in seen or seen.add(t))])
    return unique, 3


@pytest.mark.slow
def test_round_trip_both_splits(tmp_path):
    """Checked against an oracle of its own: texts read back with ``json``, token ids from the
    ``tokenizers`` library, split membership found in the shards rather than predicted. Every
    document comes back exactly, in order, in one split, followed by EOS; only each split's last
    partial sequence is dropped."""
    from tokenizers import Tokenizer

    unique, dups = hand_built_corpus(tmp_path / "corpus")
    out = tmp_path / "shards"
    m = run(tmp_path / "corpus", out, partition_mb=1, validation_fraction=0.3)
    store = open_store(out)
    tok = Tokenizer.from_str(store.get_bytes("tokenizer.json").decode())
    eos = tok.token_to_id("<|endoftext|>")
    assert m["tokenizer"]["eos_id"] == eos and m["input"]["duplicates_removed"] == dups
    streams = {split: shard_stream(store, m, split) for split in ("train", "validation")}
    assert set(streams["train"]) == {0, 1} and streams["validation"], "both tasks, both splits"
    L = m["seq_len"] + 1
    for task, texts in enumerate(unique):
        complete, rest = {}, {}
        for split, by_task in streams.items():
            ids = by_task.get(task, np.array([], dtype=np.int64)).tolist()
            cuts = [i for i, t in enumerate(ids) if t == eos]
            complete[split] = [ids[a + 1 : b] for a, b in zip([-1, *cuts], cuts)]
            rest[split] = ids[cuts[-1] + 1 :] if cuts else ids
        pointer, leftover = {"train": 0, "validation": 0}, []
        for text in texts:  # each document is the next complete one of exactly one split
            ids = tok.encode(text, add_special_tokens=False).ids
            split = next((s for s in pointer if pointer[s] < len(complete[s]) and complete[s][pointer[s]] == ids), None)
            if split is None:
                leftover.append(ids)
                continue
            assert tok.decode(complete[split][pointer[split]], skip_special_tokens=False) == text
            pointer[split] += 1
        assert pointer == {s: len(c) for s, c in complete.items()}, "shards hold a document the corpus does not"
        assert sum(len(c) for c in complete.values()) > 0.9 * len(texts)
        tails = sum(len(ids) + 1 for ids in leftover) - sum(len(r) for r in rest.values())
        assert 0 <= tails < 2 * L, "more than each split's last partial sequence was dropped"
        for split, r in rest.items():
            assert not r or any(ids[: len(r)] == r for ids in leftover)
    for split, by_task in streams.items():
        assert m["splits"][split]["tokens"] == sum(len(v) for v in by_task.values())
    assert json.loads((out / "tokenize_config.json").read_text())["seq_len"] == 64
    assert m["dtype"] == "uint16"


@pytest.mark.slow
def test_rerun_is_idempotent_and_s3_matches_local(tmp_path, demo_corpus_dir, bucket, storage_cfg):
    a = run(demo_corpus_dir, tmp_path / "a")
    b = run(demo_corpus_dir, tmp_path / "b")
    # the same corpus from S3, written to S3
    src = open_store(f"s3://{bucket}/corpus", storage_cfg)
    for f in Path(demo_corpus_dir).iterdir():
        src.put_file(f.name, f)
    c = run(f"s3://{bucket}/corpus", f"s3://{bucket}/shards", storage_cfg)

    def shards(m):
        return [(s["path"], s["sha256"], s["sequences"]) for sp in ("train", "validation") for s in m["splits"][sp]["shards"]]

    assert shards(a) == shards(b) == shards(c)
    assert a["tokenizer"] == b["tokenizer"] == c["tokenizer"]
    s3 = open_store(f"s3://{bucket}/shards", storage_cfg)
    assert manifest.read(s3)["splits"] == c["splits"]
    assert all(s3.sha256(p) == sha for p, sha, _ in shards(c))


def test_bad_records_are_counted_in_the_manifest(tmp_path):
    good = [{"id": f"g{i}", "text": f"good document {i} " * 30} for i in range(40)]
    p = write_jsonl(tmp_path / "c" / "mixed.jsonl", good + [good[0], good[1]])  # two exact duplicates
    with open(p, "ab") as f:
        f.write(b'{"id": "u", "text": "\xff bad"}\n{oops\n{"id": "n", "text": null}\n{"id": "e", "text": ""}\n')
    m = run(tmp_path / "c", tmp_path / "out", **{"tokenizer": {"vocab_size": 300}, "seq_len": 16})
    assert m["input"]["skipped"] == {"invalid_utf8": 1, "unparseable_json": 1, "null_text": 1, "empty_text": 1}
    assert m["input"]["duplicates_removed"] == 2
    assert (m["input"]["documents_read"], m["input"]["documents_used"]) == (46, 40)


def test_a_hostile_corpus_tokenizes_with_every_bad_record_counted(tmp_path):
    expected = write_hostile_corpus(tmp_path / "c")
    m = run(tmp_path / "c", tmp_path / "out", reader=HOSTILE_READER, **{"tokenizer": {"vocab_size": 300}, "seq_len": 16})
    assert m["input"]["skipped"] == expected["skipped"]
    assert m["input"]["documents_used"] == expected["used"]
    assert m["input"]["unreadable_files"] == expected["unreadable"]
    assert manifest.read(open_store(tmp_path / "out"))["input"]["unreadable_files"] == expected["unreadable"]
    assert m["splits"]["train"]["sequences"] > 0


def test_unreadable_files_past_max_bad_files_fail_the_run_naming_them_with_no_manifest(tmp_path):
    write_hostile_corpus(tmp_path / "c")
    (tmp_path / "c" / "d-broken.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(CorpusError, match=r"2 corpus file\(s\) cannot be read, more than reader.max_bad_files=1.*"
                                          r"c-broken\.jsonl\.gz.*d-broken\.parquet"):
        run(tmp_path / "c", tmp_path / "out", reader=HOSTILE_READER, **{"tokenizer": {"vocab_size": 300}, "seq_len": 16})
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_or_unusable_corpus_is_an_error_and_writes_no_manifest(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        run(tmp_path / "nope", tmp_path / "o1")
    write_jsonl(tmp_path / "junk" / "j.jsonl", ['{"text": ""}', "{broken", '{"id": 1}'])
    with pytest.raises(CorpusError, match="zero usable documents"):
        run(tmp_path / "junk", tmp_path / "o2")
    assert not (tmp_path / "o1" / "manifest.json").exists() and not (tmp_path / "o2" / "manifest.json").exists()


def test_crash_midway_leaves_no_manifest(tmp_path):
    """A corrupt gzip file fails a Spark task after other tasks wrote shards: no manifest, clear error."""
    good = [{"id": f"g{i}", "text": f"good document {i} " * 30} for i in range(60)]
    write_jsonl(tmp_path / "c" / "a.jsonl", good)
    data = gzip.compress("".join(json.dumps(d) + "\n" for d in good).encode())
    (tmp_path / "c" / "b.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusError, match=r"b\.jsonl\.gz cannot be read"):
        run(tmp_path / "c", tmp_path / "out", **{"tokenizer": {"vocab_size": 300, "path": None}, "dedup": False,
                                                  "partition_mb": 1})
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(ManifestError, match="no manifest.json"):
        manifest.read(open_store(tmp_path / "out"))


@pytest.mark.slow
def test_published_shard_set_is_not_overwritten_without_the_flag(tmp_path, demo_corpus_dir):
    m = run(demo_corpus_dir, tmp_path / "s")
    before = (tmp_path / "s" / "manifest.json").read_bytes()
    with pytest.raises(LmpipeError, match="already exists.*overwrite=true"):
        run(demo_corpus_dir, tmp_path / "s", seq_len=32)
    assert (tmp_path / "s" / "manifest.json").read_bytes() == before
    m2 = run(demo_corpus_dir, tmp_path / "s", seq_len=32, overwrite=True)
    assert m2["seq_len"] == 32 and m["seq_len"] == 64
    listed = {s["path"] for sp in ("train", "validation") for s in m2["splits"][sp]["shards"]}
    on_disk = {p.relative_to(tmp_path / "s").as_posix() for split in ("train", "validation")
               for p in (tmp_path / "s" / split).rglob("*.parquet")}
    assert listed == on_disk  # no stale shards of the replaced run


@pytest.mark.slow
def test_existing_tokenizer_is_used_and_identified_by_sha(tmp_path, demo_corpus_dir):
    first = run(demo_corpus_dir, tmp_path / "a")
    m = run(demo_corpus_dir, tmp_path / "b", tokenizer={"path": str(tmp_path / "a" / "tokenizer.json")})
    assert m["tokenizer"]["sha256"] == first["tokenizer"]["sha256"]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(LmpipeError, match="not a valid tokenizer.json"):
        run(demo_corpus_dir, tmp_path / "c", tokenizer={"path": str(tmp_path / "bad.json")})


def test_cli_config_errors_exit_non_zero_naming_the_key(tmp_path):
    lmpipe = [sys.executable, "-m", "lmpipe.cli", "tokenize", "--corpus", str(tmp_path), "--out", str(tmp_path / "o")]
    r = subprocess.run([*lmpipe, "seq_lenn=3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown config key 'seq_lenn'" in r.stderr
    r = subprocess.run([*lmpipe, "tokenizer.vocab_size=big"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "'tokenizer.vocab_size'" in r.stderr
    r = subprocess.run([*lmpipe[:4], "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "'corpus' is required" in r.stderr


def test_cli_runs_and_prints_a_summary(tmp_path, demo_corpus_dir, capsys):
    from lmpipe import cli

    code = cli.main(["tokenize", "--corpus", str(demo_corpus_dir), "--out", str(tmp_path / "o"), "--seq-len", "64",
                     "--vocab-size", "400", "--spark-master", "local[2]"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.out.strip() == str(tmp_path / "o")
    assert "Tokenized" in captured.err and "tokens/s" in captured.err and "Manifest:" in captured.err


@pytest.mark.slow
def test_spark_submit_runs_the_job(tmp_path, demo_corpus_dir):
    """The job file is a real spark-submit entry point (the same flags as `lmpipe tokenize`)."""
    submit = Path(sys.executable).parent / "spark-submit"
    job = Path(tokenize_shard.__file__)
    r = subprocess.run([str(submit), "--master", "local[2]", "--conf", "spark.driver.host=127.0.0.1", str(job),
                        "--corpus", str(demo_corpus_dir), "--out", str(tmp_path / "o"), "--seq-len", "64",
                        "--vocab-size", "400"], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "PYSPARK_PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr[-3000:]
    m = manifest.read(open_store(tmp_path / "o"))
    assert m["spark"]["master"] == "local[2]" and m["splits"]["train"]["sequences"] > 0


@pytest.mark.slow
def test_incremental_run_tokenizes_only_new_partitions_and_merges(tmp_path, demo_corpus_dir, bucket, storage_cfg):
    lines = next(Path(demo_corpus_dir).glob("*.jsonl")).read_text().splitlines()
    day1, day2 = lines[: len(lines) // 2][:400], lines[len(lines) // 2:][:300]
    src = open_store(f"s3://{bucket}/corpus", storage_cfg)
    local = tmp_path / "corpus"
    write_jsonl(local / "date=2026-11-20" / "part-0.jsonl", day1)
    src.put_file("date=2026-11-20/part-0.jsonl", local / "date=2026-11-20" / "part-0.jsonl")
    first = run(f"s3://{bucket}/corpus", f"s3://{bucket}/runs/1/shards", storage_cfg)
    write_jsonl(local / "date=2026-11-21" / "part-0.jsonl", day2)
    src.put_file("date=2026-11-21/part-0.jsonl", local / "date=2026-11-21" / "part-0.jsonl")

    second = run(f"s3://{bucket}/corpus", f"s3://{bucket}/runs/2/shards", storage_cfg, base=f"s3://{bucket}/runs/1/shards")
    assert second["input"]["new_files"] == 1 and second["input"]["files"] == 2
    assert second["base"]["run_id"] == first["run_id"]
    assert second["tokenizer"]["sha256"] == first["tokenizer"]["sha256"]
    assert second["input"]["documents_read"] == len(day1) + len(day2)
    out2 = open_store(f"s3://{bucket}/runs/2/shards", storage_cfg)
    assert manifest.read(out2) == second
    s3 = boto3.client("s3", endpoint_url=storage_cfg.endpoint_url)
    own2 = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/2/shards/").get("Contents", [])}
    for split in ("train", "validation"):
        old = {s["path"]: s for s in first["splits"][split]["shards"]}
        new = {s["path"]: s for s in second["splits"][split]["shards"]}
        assert set(old) < set(new)  # the base's shards are all listed, under their own names...
        base_uri = f"s3://{bucket}/runs/1/shards"
        assert all(new[p] == {**old[p], "root": base_uri} for p in old)  # ...where they live, not copied
        assert not {f"runs/2/shards/{p}" for p in old} & own2
        assert all(s3_sha(s3, bucket, "runs/1/shards", p) == old[p]["sha256"] for p in old)
        assert all("root" not in new[p] and f"runs/2/shards/{p}" in own2 for p in set(new) - set(old))
        assert second["splits"][split]["sequences"] == sum(s["sequences"] for s in new.values())
        # the training reader reads both, each where it lives
        data = ShardSet(f"s3://{bucket}/runs/2/shards", tmp_path / "cache", storage_cfg, split=split)
        expected = np.concatenate([s3_rows(s3, bucket, "runs/1/shards" if p in old else "runs/2/shards", p)
                                   for p in (s["path"] for s in second["splits"][split]["shards"])])
        assert np.array_equal(data.rows(np.arange(len(data))), expected)
    # the new shards hold exactly day 2, tokenized with day 1's tokenizer
    (tmp_path / "tok.json").write_bytes(open_store(f"s3://{bucket}/runs/1/shards", storage_cfg).get_bytes("tokenizer.json"))
    alone = run(local / "date=2026-11-21", tmp_path / "alone", tokenizer={"path": f"{tmp_path}/tok.json"})
    added = [s for s in second["splits"]["train"]["shards"] if "root" not in s]
    assert sorted(s["sha256"] for s in added) == sorted(s["sha256"] for s in alone["splits"]["train"]["shards"])

    # nothing new: no Spark work, the same shards again, each still referenced at its original set
    third = run(f"s3://{bucket}/corpus", f"s3://{bucket}/runs/3/shards", storage_cfg, base=f"s3://{bucket}/runs/2/shards")
    assert third["input"]["new_files"] == 0
    for split in ("train", "validation"):
        assert third["splits"][split]["shards"] == [{**s, "root": s.get("root", f"s3://{bucket}/runs/2/shards")}
                                                    for s in second["splits"][split]["shards"]]
        assert {s["root"] for s in third["splits"][split]["shards"]} == {f"s3://{bucket}/runs/{i}/shards" for i in (1, 2)}
    # compacted on the same endpoint (server-side copies): every listed shard under one prefix, no root left
    assert lmpipe_main(["compact", "--shards", f"s3://{bucket}/runs/3/shards", "--out", f"s3://{bucket}/compact",
                        f"storage.endpoint_url={storage_cfg.endpoint_url}"]) == 0
    compacted = json.loads(s3.get_object(Bucket=bucket, Key="compact/manifest.json")["Body"].read())
    listed = {s["path"]: s for sp in ("train", "validation") for s in third["splits"][sp]["shards"]}
    assert "\"root\"" not in json.dumps(compacted) and compacted["splits"]["train"]["sequences"] == \
        third["splits"]["train"]["sequences"]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="compact/")["Contents"]}
    assert {k for k in keys if k.startswith(("compact/train/", "compact/validation/"))} == {f"compact/{p}" for p in listed}
    assert all(s3_sha(s3, bucket, "compact", p) == e["sha256"] for p, e in listed.items())

    with pytest.raises(config.ConfigError, match="seq_len"):
        run(f"s3://{bucket}/corpus", f"s3://{bucket}/runs/4/shards", storage_cfg, base=f"s3://{bucket}/runs/2/shards",
            seq_len=32)
    assert not open_store(f"s3://{bucket}/runs/4/shards", storage_cfg).exists("manifest.json")


@pytest.mark.slow
def test_all_pieces_of_a_long_document_land_in_one_split(tmp_path):
    """A document split into ~60 pieces: its marker word is in one split's tokens, never both
    (by chance alone, 60 pieces at a 50 % validation share would all agree with p = 2**-59)."""
    short = [{"id": f"s{i}", "text": f"short document number {i} about plain things " * 4} for i in range(60)]
    long_doc = {"id": "long", "text": " ".join(f"zebraquartz{i}" for i in range(2000))}  # no two pieces alike
    write_jsonl(tmp_path / "c" / "docs.jsonl", [*short, long_doc])
    out = tmp_path / "out"
    m = run(tmp_path / "c", out, validation_fraction=0.5, reader={"max_doc_chars": 400})
    store = open_store(out)
    tok = from_json(store.get_bytes("tokenizer.json").decode())
    found = {split: sum(tok.decode([int(t) for t in stream]).count("zebraquartz")
                        for stream in shard_stream(store, m, split).values())
             for split in ("train", "validation")}
    assert sorted(found.values())[0] == 0 and sorted(found.values())[1] >= 1800, found


@pytest.mark.slow
def test_a_cleared_run_with_the_same_corpus_and_config_verifies_and_keeps_the_published_set(tmp_path, demo_corpus_dir):
    """Clearing tokenize_shard after it published: the retry checks the shards and succeeds;
    a shard changed since is an error, and nothing is rewritten either way."""
    m = run(demo_corpus_dir, tmp_path / "s")
    before = (tmp_path / "s" / "manifest.json").read_bytes()
    again = run(demo_corpus_dir, tmp_path / "s")
    assert again["run_id"] == m["run_id"] and (tmp_path / "s" / "manifest.json").read_bytes() == before
    shard = tmp_path / "s" / m["splits"]["train"]["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(LmpipeError, match="does not match its sha256"):
        run(demo_corpus_dir, tmp_path / "s")
    assert (tmp_path / "s" / "manifest.json").read_bytes() == before
