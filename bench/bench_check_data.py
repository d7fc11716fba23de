"""Benchmark: the shard checks (``lmpipe check-data --shards``) against ``lmpipe tokenize``
on the same corpus (>= 50 MB). Both run in this process; one JSON line per result.

    .venv/bin/python bench/bench_check_data.py [--corpus-mb 60] [--work DIR]
"""

import argparse
import os
import json
import tempfile
import time
from pathlib import Path

from data_checks import check_data
from lmpipe import config as cfglib
from spark_jobs import demo_corpus, tokenize_shard


def emit(**kw) -> None:
    print(json.dumps({"bench": "check_data", **kw}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus-mb", type=float, default=60)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="lmpipe-bench-"))
    corpus = work / "corpus"
    if not corpus.exists():
        demo_corpus.write(str(corpus), args.corpus_mb, ("docs", "stdlib", "site-packages"))
    mb = sum(p.stat().st_size for p in corpus.glob("*.jsonl")) / 1e6
    cores = os.cpu_count()

    cfg = cfglib.build(tokenize_shard.TokenizeConfig, {
        "corpus": str(corpus), "out": str(work / "shards"), "seq_len": 1024, "overwrite": True,
        "spark_master": f"local[{cores}]", "tokenizer": {"vocab_size": 8192, "train_sample_mb": 16}})
    t0 = time.perf_counter()
    m = tokenize_shard.run(cfg)
    tok_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    result = check_data.run(cfglib.build(check_data.CheckConfig, {"shards": str(work / "shards"), "run_id": "bench"}))
    check_s = time.perf_counter() - t0
    assert result["success"], result["failed"]
    shard_mb = sum(s["bytes"] for sp in m["splits"].values() for s in sp["shards"]) / 1e6

    emit(metric="tokenize", seconds=round(tok_s, 2), corpus_mb=round(mb, 1), cores=cores,
         includes="spark start, tokenizer training, dedup, tokenize, pack, write, manifest")
    emit(metric="check_shards", seconds=round(check_s, 2), measure_seconds=result["seconds"]["measure"],
         shards_mb=round(shard_mb, 1), shards=sum(len(sp["shards"]) for sp in m["splits"].values()),
         includes="sha256 + Parquet scan of every shard, GX suites, Data Docs build")
    emit(metric="check_cost_ratio", ratio=round(check_s / tok_s, 3), goal="<= 0.25", stretch="<= 0.10")


if __name__ == "__main__":
    main()
