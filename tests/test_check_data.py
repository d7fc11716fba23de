"""The Great Expectations gate, on real shards from ``lmpipe tokenize`` with planted faults."""

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import HOSTILE_READER, write_hostile_corpus, write_jsonl
from data_checks import check_data
from lmpipe import config, manifest
from lmpipe.manifest import read_shard, write_shard
from lmpipe.storage import open_store, sha256_file



@pytest.fixture
def shards(real_shards, tmp_path) -> Path:
    dst = tmp_path / "shards"
    shutil.copytree(real_shards, dst, ignore=shutil.ignore_patterns("_checks"))
    return dst


def check(**kw) -> dict:
    return check_data.run(config.build(check_data.CheckConfig, kw))


def failed(result) -> dict[str, list]:
    """{failed column: offending rows}."""
    return {(f["kwargs"].get("column") or f["kwargs"]["column_A"]): f["offending"] for f in result["failed"]}


def manifest_of(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def save_manifest(d: Path, m: dict) -> None:
    (d / "manifest.json").write_text(json.dumps(m))


def rewrite(d: Path, rel: str, seqs, fix_manifest=True):
    """Replace a shard; optionally update its manifest entry so only the planted fault remains."""
    if isinstance(seqs, pa.Table):
        pq.write_table(seqs, d / rel)
    else:
        write_shard(seqs, str(d / rel))
    if fix_manifest:
        m = manifest_of(d)
        for split in manifest.SPLITS:
            for e in m["splits"][split]["shards"]:
                if e["path"] == rel:
                    e.update(bytes=(d / rel).stat().st_size, sha256=sha256_file(d / rel))
        save_manifest(d, m)


def first_shard(d: Path, split="train") -> str:
    return manifest_of(d)["splits"][split]["shards"][0]["path"]


def assert_report(result, *needles):
    index = Path(result["data_docs"])
    assert index.is_file()
    pages = list(index.parent.glob("validations/**/*.html"))
    assert len(pages) == 4  # dataset, splits, shards, curation
    html = "\n".join(p.read_text() for p in pages)
    for n in needles:
        assert n in html
    saved = json.loads((Path(result["results_uri"]) / "result.json").read_text())
    assert saved["success"] == result["success"]


def test_intact_shards_pass(shards):
    result = check(shards=str(shards))
    assert result["success"], result["failed"]
    assert len(result["expectations"]) == 23
    assert Path(result["results_uri"]).parent == shards / "_checks"
    assert_report(result, "sha256_matches", "Each curation step removes at most")
    docs = Path(result["data_docs"])
    assert 'id="curation-funnel"' in docs.read_text() and (docs.parent / "funnel.png").stat().st_size > 1000


def test_flipped_byte(shards):
    rel = first_shard(shards)
    data = bytearray((shards / rel).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (shards / rel).write_bytes(bytes(data))
    result = check(shards=str(shards))
    assert not result["success"]
    assert failed(result)["sha256_matches"][0]["path"] == rel
    assert_report(result, rel)


def test_truncated_file(shards):
    rel = first_shard(shards, "validation")
    data = (shards / rel).read_bytes()
    (shards / rel).write_bytes(data[: len(data) // 3])
    result = check(shards=str(shards))
    f = failed(result)
    assert f["readable"][0]["path"] == rel and "cannot be read" in f["readable"][0]["error"]
    assert f["bytes_match"][0]["path"] == rel
    assert_report(result, rel)


def test_token_id_out_of_vocab(shards):
    rel = first_shard(shards)
    seqs = read_shard(shards / rel).copy()
    vocab = manifest_of(shards)["tokenizer"]["vocab_size"]
    seqs[3, 5] = vocab
    rewrite(shards, rel, seqs)
    result = check(shards=str(shards))
    assert list(failed(result)) == ["max_token_id"]
    assert failed(result)["max_token_id"][0] == {"max_token_id": vocab, "path": rel, "url": str((shards / rel).resolve())}
    assert_report(result, rel)


def test_wrong_row_length(shards):
    rel = first_shard(shards)
    seqs = read_shard(shards / rel)
    rewrite(shards, rel, seqs[:, :-1].copy())
    result = check(shards=str(shards))
    assert failed(result)["bad_length_rows"][0]["path"] == rel


def test_wrong_column_type_is_reported_not_raised(shards):
    rel = first_shard(shards)
    rewrite(shards, rel, pa.table({"input_ids": pa.array(["a", "b"])}))
    result = check(shards=str(shards))
    row = failed(result)["readable"][0]
    assert row["path"] == rel and "expected fixed_size_list" in row["error"]


def test_empty_shard(shards):
    rel = first_shard(shards)
    seq_len = manifest_of(shards)["seq_len"]
    rewrite(shards, rel, np.zeros((0, seq_len + 1), dtype=np.uint16))
    m = manifest_of(shards)
    for s in m["splits"]["train"]["shards"]:
        if s["path"] == rel:
            m["splits"]["train"]["sequences"] -= s["sequences"]
            m["splits"]["train"]["tokens"] -= s["tokens"]
            s.update(sequences=0, tokens=0)
    save_manifest(shards, m)
    result = check(shards=str(shards))
    assert failed(result)["sequences"][0] == {"sequences": 0, "path": rel, "url": str((shards / rel).resolve())}


def test_shard_missing_from_manifest(shards):
    rel = first_shard(shards)
    shutil.copy(shards / rel, shards / "train" / "part-99999-00000.parquet")
    result = check(shards=str(shards))
    assert list(failed(result)) == ["listed_in_manifest"]
    assert failed(result)["listed_in_manifest"][0]["path"] == "train/part-99999-00000.parquet"


def test_manifest_entry_with_no_file(shards):
    rel = first_shard(shards, "validation")
    (shards / rel).unlink()
    result = check(shards=str(shards))
    f = failed(result)
    assert f["exists"][0]["path"] == rel and "does not exist" in f["exists"][0]["error"]


def test_no_manifest(shards):
    (shards / "manifest.json").unlink()
    result = check(shards=str(shards))
    f = failed(result)
    assert f["manifest_exists"][0]["manifest_exists"] is False
    assert "no manifest.json" in f["manifest_exists"][0]["manifest_error"]
    assert_report(result, "manifest_exists")


def test_invalid_manifest_schema(shards):
    m = manifest_of(shards)
    del m["tokenizer"]["eos_id"]
    save_manifest(shards, m)
    result = check(shards=str(shards))
    assert "eos_id" in failed(result)["manifest_valid"][0]["manifest_error"]


def test_empty_validation_split(shards):
    m = manifest_of(shards)
    for s in m["splits"]["validation"]["shards"]:
        (shards / s["path"]).unlink()
    m["splits"]["validation"].update(sequences=0, tokens=0, shards=[])
    save_manifest(shards, m)
    result = check(shards=str(shards))
    assert list(failed(result)) == ["validation_sequences"]


def test_tokenizer_mismatch(shards):
    tok = json.loads((shards / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|changed|>"
    (shards / "tokenizer.json").write_text(json.dumps(tok))
    result = check(shards=str(shards))
    assert list(failed(result)) == ["tokenizer_sha256_matches"]
    assert "tokenizer.json has sha256" in failed(result)["tokenizer_sha256_matches"][0]["tokenizer_error"]


def test_eos_rate_out_of_bounds(shards):
    rel = first_shard(shards)
    seqs = read_shard(shards / rel).copy()
    eos = manifest_of(shards)["tokenizer"]["eos_id"]
    seqs[seqs == eos] = eos + 1  # the documents' boundaries vanish
    rewrite(shards, rel, seqs)
    result = check(shards=str(shards))
    assert "eos_per_sequence" in failed(result)


def test_shards_on_s3(real_shards, bucket, storage_cfg):
    store = open_store(f"s3://{bucket}/shards", storage_cfg)
    for p in real_shards.rglob("*"):
        if p.is_file() and "_checks" not in p.parts:
            store.put_file(p.relative_to(real_shards).as_posix(), p)
    cfg = config.to_dict(storage_cfg)
    result = check(shards=f"s3://{bucket}/shards", storage=cfg, run_id="r1")
    assert result["success"], result["failed"]
    assert store.exists("_checks/r1/result.json") and store.exists("_checks/r1/data_docs/index.html")


# ---------------------------------------------------------------- corpus suite


def test_corpus_suite_passes_on_real_text(demo_corpus_dir, tmp_path):
    result = check(corpus=str(demo_corpus_dir), results=str(tmp_path / "r"))
    assert result["success"], result["failed"]
    assert result["tables"]["dataset"][0]["usable_documents"] > 100


def test_corpus_suite_names_bad_files(tmp_path):
    good = [{"id": f"g{i}", "text": f"document {i} " * 10} for i in range(50)]
    write_jsonl(tmp_path / "c" / "good.jsonl", good)
    write_jsonl(tmp_path / "c" / "bad.jsonl", ["{oops"] * 20 + [{"id": "n", "text": None}] * 5 + good[:5])
    (tmp_path / "c" / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 500)[:-30])
    result = check(corpus=str(tmp_path / "c"), max_duplicate_rate=0.05)
    f = failed(result)
    assert not result["success"]
    assert {o["file"] for o in f["readable"]} == {"broken.jsonl.gz"}
    assert {o["file"] for o in f["skipped_fraction"] if "file" in o} == {"bad.jsonl"}
    assert {o["file"] for o in f["null_text_fraction"] if "file" in o} == {"bad.jsonl"}
    assert "duplicate_rate" in f and "unreadable_files" in f
    assert_corpus_report(result)


def test_the_corpus_gate_allows_as_many_unreadable_files_as_tokenize_quarantines(tmp_path):
    write_hostile_corpus(tmp_path / "c")
    loose = {"max_skipped_fraction": 1.0, "max_out_of_bounds_fraction": 1.0}
    allowed = check(corpus=str(tmp_path / "c"), reader=HOSTILE_READER, results=str(tmp_path / "r1"), **loose)
    assert allowed["success"], allowed["failed"]
    assert allowed["tables"]["dataset"][0]["unreadable_files"] == 1
    strict = check(corpus=str(tmp_path / "c"), reader={**HOSTILE_READER, "max_bad_files": 0},
                   results=str(tmp_path / "r2"), **loose)
    assert {o["file"] for o in failed(strict)["readable"]} == {"c-broken.jsonl.gz"} and "unreadable_files" in failed(strict)


def test_missing_corpus_fails_the_gate_with_a_report(tmp_path):
    result = check(corpus=str(tmp_path / "none"), results=str(tmp_path / "r"))
    f = failed(result)
    assert "usable_documents" in f and "does not exist" in f["usable_documents"][0]["error"]
    assert_corpus_report(result)


def assert_corpus_report(result):
    index = Path(result["data_docs"])
    assert index.is_file() and len(list(index.parent.glob("validations/**/*.html"))) == 2


def test_cli_exit_codes(shards, capsys):
    from lmpipe import cli

    assert cli.main(["check-data", "--shards", str(shards)]) == 0
    assert capsys.readouterr().out.strip().endswith("data_docs/index.html")
    (shards / first_shard(shards)).unlink()
    assert cli.main(["check-data", "--shards", str(shards)]) == check_data.EXIT_FAILED
    err = capsys.readouterr().err
    assert "FAILED Every shard listed in the manifest exists" in err and first_shard(shards) in err
    assert cli.main(["check-data", "--shards", str(shards), "max_dup=1"]) == 2
    assert "unknown config key 'max_dup'" in capsys.readouterr().err


def test_results_never_replace_a_folder_lmpipe_did_not_write(demo_corpus_dir, tmp_path):
    """--results is replaced on a re-run: a folder with other files in it, or a file, is refused."""
    from lmpipe.errors import ConfigError

    precious = tmp_path / "home"
    (precious / "notes").mkdir(parents=True)
    (precious / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds files lmpipe did not write"):
        check(corpus=str(demo_corpus_dir), results=str(precious))
    assert (precious / "notes" / "keep.txt").read_text() == "mine"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="which is a file"):
        check(corpus=str(demo_corpus_dir), results=str(tmp_path / "a-file"))
    half = tmp_path / "half"  # an attempt cut short: lmpipe's marker came first, no result.json yet
    (half / "data_docs").mkdir(parents=True)
    (half / ".lmpipe-results").write_text("")
    (half / "data_docs" / "index.html").write_text("partial")
    assert check(corpus=str(demo_corpus_dir), results=str(half))["success"]
    first = check(corpus=str(demo_corpus_dir), results=str(tmp_path / "mine"))  # new: written
    again = check(corpus=str(demo_corpus_dir), results=str(tmp_path / "mine"))  # lmpipe's own: replaced
    assert first["success"] and again["success"] and (tmp_path / "mine" / "result.json").is_file()


def test_data_docs_scripts_are_pinned_by_hash_and_their_absence_names_the_fix(tmp_path, monkeypatch):
    import base64
    import hashlib

    from data_checks import assets
    from lmpipe.errors import LmpipeError

    data = b"a tarball"
    assets.verify(data, "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode())
    with pytest.raises(LmpipeError, match="does not match its pinned sha512"):
        assets.verify(data + b"!", "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode())
    monkeypatch.setattr(assets, "folder", lambda: tmp_path / "none")
    with pytest.raises(LmpipeError, match=r"Data Docs scripts missing .*bootstrap-table\.min\.js.*data_checks\.assets fetch"):
        assets.files()
