"""Curation inside the tokenize job, on Spark local[2]: the funnel, the removed documents, the
gate, and dedup across the runs of a lineage.

The truth comes from the corpora themselves: the generated web corpus records which documents
it planted (near copies, other languages, contamination), and the code corpus is written here
by hand. Removed documents are read back from ``removed/`` with ``json``, shards are decoded
with the ``tokenizers`` library.
"""

from __future__ import annotations

import gzip
import json
import sysconfig
from pathlib import Path

import pytest

from conftest import write_jsonl
from lmpipe import config, manifest
from lmpipe.errors import ConfigError
from lmpipe.storage import open_store
from spark_jobs import tokenize_shard
from spark_jobs.curate import synthetic
from spark_jobs.tokenize_shard import TokenizeConfig

BASE = {"seq_len": 64, "spark_master": "local[2]", "shard_sequences": 200, "validation_fraction": 0.1,
        "tokenizer": {"vocab_size": 400, "train_sample_mb": 1}}


def cfg_of(corpus, out, **kw) -> TokenizeConfig:
    return config.build(TokenizeConfig, {**BASE, "corpus": str(corpus), "out": str(out), **kw})


def removed_ids(out: Path, step: str) -> set[str]:
    """The ids under ``removed/<step>/``, read with ``json``."""
    return {json.loads(line)["id"] for p in sorted((out / manifest.REMOVED / step).glob("*.jsonl"))
            for line in p.read_text().splitlines()}


def funnel(m: dict) -> dict[str, dict]:
    return {s["step"]: s for s in m["curation"]["funnel"]}


# ---------------------------------------------------------------- bad input, before Spark


@pytest.mark.parametrize("override, named", [
    ({"filters": ["code_lines", "no_such_filter"]}, "no_such_filter"),
    ({"filters": [{"code_lines": {"max_line_chars_typo": 5}}]}, "curate.filters.code_lines.max_line_chars_typo"),
    ({"filters": "webb"}, "webb"),
    ({"colour": "blue"}, "curate.colour"),
])
def test_an_unknown_filter_or_key_is_a_config_error_before_spark_starts(tmp_path, override, named):
    write_jsonl(tmp_path / "c" / "a.jsonl", [{"text": "x = 1\n"}])
    # An unreachable master: a job that got as far as Spark would fail there, not with a ConfigError.
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        tokenize_shard.run(cfg_of(tmp_path / "c", tmp_path / "out", spark_master="spark://127.0.0.1:9",
                                  curate=override))
    assert not (tmp_path / "out").exists()


def test_an_empty_or_unreadable_decontamination_source_is_an_error_naming_it(tmp_path):
    write_jsonl(tmp_path / "c" / "a.jsonl", [{"text": "x = 1\n"}])
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "eval.txt").write_text("only five words in here")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "eval.jsonl.gz").write_bytes(gzip.compress(b'{"q": "a b c"}\n')[:-9])
    for source, why in ((tmp_path / "missing", "does not exist"), (tmp_path / "short", "no text of 13 words"),
                        (tmp_path / "corrupt", "cannot read")):
        with pytest.raises(ConfigError, match=f"curate.decontaminate.*{why}"):
            tokenize_shard.run(cfg_of(tmp_path / "c", tmp_path / "out", spark_master="spark://127.0.0.1:9",
                                      curate={"decontaminate": str(source)}))
        assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the web preset


@pytest.fixture(scope="module")
def web_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("web")
    truth = synthetic.generate(root, docs=200, near=25, similar=20, foreign=20, contaminated=3, seed=3,
                               near_range=(0.8, 0.95))
    out = root / "shards"
    m = tokenize_shard.run(cfg_of(root / "corpus", out, curate={
        "filters": "web", "decontaminate": str(root / "eval"), "keep_removed": "all"}))
    return root, out, m, truth


