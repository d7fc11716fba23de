"""The Great Expectations 1.x suites, run on the fact tables from ``metrics``, with Data Docs.

Each table gets its own suite and ValidationDefinition in a file-backed GX context kept in
the results folder, so a user can open the context, the stored results, and the rendered
Data Docs site, which shows every expectation, failed ones first, with the offending rows.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lmpipe import settings

if settings.get("GX_ANALYTICS_ENABLED") is None:
    os.environ["GX_ANALYTICS_ENABLED"] = "false"

# The column that names the offending row in each table.
KEYS = {"files": "file", "shards": "path", "splits": "split", "curation": "step", "dataset": None}


@dataclass
class Outcome:
    success: bool
    failed: list[dict]
    expectations: list[dict]
    data_docs_index: Path


def corpus_expectations(cfg) -> dict[str, list]:
    import great_expectations.expectations as gxe

    bad = cfg.reader.max_bad_files
    unreadable = "Every corpus file can be read" if bad == 0 else f"At most {bad} corpus file(s) cannot be read"

    return {
        "dataset": [
            gxe.ExpectColumnValuesToBeBetween(column="usable_documents", min_value=cfg.min_documents,
                                              description=f"At least {cfg.min_documents} usable document(s)"),
            gxe.ExpectColumnValuesToBeBetween(column="null_text_fraction", max_value=cfg.max_null_text_fraction,
                                              description=f"Text is not null (at most {cfg.max_null_text_fraction:.2%} of records)"),
            gxe.ExpectColumnValuesToBeBetween(
                column="out_of_bounds_fraction", max_value=cfg.max_out_of_bounds_fraction,
                description=f"Document length within [{cfg.min_doc_chars}, {cfg.max_doc_chars}] chars "
                            f"(at most {cfg.max_out_of_bounds_fraction:.2%} outside)"),
            gxe.ExpectColumnValuesToBeBetween(column="duplicate_rate", max_value=cfg.max_duplicate_rate,
                                              description=f"Exact-duplicate rate at most {cfg.max_duplicate_rate:.2%}"),
            gxe.ExpectColumnValuesToBeBetween(column="skipped_fraction", max_value=cfg.max_skipped_fraction,
                                              description=f"Skipped or invalid records at most {cfg.max_skipped_fraction:.2%}"),
            gxe.ExpectColumnValuesToBeBetween(column="unreadable_files", max_value=cfg.reader.max_bad_files,
                                              description=unreadable),
        ],
        "files": [
            *([gxe.ExpectColumnValuesToBeInSet(column="readable", value_set=[True], description=unreadable)]
              if cfg.reader.max_bad_files == 0 else []),
            gxe.ExpectColumnValuesToBeBetween(column="null_text_fraction", max_value=cfg.max_null_text_fraction,
                                              description="Per file: text is not null"),
            gxe.ExpectColumnValuesToBeBetween(column="skipped_fraction", max_value=cfg.max_skipped_fraction,
                                              description="Per file: skipped or invalid records within the threshold"),
            gxe.ExpectColumnValuesToBeBetween(column="out_of_bounds_fraction", max_value=cfg.max_out_of_bounds_fraction,
                                              description="Per file: document lengths within bounds"),
        ],
    }


def shard_expectations(cfg, vocab_size: int | None) -> dict[str, list]:
    import great_expectations.expectations as gxe

    def is_true(col: str, text: str):
        return gxe.ExpectColumnValuesToBeInSet(column=col, value_set=[True], description=text)

    shards = [
        is_true("listed_in_manifest", "Every shard file is listed in the manifest"),
        is_true("exists", "Every shard listed in the manifest exists"),
        is_true("readable", "Every shard is a readable Parquet file with an integer input_ids list column"),
        is_true("sha256_matches", "Every shard's sha256 matches the manifest"),
        is_true("bytes_match", "Every shard's byte size matches the manifest"),
        is_true("sequences_match", "Every shard's sequence count matches the manifest"),
        is_true("tokens_match", "Every shard's token count matches the manifest"),
        gxe.ExpectColumnValuesToBeBetween(column="bad_length_rows", max_value=0,
                                          description="Every input_ids row has length exactly seq_len + 1"),
        gxe.ExpectColumnValuesToBeBetween(column="sequences", min_value=1, description="No empty shard"),
        gxe.ExpectColumnValuesToBeBetween(column="min_token_id", min_value=0, description="No negative token id"),
    ]
    if vocab_size:
        shards.append(gxe.ExpectColumnValuesToBeBetween(
            column="max_token_id", min_value=0, max_value=vocab_size - 1,
            description=f"Every token id is in [0, vocab_size={vocab_size})"))
    return {
        "dataset": [
            is_true("manifest_exists", "The manifest exists"),
            is_true("manifest_valid", "The manifest's schema is valid"),
            is_true("tokenizer_sha256_matches", "The tokenizer file's sha256 matches the manifest"),
            gxe.ExpectColumnValuesToBeBetween(column="validation_sequences", min_value=cfg.min_validation_sequences,
                                              description="The validation split is non-empty"),
            gxe.ExpectColumnValuesToBeBetween(
                column="contaminated_documents", max_value=cfg.max_contaminated_documents,
                description=f"At most {cfg.max_contaminated_documents} document(s) share an n-gram with the "
                            "evaluation texts (curate.decontaminate)"),
            gxe.ExpectColumnValuesToBeBetween(
                column="kept_language_share", min_value=cfg.min_kept_language_share,
                description=f"At least {cfg.min_kept_language_share:.0%} of the documents are in a kept language"),
        ],
        "curation": [
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A="max_removed_fraction", column_B="removed_fraction", or_equal=True,
                description="Each curation step removes at most its bound's share of the documents reaching it"),
        ],
        "splits": [
            gxe.ExpectColumnPairValuesToBeEqual(column_A="sequences_manifest", column_B="sequences_in_shards",
                                                description="Split sequence totals equal the sum over its shards"),
            gxe.ExpectColumnPairValuesToBeEqual(column_A="tokens_manifest", column_B="tokens_in_shards",
                                                description="Split token totals equal the sum over its shards"),
            gxe.ExpectColumnPairValuesToBeEqual(column_A="sequences_manifest", column_B="shards_sum_sequences_manifest",
                                                description="The manifest's split totals add up"),
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A="eos_per_sequence", column_B="eos_rate_min", or_equal=True,
                description=f"EOS per sequence is at least the corpus-derived minimum (tolerance {cfg.eos_rate_tolerance:.0%})"),
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A="eos_rate_max", column_B="eos_per_sequence", or_equal=True,
                description=f"EOS per sequence is at most the corpus-derived maximum (tolerance {cfg.eos_rate_tolerance:.0%})"),
        ],
        "shards": shards,
    }


def run(kind: str, tables: dict[str, pd.DataFrame], expectations: dict[str, list], results_dir: Path,
        run_id: str) -> Outcome:
    """Validate every table with its suite; build the Data Docs site under ``results_dir/data_docs``."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    context = gx.get_context(mode="file", project_root_dir=str(results_dir))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if "local_site" in context.list_data_docs_sites():
        context.delete_data_docs_site("local_site")
    docs = results_dir / "data_docs"
    context.add_data_docs_site(site_name="lmpipe", site_config={
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs)},
    })
    source = context.data_sources.add_pandas(name="lmpipe")
    import datetime as dt

    # The "lmpipe-" prefix keeps GX's renderer from parsing the run name as a date
    # (a run id like 20261122T115134Z-f00c crashes its page-title logic).
    rid = RunIdentifier(run_name=f"lmpipe-{run_id}", run_time=dt.datetime.now(dt.timezone.utc))
    failed, summary = [], []
    for table, exps in expectations.items():
        df = tables[table]
        asset = source.add_dataframe_asset(name=f"{kind}_{table}")
        batch = asset.add_batch_definition_whole_dataframe(name="whole_table")
        suite = context.suites.add(gx.ExpectationSuite(name=f"lmpipe_{kind}_{table}"))
        for e in exps:
            suite.add_expectation(e)
        vd = context.validation_definitions.add(gx.ValidationDefinition(name=f"{kind}_{table}", data=batch, suite=suite))
        fmt = {"result_format": "COMPLETE"}
        if KEYS[table]:
            # a shard read where its manifest entry says it lives is also named by that URL
            fmt["unexpected_index_column_names"] = [KEYS[table], *(["url"] if "url" in df.columns else [])]
        res = vd.run(batch_parameters={"dataframe": df}, result_format=fmt, run_id=rid)
        for r in res.results:
            item = _describe(table, r, df)
            summary.append(item)
            if not item["success"]:
                failed.append(item)
    context.build_data_docs(site_names=["lmpipe"])
    from data_checks.offline_docs import localize

    localize(docs)
    if len(tables.get("curation", ())):
        _funnel_chart(docs, tables["curation"])
    return Outcome(not failed, failed, summary, docs / "index.html")


