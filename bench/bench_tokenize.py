"""Benchmark: ``lmpipe tokenize`` end to end against raw ``tokenizers`` ``encode_batch``.

Both run in this one process, on the same corpus (>= 50 MB), with the same
tokenizer and the same cores. lmpipe's time includes everything a user waits for:
Spark start, reading, dedup shuffle, tokenizing, packing, writing shards, manifest.
Prints one JSON line per result.

    .venv/bin/python bench/bench_tokenize.py [--corpus-mb 60] [--work DIR]
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from lmpipe import config as cfglib
from spark_jobs import demo_corpus, tokenize_shard

import benchlib


def emit(**kw) -> None:
    print(json.dumps({"bench": "tokenize", **kw}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus-mb", type=float, default=200)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="lmpipe-bench-"))
    corpus_uri = str(work / "corpus")
    if not (work / "corpus").exists():
        demo_corpus.write(corpus_uri, args.corpus_mb, ("docs", "stdlib", "site-packages"))
    texts = benchlib.texts_of(work / "corpus")
    mb = sum(len(t.encode()) for t in texts) / 1e6
    tok_path, tok = benchlib.tokenizer(work, texts, args.vocab_size)
    cores = os.cpu_count()
    raw_s, raw_tokens = benchlib.raw_encode(tok, texts)  # same documents, same batch size, all cores

    cfg = cfglib.build(tokenize_shard.TokenizeConfig, {
        "corpus": corpus_uri, "out": str(work / "shards"), "seq_len": 1024, "overwrite": True,
        "spark_master": f"local[{cores}]", "tokenizer": {"path": str(tok_path)},
        "curate": {"filters": "none", "near_dedup": {"enabled": False}},  # tokenize alone: bench_curate adds curation
    })
    t0 = time.perf_counter()
    m = tokenize_shard.run(cfg)
    lm_s = time.perf_counter() - t0
    lm_tokens = sum(m["splits"][s]["document_tokens"] for s in ("train", "validation"))

    emit(metric="raw_encode_batch", tokens=raw_tokens, seconds=round(raw_s, 2), tokens_per_s=round(raw_tokens / raw_s),
         corpus_mb=round(mb, 1), cores=cores)
    emit(metric="lmpipe_tokenize", tokens=lm_tokens, seconds=round(lm_s, 2), tokens_per_s=round(lm_tokens / lm_s),
         corpus_mb=round(mb, 1), cores=cores, includes="spark start, read, dedup, tokenize, pack, write, manifest")
    emit(metric="throughput_ratio", ratio=round((lm_tokens / lm_s) / (raw_tokens / raw_s), 3), goal=0.7, stretch=0.85)


if __name__ == "__main__":
    main()