@pytest.mark.slow
def test_web_preset_removes_planted_near_duplicates_contamination_and_other_languages(web_run):
    _root, out, m, truth = web_run
    steps = funnel(m)
    assert list(steps) == ["reader", "decontaminate", "language", "gopher_repetition", "gopher_quality", "c4",
                           "fineweb", "exact_dedup", "near_dedup"]
    assert removed_ids(out, "decontaminate") == set(truth["contaminated"])
    assert removed_ids(out, "language") >= set(truth["foreign"])
    assert m["curation"]["languages"]["fr"] == m["curation"]["languages"]["de"] == len(truth["foreign"]) // 2
    near = removed_ids(out, "near_dedup")
    filtered = set().union(*(removed_ids(out, s) for s in steps if s not in ("near_dedup", "exact_dedup")))
    # Every planted copy whose original and itself passed the filters is found; nothing else is.
    expected = {i for i in truth["near"] if i not in filtered and i.split("-of-")[1] not in filtered}
    assert len(expected) >= 15 and near == expected
    assert not near & set(truth["similar"])
    assert steps["near_dedup"]["removed"] == len(near) and steps["decontaminate"]["removed"] == len(truth["contaminated"])
    cur = m["curation"]
    assert cur["documents_in"] == truth["documents"]
    assert cur["documents_in"] - sum(s["removed"] for s in cur["funnel"]) == cur["documents_out"] == \
        m["input"]["documents_used"]


@pytest.mark.slow
def test_the_gate_blocks_a_contaminated_run(web_run, tmp_path):
    from data_checks import check_data

    _root, out, _m, _truth = web_run
    res = check_data.run(config.build(check_data.CheckConfig, {"shards": str(out), "results": str(tmp_path / "r")}))
    assert not res["success"]
    failed = {(f["table"], f["kwargs"].get("column") or f["kwargs"].get("column_B")) for f in res["failed"]}
    assert ("dataset", "contaminated_documents") in failed
    funnel_rows = {r["step"]: r for r in res["tables"]["curation"]}
    assert funnel_rows["decontaminate"]["removed"] == 3


# ---------------------------------------------------------------- the code preset (the default)

AWS_KEY = "AKIAIOSFODNN7EXAMPLQ"
PEM = "-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(["MIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuvBjM9Oi" * 2] * 20) + \
      "\n-----END RSA PRIVATE KEY-----\n"