def _funnel_chart(docs: Path, funnel: pd.DataFrame) -> None:
    """The curation funnel as a chart at the top of the Data Docs index."""
    import re

    from lmpipe.charts import funnel_png

    funnel_png(int(funnel["documents_before"].iloc[0]), list(zip(funnel["step"], funnel["removed"].astype(int))),
               docs / "funnel.png")
    index = docs / "index.html"
    section = ('<div class="container-fluid" id="curation-funnel"><h4>Curation funnel of these shards</h4>'
               '<img src="funnel.png" alt="curation funnel" style="max-width:100%"></div>')
    index.write_text(re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + section, index.read_text(encoding="utf-8"),
                            count=1), encoding="utf-8")


def _describe(table: str, r, df: pd.DataFrame) -> dict:
    cfg = r.expectation_config
    kw = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format")}
    res = r.result or {}
    item = {"table": table, "expectation": cfg.type, "description": cfg.description, "kwargs": _plain(kw),
            "success": bool(r.success), "observed": _plain(res.get("observed_value")),
            "unexpected_count": res.get("unexpected_count"), "offending": []}
    key = KEYS[table]
    column = kw.get("column") or kw.get("column_A")
    if r.exception_info and r.exception_info.get("raised_exception"):
        item["offending"].append({"error": r.exception_info.get("exception_message")})
    for idx in (res.get("unexpected_index_list") or [])[:20]:
        entry = _plain(dict(idx)) if isinstance(idx, dict) else {"row": idx}
        if key and "error" in df.columns and key in entry:
            err = df.loc[df[key] == entry[key], "error"]
            if len(err) and isinstance(err.iloc[0], str):
                entry["error"] = err.iloc[0]
        item["offending"].append(entry)
    if not r.success and table == "dataset" and column in df.columns:
        item["offending"] = []
        entry = {column: _plain(df[column].iloc[0])}
        for extra in ("manifest_error", "tokenizer_error", "error"):
            if extra in df.columns and isinstance(df[extra].iloc[0], str):
                entry[extra] = df[extra].iloc[0]
        item["offending"].append(entry)
    return item


def _plain(v):
    """JSON-safe values (numpy scalars, NaN)."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v
