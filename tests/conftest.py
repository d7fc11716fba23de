"""Shared fixtures: a real S3 endpoint on loopback (moto's server) and small corpora."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The DAGs' task bodies live in a package in the DAG folder, which Airflow puts on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dags"))

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("LMPIPE_PROGRESS_S", "30")
# Fake credentials for the moto server, set before any Spark JVM starts: Spark's Python
# workers inherit the environment of the JVM, as executors on a cluster use their own.
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
for _var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_URI"):
    os.environ.pop(_var, None)
# Each test session gets its own pipeline home (MLflow store, run staging); subprocesses inherit it.
os.environ["LMPIPE_HOME"] = tempfile.mkdtemp(prefix="lmpipe-test-home-")


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 (random port)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint, request):
    """A fresh bucket on the moto server; returns its name."""
    import boto3

    import re
    import uuid

    name = f"lmpipe-{uuid.uuid4().hex[:8]}-" + re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower())[:40].strip("-")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def storage_cfg(s3_endpoint):
    from lmpipe.storage import StorageConfig

    return StorageConfig(endpoint_url=s3_endpoint, multipart_threshold_mb=5, multipart_chunk_mb=5)


def write_jsonl(path: Path, docs: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write((d if isinstance(d, str) else json.dumps(d)) + "\n")
    return path


@pytest.fixture(scope="session")
def demo_corpus_dir(tmp_path_factory) -> Path:
    """~2.5 MB of real text (Python's docs and stdlib) in one JSONL file."""
    from spark_jobs import demo_corpus

    out = tmp_path_factory.mktemp("demo") / "corpus"
    demo_corpus.write(str(out), 2.5)
    return out


@pytest.fixture(scope="session")
def real_shards(tmp_path_factory, demo_corpus_dir) -> Path:
    """Real shards from the Spark job on the demo corpus (never modify: copy first)."""
    from lmpipe import config
    from spark_jobs import tokenize_shard

    out = tmp_path_factory.mktemp("real") / "shards"
    tokenize_shard.run(config.build(tokenize_shard.TokenizeConfig, {
        "corpus": str(demo_corpus_dir), "out": str(out), "seq_len": 64, "spark_master": "local[2]",
        "shard_sequences": 500, "validation_fraction": 0.1, "partition_mb": 1,
        "tokenizer": {"vocab_size": 400, "train_sample_mb": 1}}))
    return out


DEMO_LABELS = ("Airflow UI:", "MLflow UI:", "Models:", "Serve it:")


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """``make demo`` once, in a fresh LMPIPE_HOME: the README's first command, whose
    ``airflow dags test`` run of lm_pipeline on the stages' defaults is also what
    test_pipeline_dag checks end to end. Tests only read what it left."""
    import subprocess

    home = tmp_path_factory.mktemp("demo") / "lmpipe"
    env = {**os.environ, "LMPIPE_HOME": str(home), "DEMO_MB": "1", "DEMO_STEPS": "4"}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run(["make", "-C", str(REPO), "demo", f"PYTHON={sys.executable}"], env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    printed = {}
    for line in r.stdout.splitlines():
        for label in DEMO_LABELS:
            if line.startswith(label):
                printed[label] = line[len(label):].strip()
    assert set(printed) == set(DEMO_LABELS), r.stdout[-3000:]
    return {"home": home, "out": r.stdout, "log": r.stdout + r.stderr, "commands": printed,
            "shell_home": home.parent}


@pytest.fixture(scope="session", autouse=True)
def _stop_spark_at_exit():
    """Stop the shared local Spark session cleanly (py4j otherwise logs to closed streams)."""
    yield
    import sys

    if "pyspark" in sys.modules:
        from pyspark.sql import SparkSession

        active = SparkSession.getActiveSession()
        if active is not None:
            active.stop()


# The hostile records, as raw JSONL lines, by the reason each must be counted under. The
# expected counts are these lists' lengths: nothing here calls the reader.
HOSTILE_LINES = {
    "invalid_unicode": [rb'{"id": "s1", "text": "lone \ud800 high"}', rb'{"id": "s2", "text": "lone \udfff low"}',
                        rb'{"id": "s3", "text": "reversed \udc00\ud800 pair"}'],
    "nul_character": [rb'{"id": "z1", "text": "a\u0000b"}', b'{"id": "z2", "text": "tail\\u0000"}'],
    "text_not_string": [b'{"id": "w1", "text": ["a", "list"]}', b'{"id": "w2", "text": {"a": 1}}',
                        b'{"id": "w3", "text": true}'],
    "not_an_object": [b'"just a string"', b"12345"],
    "unparseable_json": [b'{"id": "t1", "text": "truncated', b'{"id": "t2", "n": ' + b"9" * 5000 + b"}"],
    "nested_too_deep": [b'{"id": "d1", "text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"],
    "invalid_utf8": [b'{"id": "u1", "text": "\xc3\x28 bad byte"}'],
    "line_too_long": [b'{"id": "l1", "text": "' + b"x" * (3 << 20) + b'"}'],  # over max_line_mb=2
}
HOSTILE_READER = {"max_line_mb": 2, "max_bad_files": 1}


def write_hostile_corpus(root: Path, good: int = 40) -> dict:
    """A corpus folder of good documents with every hostile record among them, one file with a
    BOM (readable), and one corrupt gzip file (unreadable). Returns what a reader must find."""
    root.mkdir(parents=True, exist_ok=True)
    docs = [json.dumps({"id": f"g{i}", "text": f"good document {i} about rivers and hills " * 12}).encode()
            for i in range(good)]
    hostile = [line for lines in HOSTILE_LINES.values() for line in lines]
    mixed = [x for pair in zip(docs, hostile + [b""] * len(docs)) for x in pair if x]  # interleaved
    (root / "a-mixed.jsonl").write_bytes(b"\n".join(mixed) + b"\n")
    bom = json.dumps({"id": "bom", "text": "a document saved with a byte order mark " * 12}).encode()
    (root / "b-bom.jsonl").write_bytes(b"\xef\xbb\xbf" + bom + b"\n")
    (root / "c-broken.jsonl.gz").write_bytes(b"this is not gzip data\n" * 50)  # unreadable from its first byte
    return {"skipped": {k: len(v) for k, v in HOSTILE_LINES.items()} | {"unreadable_file": 1},
            "used": good + 1, "unreadable": ["c-broken.jsonl.gz"]}
