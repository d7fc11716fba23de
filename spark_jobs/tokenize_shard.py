"""Spark job: tokenize a corpus and pack it into fixed-length Parquet shards.

    spark-submit --master spark://host:7077 spark_jobs/tokenize_shard.py \\
        --corpus s3://bucket/corpus/ --out s3://bucket/shards/run1 [--config F] [key=value ...]

The same flags as ``lmpipe tokenize``. The work is in :mod:`spark_jobs.driver` (planning,
tokenizer, manifest) and :mod:`spark_jobs.worker` (what runs on the executors).
"""

from __future__ import annotations

import argparse
import sys

from lmpipe import config as cfglib
from spark_jobs.config import TokenizeConfig
from spark_jobs.driver import run

__all__ = ["TokenizeConfig", "add_arguments", "config_from_args", "main", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", help="corpus file, folder or prefix: local, file:// or s3:// (corpus)")
    p.add_argument("--out", help="output prefix for shards and manifest: local, file:// or s3:// (out)")
    p.add_argument("--vocab-size", type=int, help="vocab size of the BPE tokenizer to train (tokenizer.vocab_size)")
    p.add_argument("--seq-len", type=int, help="tokens per training sequence; each row holds seq_len + 1 (seq_len)")
    p.add_argument("--tokenizer", help="an existing tokenizer.json to use instead of training one (tokenizer.path)")
    p.add_argument("--base", help="a previous shard set of this corpus: tokenize only new files and merge (base)")
    p.add_argument("--spark-master", help="local[*], spark://host:7077, k8s://... (spark_master)")
    p.add_argument("--config", help="YAML or JSON config: tokenize keys, or a run config whose 'tokenize' section is used")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. reader.text_field=body")


def config_from_args(args: argparse.Namespace) -> TokenizeConfig:
    flags = {"corpus": args.corpus, "out": args.out, "tokenizer.vocab_size": args.vocab_size,
             "seq_len": args.seq_len, "tokenizer.path": args.tokenizer, "spark_master": args.spark_master, "base": args.base}
    return cfglib.from_cli(TokenizeConfig, args.config, args.overrides, flags, "tokenize")


def main(argv: list[str] | None = None) -> int:
    """``lmpipe tokenize`` with these arguments: the same checks, output and exit codes."""
    from lmpipe.cli import main as lmpipe_main

    return lmpipe_main(["tokenize", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
