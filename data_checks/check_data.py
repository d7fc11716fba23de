"""Data checks that gate the pipeline: ``lmpipe check-data --corpus URI | --shards URI``.

Exit 0 when every expectation passes, 5 when any fails (with a summary naming each failed
expectation and the offending file or shard and values). Results go to a run-scoped
folder next to what was checked (``<target>/_checks/<run_id>/``) or to ``results``:
``result.json``, the GX project with its stored validation results, and the rendered Data
Docs site. A run config sets both targets (the ``check`` section serves both gates of
``lm_pipeline``); ``suite`` then says which gate runs, into ``<results>/<suite>``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import secrets
import shutil
import tempfile
import time
from dataclasses import field
from pathlib import Path
from typing import Literal

from lmpipe import config as cfglib
from lmpipe.config import stage_config
from lmpipe.errors import ConfigError, CorpusError, ExitCode
from lmpipe.log import log
from lmpipe.storage import LocalStore, StorageConfig, is_s3, join, open_store, split_uri
from spark_jobs.corpus import CorpusConfig

EXIT_FAILED = ExitCode.CHECKS_FAILED


@stage_config
class CheckConfig:
    corpus: str | None = None  # the corpus suite checks this URI ...
    shards: str | None = None  # ... the shard suite this shard-set prefix
    suite: Literal["corpus", "shards"] | None = None  # which one runs; needed only when both targets are set
    # Default: <target>/_checks/<run_id>; with both targets set, each suite writes <results>/<suite>.
    results: str | None = None
    run_id: str | None = None  # names the results folder; default: a timestamp
    # corpus suite
    min_documents: int = 1
    min_doc_chars: int = 1  # document length bounds, in characters
    max_doc_chars: int = 1_000_000  # document length bounds, in characters
    max_out_of_bounds_fraction: float = 0.05  # share of documents allowed outside the length bounds
    max_null_text_fraction: float = 0.01  # share of records allowed with a null text
    max_duplicate_rate: float = 0.2  # share of exact duplicates allowed
    max_skipped_fraction: float = 0.05  # share of skipped or invalid records allowed
    # shard suite
    min_validation_sequences: int = 1
    eos_rate_tolerance: float = 0.01  # relative tolerance of EOS per sequence around the corpus-derived rate
    workers: int = 4  # shards checked concurrently
    # shard suite, on the manifest's curation funnel: the share of the documents reaching a step
    # that it may remove (the reader is bound by max_skipped_fraction, exact_dedup by max_duplicate_rate)
    max_removed_fraction: float = 0.5
    max_removed_fraction_by_step: dict[str, float] = field(default_factory=dict)  # e.g. {language: 0.8}
    max_contaminated_documents: int = 0  # documents sharing an n-gram with the evaluation texts
    min_kept_language_share: float = 0.5  # share of language-identified documents in curate.languages
    reader: CorpusConfig = field(default_factory=CorpusConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


def results_for(cfg: CheckConfig, kind: str) -> str | None:
    """Where ``kind``'s results go when ``results`` is set: itself, or ``<results>/<kind>`` when
    the config names both targets (one results folder for both gates of a run)."""
    if not cfg.results:
        return None
    return join(cfg.results, kind) if cfg.corpus and cfg.shards else cfg.results


def default_results(target: str, run_id: str, is_file: bool) -> str:
    base = split_uri(target)[0] if is_file else target.rstrip("/")
    return join(base, "_checks", run_id)


MARKER = ".lmpipe-results"  # written first into a results folder: lmpipe's own, even half-written


def guard_results(uri: str, storage) -> None:
    """A results folder is replaced on a re-run, so it must be new, empty, or lmpipe's own
    (it holds the marker lmpipe writes first, or a ``result.json``): anything else at ``uri``
    is refused before any work."""
    if not is_s3(uri) and Path(LocalStore(uri).root).is_file():
        raise ConfigError(f"config key 'results' is {uri}, which is a file: give a folder")
    store = open_store(uri, storage)
    if store.exists(MARKER) or store.exists("result.json") or not store.list(""):
        return
    raise ConfigError(f"config key 'results' is {uri}, which holds files lmpipe did not write (no result.json): "
                      "give a new or empty folder; nothing there was changed")


def suite_and_target(cfg: CheckConfig) -> tuple[str, str]:
    """Which suite runs, on which URI."""
    targets = {k: v for k, v in (("corpus", cfg.corpus), ("shards", cfg.shards)) if v}
    if cfg.suite:
        if cfg.suite not in targets:
            raise ConfigError(f"config key 'suite' is {cfg.suite!r} but config key {cfg.suite!r} is not set")
        return cfg.suite, targets[cfg.suite]
    if len(targets) != 1:
        raise ConfigError("give exactly one of --corpus URI or --shards URI (or --suite, when a run config sets both)")
    return next(iter(targets.items()))


def run(cfg: CheckConfig) -> dict:
    """Run one suite; write result.json and Data Docs; return the result (``success`` inside)."""
    from data_checks import metrics, suites

    kind, target = suite_and_target(cfg)
    if cfg.results:
        guard_results(results_for(cfg, kind), cfg.storage)
    run_id = cfg.run_id or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + secrets.token_hex(2)
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
    results_uri = results_for(cfg, kind) or default_results(target, run_id, is_file)
    local = results_uri if not is_s3(results_uri) else tempfile.mkdtemp(prefix="lmpipe-checks-")
    local_dir = Path(LocalStore(local).root)
    if local_dir.exists() and not is_s3(results_uri):
        shutil.rmtree(local_dir)  # re-running a run id replaces its results (safe to clear and retry)
    local_dir.mkdir(parents=True, exist_ok=True)
    (local_dir / MARKER).write_text("")
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
        out.put_bytes(MARKER, b"")  # first: a retry after a cut-short upload may replace the rest
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
    g = p.add_mutually_exclusive_group()
    g.add_argument("--corpus", help="check a raw corpus (file, folder or prefix) before tokenization (corpus)")
    g.add_argument("--shards", help="check a shard set (prefix with manifest.json) after tokenization (shards)")
    g.add_argument("--suite", choices=["corpus", "shards"], help="which target of the config to check (suite)")
    p.add_argument("--results", help="where to write results (default: <target>/_checks/<run_id>)")
    p.add_argument("--run-id", help="run id for the results folder (default: a timestamp)")
    p.add_argument("--config", help="YAML or JSON config: check keys, or a run config whose 'check' section is used")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="threshold overrides, e.g. max_duplicate_rate=0.1")


def config_from_args(args: argparse.Namespace) -> CheckConfig:
    flags = {"corpus": args.corpus, "shards": args.shards, "suite": args.suite, "results": args.results,
             "run_id": args.run_id}
    if args.corpus or args.shards:  # a target given on the command line is the one to check
        flags["suite"] = "corpus" if args.corpus else "shards"
    return cfglib.from_cli(CheckConfig, args.config, args.overrides, flags, "check")
