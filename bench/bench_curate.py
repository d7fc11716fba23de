"""Benchmark: what curation costs. ``lmpipe tokenize`` with the ``web`` preset (language ID,
Gopher, C4, FineWeb, exact and near dedup) against tokenize alone (exact dedup only, as before
curation existed), and tokenize alone against raw ``tokenizers`` ``encode_batch``.

All of it runs in this one process, on the same generated web corpus
(:mod:`spark_jobs.curate.synthetic`), with the same tokenizer and the same cores. It also
times each web filter and the MinHash signatures alone on one core, over a sample of the
corpus, and from those the least the web run could cost if stage 1 did nothing else and
split perfectly over the cores (``web_preset_cpu_floor``). Prints one JSON line per result.

    .venv/bin/python bench/bench_curate.py [--docs 12000] [--work DIR]
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from lmpipe import config as cfglib
from spark_jobs import tokenize_shard
from spark_jobs.curate import filters, neardup, synthetic
from spark_jobs.curate.base import Doc

import benchlib


def emit(**kw) -> None:
    print(json.dumps({"bench": "curate", **kw}), flush=True)


def lmpipe_run(work: Path, tok_path: Path, name: str, curate: dict, cores: int) -> tuple[float, dict]:
    cfg = cfglib.build(tokenize_shard.TokenizeConfig, {
        "corpus": str(work / "corpus"), "out": str(work / f"shards-{name}"), "seq_len": 1024, "overwrite": True,
        "spark_master": f"local[{cores}]", "tokenizer": {"path": str(tok_path)}, "curate": curate})
    t0 = time.perf_counter()
    m = tokenize_shard.run(cfg)
    return time.perf_counter() - t0, m


def one_core_costs(texts: list[str], sample_mb: float) -> dict[str, float]:
    """Seconds per MB on one core of each web filter alone (every document of a sample, kept
    or not) and of the signatures with their band keys, in the batches stage 1 uses."""
    sample, size = [], 0
    for t in texts[:: max(1, len(texts) // 20000)]:
        sample.append(t)
        size += len(t.encode())
        if size >= sample_mb * 1e6:
            break
    costs = {}
    for f in filters.build("web", ["en"]):
        f.apply(Doc(sample[0]))  # loads the language model
        t0 = time.perf_counter()
        for t in sample:
            f.apply(Doc(t))
        costs[f.name] = (time.perf_counter() - t0) / (size / 1e6)
    cfg = neardup.NearDedupConfig()
    t0 = time.perf_counter()
    for at in range(0, len(sample), 1024):
        neardup.band_key_matrix(neardup.signatures(sample[at : at + 1024], cfg), cfg)
    costs["signatures"] = (time.perf_counter() - t0) / (size / 1e6)
    return costs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=12000)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--sample-mb", type=float, default=8.0, help="corpus sample for the one-core filter costs")
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="lmpipe-bench-curate-"))
    if not (work / "corpus").exists():
        n = args.docs
        synthetic.generate(work, docs=n, near=n // 20, similar=n // 40, foreign=n // 40, contaminated=0, seed=1)
    texts = benchlib.texts_of(work / "corpus")
    mb = sum(len(t.encode()) for t in texts) / 1e6
    tok_path, tok = benchlib.tokenizer(work, texts, args.vocab_size)
    cores = os.cpu_count()

    raw_s, _ = benchlib.raw_encode(tok, texts)
    alone = {"filters": "none", "near_dedup": {"enabled": False}}
    lmpipe_run(work, tok_path, "warmup", alone, cores)  # JVM, caches
    alone_s, _ = lmpipe_run(work, tok_path, "alone", alone, cores)
    web_s, m = lmpipe_run(work, tok_path, "web", {"filters": "web"}, cores)
    near_s, _ = lmpipe_run(work, tok_path, "near", {"filters": "none"}, cores)
    costs = one_core_costs(texts, args.sample_mb)
    removed = {s["step"]: s["removed"] for s in m["curation"]["funnel"]}
    common = {"corpus_mb": round(mb, 1), "documents": len(texts), "cores": cores}
    emit(metric="raw_encode_batch", seconds=round(raw_s, 2), **common)
    emit(metric="tokenize_alone", seconds=round(alone_s, 2), includes="spark start, read, exact dedup, tokenize, "
         "pack, write, manifest", **common)
    emit(metric="tokenize_vs_raw", ratio=round(raw_s / alone_s, 3), goal=0.7, **common)
    emit(metric="near_dedup_plus_tokenize", seconds=round(near_s, 2), cost_ratio=round(near_s / alone_s, 3), **common)
    emit(metric="web_preset_plus_tokenize", seconds=round(web_s, 2), cost_ratio=round(web_s / alone_s, 3), goal=1.5,
         removed=removed, **common)
    for name, s_per_mb in costs.items():
        emit(metric="one_core_cost", step=name, mb_per_s=round(1 / s_per_mb, 2), sample_mb=args.sample_mb)
    floor_s = alone_s + sum(costs.values()) * mb / cores
    emit(metric="web_preset_cpu_floor", seconds=round(floor_s, 2), cost_ratio=round(floor_s / alone_s, 3),
         includes="tokenize alone plus the web filters' and signatures' one-core time over the corpus, split "
         "evenly over the cores", **common)


if __name__ == "__main__":
    main()