def code_corpus(root: Path) -> dict[str, str]:
    """Forty real standard-library modules plus four planted ones, by id."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = {}
    for p in sorted(stdlib.glob("*.py")):
        text = p.read_text(encoding="utf-8", errors="replace")
        if 2_000 < len(text) < 20_000 and "AKIA" not in text and "@" not in text and len(docs) < 40:
            docs[p.name] = text
    docs["config_with_key.py"] = (f'"""Deployment settings of the nightly export."""\n\nAWS_ACCESS_KEY_ID = "{AWS_KEY}"\n'
                                  'OWNER = "ops@example.com"\nREGION = "eu-west-1"\nBUCKETS = ["raw", "curated", '
                                  '"shards"]\n\n\ndef bucket_url(name):\n    return f"s3://{name}/"\n')
    docs["generated_pb2.py"] = "# Generated by the protocol buffer compiler.  DO NOT EDIT!\n" + docs[list(docs)[1]]
    docs["bundle.min.py"] = "x=" + "+".join(f"f{i}(a,b)" for i in range(2_000)) + "\n"
    docs["deploy_key.py"] = f'KEY = """\n{PEM}"""\n'
    write_jsonl(root / "corpus" / "code.jsonl", [{"id": k, "text": v} for k, v in docs.items()])
    return docs


@pytest.mark.slow
def test_code_preset_scrubs_secrets_and_removes_generated_minified_and_key_files(tmp_path):
    from data_checks import check_data
    from tokenizers import Tokenizer

    code_corpus(tmp_path)
    out = tmp_path / "shards"
    m = tokenize_shard.run(cfg_of(tmp_path / "corpus", out))  # curate defaults: the code preset
    steps = funnel(m)
    assert list(steps) == ["reader", "code_lines", "alphanumeric", "autogenerated", "secrets", "exact_dedup",
                           "near_dedup"]
    assert removed_ids(out, "autogenerated") == {"generated_pb2.py"}
    assert removed_ids(out, "code_lines") == {"bundle.min.py"}
    assert removed_ids(out, "secrets") == {"deploy_key.py"}
    assert m["curation"]["scrubbed"].get("email") == 1 and sum(m["curation"]["scrubbed"].values()) >= 2
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    store = open_store(out)
    text = "".join(tok.decode(row.tolist()) for s in m["splits"]["train"]["shards"] + m["splits"]["validation"]["shards"]
                   for row in manifest.read_shard(store.path(s["path"])))
    assert AWS_KEY not in text and "ops@example.com" not in text
    assert "OWNER" in text  # the scrubbed document itself was kept
    res = check_data.run(config.build(check_data.CheckConfig, {"shards": str(out), "results": str(tmp_path / "r")}))
    assert res["success"], res["failed"]


# ---------------------------------------------------------------- across the runs of a lineage


@pytest.mark.slow
def test_a_nightly_run_dedups_against_every_earlier_run_of_its_lineage(tmp_path):
    import random

    rng = random.Random(5)
    pool = list(synthetic.english_sentences())
    day1 = [{"id": f"d1-{i}", "text": " ".join(rng.sample(pool, 12))} for i in range(60)]
    write_jsonl(tmp_path / "c" / "date=1" / "a.jsonl", day1)
    kw = {"curate": {"filters": "none", "keep_removed": "all"}}
    tokenize_shard.run(cfg_of(tmp_path / "c", tmp_path / "s1", **kw))
    vocab = sorted({w for s in pool for w in s.split() if w.isalpha()})
    near = None
    while near is None:  # an edit sequence that overshoots the range gives None: draw another
        near = synthetic.near_copy(rng, day1[7]["text"], 0.85, 0.95, vocab)
    day2 = [{"id": "exact-of-d1-3", "text": day1[3]["text"]}, {"id": "near-of-d1-7", "text": near},
            *({"id": f"d2-{i}", "text": " ".join(rng.sample(pool, 12))} for i in range(30))]
    write_jsonl(tmp_path / "c" / "date=2" / "a.jsonl", day2)
    m = tokenize_shard.run(cfg_of(tmp_path / "c", tmp_path / "s2", base=str(tmp_path / "s1"), **kw))
    assert removed_ids(tmp_path / "s2", "exact_dedup") == {"exact-of-d1-3"}
    assert removed_ids(tmp_path / "s2", "near_dedup") == {"near-of-d1-7"}
    assert m["curation"]["documents_in"] == 60 + 32 and m["curation"]["documents_out"] == 60 + 30
    # The base's signatures are referenced where they live, like its shards, never copied.
    assert [Path(u).name for u in m["curation"]["signatures"]] == ["signatures", "signatures"]
    assert [Path(u).parent for u in m["curation"]["signatures"]] == [tmp_path / "s2", tmp_path / "s1"]
    assert len(list((tmp_path / "s2" / "signatures").iterdir())) == 1
    # A run whose signatures could never match the lineage's is refused before Spark starts.
    day3 = {**kw, "curate": {**kw["curate"], "near_dedup": {"seed": 2}}}
    with pytest.raises(ConfigError, match=r"curate\.near_dedup\.seed.* 2 but base .*s2 used 1"):
        tokenize_shard.run(cfg_of(tmp_path / "c", tmp_path / "s3", base=str(tmp_path / "s2"), **day3))
    written = json.loads((tmp_path / "s2" / "manifest.json").read_text())
    written["curation"]["signature_scheme"] = "an-older-scheme"
    (tmp_path / "s2" / "manifest.json").write_text(json.dumps(written))
    with pytest.raises(ConfigError, match="scheme an-older-scheme"):
        tokenize_shard.run(cfg_of(tmp_path / "c", tmp_path / "s3", base=str(tmp_path / "s2"), **kw))
