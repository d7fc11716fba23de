"""Data checks that gate the pipeline: ``lmpipe check-data --corpus URI | --shards URI``.

Exit 0 when every expectation passes, 1 when any fails (with a summary naming each failed
expectation and the offending file or shard and values). Results go to a run-scoped
folder next to what was checked (``<target>/_checks/<run_id>/``): ``result.json``, the GX
project with its stored validation results, and the rendered Data Docs site.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import field
from pathlib import Path

from lmpipe import config as cfglib
from lmpipe.config import stage_config
from lmpipe.corpus import CorpusConfig
from lmpipe.errors import ConfigError, CorpusError, LmpipeError
from lmpipe.log import log
from lmpipe.storage import LocalStore, StorageConfig, is_s3, join, open_store, split_uri

EXIT_FAILED = 1


@stage_config
class CheckConfig:
    corpus: str | None = None  # run the corpus suite on this URI ...
    shards: str | None = None  # ... or the shard suite on this shard-set prefix
    results: str | None = None  # default: <target>/_checks/<run_id>
    run_id: str | None = None
    # corpus suite
    min_documents: int = 1
    min_doc_chars: int = 1
    max_doc_chars: int = 1_000_000
    max_out_of_bounds_fraction: float = 0.05
    max_null_text_fraction: float = 0.01
    max_duplicate_rate: float = 0.2
    max_skipped_fraction: float = 0.05
    # shard suite
    min_validation_sequences: int = 1
    eos_rate_tolerance: float = 0.01
    workers: int = 4  # shards checked concurrently
    reader: CorpusConfig = field(default_factory=CorpusConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


def default_results(target: str, run_id: str, is_file: bool) -> str:
    base = split_uri(target)[0] if is_file else target.rstrip("/")
    return join(base, "_checks", run_id)


def run(cfg: CheckConfig) -> dict:
    """Run one suite; write result.json and Data Docs; return the result (``success`` inside)."""
    from lmpipe.checks import metrics, suites

    if bool(cfg.corpus) == bool(cfg.shards):
        raise ConfigError("give exactly one of --corpus URI or --shards URI")
    run_id = cfg.run_id or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(2)
    kind, target = ("corpus", cfg.corpus) if cfg.corpus else ("shards", cfg.shards)
    t0 = time.monotonic()
    log(f"check-data: {kind} suite on {target}")
    is_file = False
    if kind == "corpus":
        try:
            tables, is_file = metrics.corpus_tables(target, cfg)
        except CorpusError as exc:  # missing or empty corpus: a failed check with a report, not a crash
            tables = metrics.empty_corpus_tables(target, str(exc))
        exps = suites.corpus_expectations(cfg)
    else:
        store = open_store(target, cfg.storage)
        tables = metrics.shard_tables(store, cfg)
    measured = time.monotonic() - t0
    if kind == "shards":
        exps = suites.shard_expectations(cfg, _vocab(tables))
    results_uri = cfg.results or default_results(target, run_id, is_file)
    local = results_uri if not is_s3(results_uri) else tempfile.mkdtemp(prefix="lmpipe-checks-")
    local_dir = Path(LocalStore(local).root)
    if local_dir.exists() and not is_s3(results_uri):
        shutil.rmtree(local_dir)  # re-running a run id replaces its results (safe to clear and retry)
    local_dir.mkdir(parents=True, exist_ok=True)
    outcome = suites.run(kind, tables, exps, local_dir, run_id)
    result = {
        "kind": kind, "target": target, "run_id": run_id, "success": outcome.success,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": {"measure": round(measured, 2), "total": round(time.monotonic() - t0, 2)},
        "failed": outcome.failed, "expectations": outcome.expectations,
        "results_uri": results_uri, "data_docs": join(results_uri, "data_docs/index.html"),
        "config": cfglib.to_dict(cfg), "tables": metrics.to_json(tables),
    }
    (local_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    if is_s3(results_uri):
        out = open_store(results_uri, cfg.storage)
        out.delete_prefix("")
        for p in sorted(local_dir.rglob("*")):
            if p.is_file():
                out.put_file(p.relative_to(local_dir).as_posix(), p)
        shutil.rmtree(local_dir, ignore_errors=True)
    log(summary(result))
    return result


def _vocab(tables) -> int | None:
    v = tables["dataset"]["vocab_size"].iloc[0]
    return None if v is None or v != v else int(v)


def summary(result: dict) -> str:
    n = len(result["expectations"])
    head = (f"{result['kind']} checks {'PASSED' if result['success'] else 'FAILED'}: "
            f"{n - len(result['failed'])}/{n} expectations met on {result['target']}")
    lines = [head]
    for f in result["failed"]:
        col = f["kwargs"].get("column") or f"{f['kwargs'].get('column_A')} vs {f['kwargs'].get('column_B')}"
        lines.append(f"  FAILED {f['description']} [{f['expectation']} on {f['table']}.{col}]")
        for o in f["offending"][:10]:
            lines.append(f"    - {json.dumps(o, default=str)}")
        if f.get("unexpected_count") and f["unexpected_count"] > 10:
            lines.append(f"    ... {f['unexpected_count']} offending rows in all")
    lines.append(f"  result:    {join(result['results_uri'], 'result.json')}")
    lines.append(f"  data docs: {result['data_docs']}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--corpus", help="check a raw corpus (file, folder or prefix) before tokenization")
    g.add_argument("--shards", help="check a shard set (prefix with manifest.json) after tokenization")
    p.add_argument("--results", help="where to write results (default: <target>/_checks/<run_id>)")
    p.add_argument("--run-id", help="run id for the results folder (default: a timestamp)")
    p.add_argument("--config", help="YAML or JSON config (a 'check:' section is used if present)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="threshold overrides, e.g. max_duplicate_rate=0.1")


def config_from_args(args: argparse.Namespace) -> CheckConfig:
    flags = {"corpus": args.corpus, "shards": args.shards, "results": args.results, "run_id": args.run_id}
    return cfglib.from_cli(CheckConfig, args.config, args.overrides, flags, "check")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lmpipe check-data", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        result = run(config_from_args(args))
    except LmpipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0 if result["success"] else EXIT_FAILED
