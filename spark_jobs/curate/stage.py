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
EDITS_TYPE = "array<struct<idx:long,reason:string,text:string>>"


def with_ids(docs):
    """Document ids in corpus order (task, then record index): lower is earlier, and kept."""
    from pyspark.sql import functions as F

    return docs.withColumn("id", F.col("task").cast("long") * (1 << 32) + F.col("idx"))


def edits(spark, docs, cfg, history=None):
    """(task, idx, reason, text) of every document stage 2 must drop (``reason``) or rewrite
    (``text``). ``history`` (``id`` < 0, ``hash``, ``sig``, ``bands``) holds the documents of earlier runs
    of the lineage: a new document that duplicates one of them is removed too.

    Each dedup step's removals (ids only) are materialized once, so no later step recomputes
    the steps before it, and one join puts them on the documents."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    docs = with_ids(docs)
    kept, removed = docs.filter("reason is null"), []
    if cfg.dedup:
        old = [] if history is None else [history.filter("hash is not null").select("id", "hash")]
        ranks = _union([kept.select("id", "hash"), *old]).withColumn(
            "rank", F.row_number().over(Window.partitionBy("hash").orderBy("id")))
        dups = ranks.filter("rank > 1 and id >= 0").select("id").localCheckpoint(eager=True)
        removed.append(dups.withColumn("dedup", F.lit(EXACT)))
        kept = kept.join(dups, "id", "left_anti")
    if cfg.curate.near_dedup.enabled:
        from spark_jobs.curate import neardup

        cols = ("id", "sig", "bands")
        old = [] if history is None else [history.filter("bands is not null").select(*cols)]
        near = neardup.near_duplicates(_union([kept.select(*cols), *old]), cfg.curate.near_dedup, spark)
        removed.append(near.localCheckpoint(eager=True).withColumn("dedup", F.lit(NEAR)))
    out = docs.select("task", "idx", "id", "reason", "text")
    if removed:
        out = out.join(_union(removed), "id", "left").withColumn("reason", F.coalesce("reason", "dedup"))
    return out.where("reason is not null or text is not null").select(
        "task", "idx", "reason", F.when(F.col("reason").isNull(), F.col("text")).alias("text"))


def _union(frames):
    out = frames[0]
    for f in frames[1:]:
        out = out.unionByName(f)
    return out


def by_task(spark, task_df, edit_rows, n_tasks: int):
    """Each task id with its edits, one partition per task and partition i holding task i: a
    plain hash partitioning by task would put several tasks in some partitions and none in
    others. Each task gets a key that Spark's hash partitioning sends to partition ``task``
    (found by hashing candidate keys with the same Murmur3 expression); the rows stay in the
    JVM throughout."""
    from pyspark.sql import functions as F

    found = (spark.range(0, 64 * n_tasks).withColumn("task", F.expr(f"pmod(hash(id), {n_tasks})"))
             .groupBy("task").agg(F.min("id").alias("key")).collect())  # one row per task
    if len(found) != n_tasks:  # each of 64 * n keys misses a given partition with probability ~e**-64
        raise RuntimeError(f"no partitioning key found for {n_tasks - len(found)} of {n_tasks} tasks")
    keys = spark.createDataFrame([(r["task"], r["key"]) for r in found], "task long, key long")
    grouped = edit_rows.groupBy("task").agg(
        F.collect_list(F.struct(F.col("idx"), F.col("reason"), F.col("text"))).alias("edits"))
    joined = (task_df.join(F.broadcast(keys), task_df["id"] == keys["task"])
              .join(grouped, task_df["id"] == grouped["task"], "left")
              .select(task_df["id"], F.coalesce("edits", F.array().cast(EDITS_TYPE)).alias("edits"), "key"))
    return joined.repartition(n_tasks, "key").sortWithinPartitions("id").select("id", "edits")


def tag_counts(docs) -> Counter:
    """Tags over every document (``lang.<code>``, ``scrubbed.<kind>``): a handful of rows."""
    from pyspark.sql import functions as F

    rows = docs.select(F.explode("tags").alias("tag")).groupBy("tag").count().collect()
    return Counter({r["tag"]: int(r["count"]) for r in rows})
