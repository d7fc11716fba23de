"""Benchmark: what curation costs. ``lmpipe tokenize`` with the ``web`` preset (language ID,
Gopher, C4, FineWeb, exact and near dedup) against tokenize alone (exact dedup only, as before
curation existed), and tokenize alone against raw ``tokenizers`` ``encode_batch``.

All three run in this one process, on the same generated web corpus
(:mod:`spark_jobs.curate.synthetic`), with the same tokenizer and the same cores. Prints one
JSON line per result.

    .venv/bin/python bench/bench_curate.py [--docs 12000] [--work DIR]
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from lmpipe import config as cfglib
from spark_jobs import tokenize_shard, worker
from spark_jobs import tokenizer as toklib
from spark_jobs.curate import synthetic


def emit(**kw) -> None:
    print(json.dumps({"bench": "curate", **kw}), flush=True)


def lmpipe_run(work: Path, tok_path: Path, name: str, curate: dict, cores: int) -> tuple[float, dict]:
    cfg = cfglib.build(tokenize_shard.TokenizeConfig, {
        "corpus": str(work / "corpus"), "out": str(work / f"shards-{name}"), "seq_len": 1024, "overwrite": True,
        "spark_master": f"local[{cores}]", "tokenizer": {"path": str(tok_path)}, "curate": curate})
    t0 = time.perf_counter()
    m = tokenize_shard.run(cfg)
    return time.perf_counter() - t0, m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=12000)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="lmpipe-bench-curate-"))
    if not (work / "corpus").exists():
        n = args.docs
        synthetic.generate(work, docs=n, near=n // 20, similar=n // 40, foreign=n // 40, contaminated=0, seed=1)
    with open(work / "corpus" / "corpus.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    tok_path = work / "tokenizer.json"
    if not tok_path.exists():
        tok = toklib.train(iter(texts[: len(texts) // 4]),
                           cfglib.build(toklib.TokenizerConfig, {"vocab_size": args.vocab_size}))
        tok_path.write_text(tok.to_str())
    tok = toklib.from_json(tok_path.read_text())
    cores = os.cpu_count()

    t0 = time.perf_counter()
    for i in range(0, len(texts), worker.DOC_BATCH):
        tok.encode_batch_fast(texts[i : i + worker.DOC_BATCH], add_special_tokens=False)
    raw_s = time.perf_counter() - t0
    lmpipe_run(work, tok_path, "warmup", {"filters": "none", "near_dedup": {"enabled": False}}, cores)  # JVM, caches
    alone_s, _ = lmpipe_run(work, tok_path, "alone", {"filters": "none", "near_dedup": {"enabled": False}}, cores)
    web_s, m = lmpipe_run(work, tok_path, "web", {"filters": "web"}, cores)
    near_s, _ = lmpipe_run(work, tok_path, "near", {"filters": "none"}, cores)
    removed = {s["step"]: s["removed"] for s in m["curation"]["funnel"]}
    common = {"corpus_mb": round(mb, 1), "documents": len(texts), "cores": cores}
    emit(metric="raw_encode_batch", seconds=round(raw_s, 2), **common)
    emit(metric="tokenize_alone", seconds=round(alone_s, 2), includes="spark start, read, exact dedup, tokenize, "
         "pack, write, manifest", **common)
    emit(metric="tokenize_vs_raw", ratio=round(raw_s / alone_s, 3), goal=0.7, **common)
    emit(metric="near_dedup_plus_tokenize", seconds=round(near_s, 2), cost_ratio=round(near_s / alone_s, 3), **common)
    emit(metric="web_preset_plus_tokenize", seconds=round(web_s, 2), cost_ratio=round(web_s / alone_s, 3), goal=1.5,
         removed=removed, **common)


if __name__ == "__main__":
    main()
