"""The curation stage's Spark plan, between the tokenize job's two ``mapInArrow`` stages.

From stage 1's document rows (:data:`spark_jobs.worker.DOCS_SCHEMA`) it finds the exact
duplicates (a window over content hashes: the first by position is kept) and the near
duplicates (:mod:`spark_jobs.curate.neardup`) among the documents the filters kept, and joins
every task's edits onto its row for stage 2. It is shuffles and joins throughout: nothing
that grows with the corpus reaches the driver, which collects only counts by reason and tag.
"""

from __future__ import annotations

from collections import Counter

EXACT, NEAR = "exact_dedup.duplicate", "near_dedup.near_duplicate"
EDITS_DDL = "id long, edits array<struct<idx:long,reason:string,text:string>>"


def with_ids(docs):
    """Document ids in corpus order (task, then record index): lower is earlier, and kept."""
    from pyspark.sql import functions as F

    return docs.withColumn("id", F.col("task").cast("long") * (1 << 32) + F.col("idx"))


def edits(spark, docs, cfg, history=None):
    """(task, idx, reason, text) of every document stage 2 must drop (``reason``) or rewrite
    (``text``). ``history`` (``id`` < 0, ``hash``, ``sig``, ``bands``) holds the documents of earlier runs
    of the lineage: a new document that duplicates one of them is removed too."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    def rows(df, reason=None, text=False):
        return df.select("task", "idx", F.col("reason") if reason is None else F.lit(reason).alias("reason"),
                         F.col("text") if text else F.lit(None).cast("string").alias("text"))

    docs = with_ids(docs)
    parts, kept = [rows(docs.filter("reason is not null"))], docs.filter("reason is null")
    if cfg.dedup:
        old = [] if history is None else [history.filter("hash is not null").select("id", "hash")]
        ranks = _union([kept.select("id", "hash"), *old]).withColumn(
            "rank", F.row_number().over(Window.partitionBy("hash").orderBy("id")))
        dups = ranks.filter("rank > 1 and id >= 0").select("id")
        parts.append(rows(kept.join(dups, "id", "left_semi"), EXACT))
        kept = kept.join(dups, "id", "left_anti")
    if cfg.curate.near_dedup.enabled:
        from spark_jobs.curate import neardup

        cols = ("id", "sig", "bands")
        old = [] if history is None else [history.filter("bands is not null").select(*cols)]
        near = neardup.near_duplicates(_union([kept.select(*cols), *old]), cfg.curate.near_dedup, spark)
        parts.append(rows(kept.join(near, "id", "left_semi"), NEAR))
        kept = kept.join(near, "id", "left_anti")
    parts.append(rows(kept.filter("text is not null"), text=True))
    return _union(parts)


def _union(frames):
    out = frames[0]
    for f in frames[1:]:
        out = out.unionByName(f)
    return out


def by_task(spark, task_df, edit_rows, n_tasks: int):
    """Each task id with its edits, one partition per task and partition i holding task i: a
    hash partitioning would put several tasks in some partitions and none in others."""
    from pyspark.sql import functions as F

    grouped = edit_rows.groupBy("task").agg(
        F.collect_list(F.struct(F.col("idx"), F.col("reason"), F.col("text"))).alias("edits"))
    joined = task_df.join(grouped, task_df["id"] == grouped["task"], "left").select("id", "edits")
    rdd = joined.rdd.map(lambda r: (r[0], r[1] or [])).partitionBy(n_tasks, lambda task: task)
    return spark.createDataFrame(rdd, EDITS_DDL)


def tag_counts(docs) -> Counter:
    """Tags over every document (``lang.<code>``, ``scrubbed.<kind>``): a handful of rows."""
    from pyspark.sql import functions as F

    rows = docs.select(F.explode("tags").alias("tag")).groupBy("tag").count().collect()
    return Counter({r["tag"]: int(r["count"]) for r in rows})
