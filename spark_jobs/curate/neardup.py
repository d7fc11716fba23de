"""Near-duplicate detection: banded MinHash-LSH as Spark shuffles, then connected components.

Each document gets a MinHash signature of its word n-gram shingles (:func:`signature`), cut
into ``bands`` bands of ``rows`` values; each band hashes to one 64-bit key (:func:`band_keys`).
Documents that share a key in any band are candidates. A shuffle by band key links every
member of a bucket to the bucket's lowest id (a star, so edges stay linear in bucket size),
each candidate edge is kept only when the signatures agree on at least ``threshold`` of their
values (the estimated Jaccard similarity), and the large-star / small-star iteration of Kiveris
et al. ("Connected Components in MapReduce and Beyond", 2014) labels every connected group with
its lowest id. Everything but that lowest id is removed.

Ids give the order: the lowest id in a group is the document kept. Negative ids are documents
of earlier runs (already trained on): they are never removed, and any new document (id >= 0)
in a group with one of them is.

    docs = with_signatures(df.select("id", "text"), cfg)     # id, sig, bands
    removed = near_duplicates(docs, cfg, spark)               # id of each document to drop
"""

from __future__ import annotations

import hashlib
import re
import struct

from lmpipe.config import stage_config
from lmpipe.log import log

MAX_ITERATIONS = 100  # connected components: a hard cap on large-star/small-star rounds
SIG_DDL = "id long, sig array<long>, bands array<long>"
_WORD = re.compile(r"\w+")


@stage_config
class NearDedupConfig:
    enabled: bool = True  # remove near-duplicates (one document kept per group)
    # LSH bands: two documents are candidates when all ``rows`` values of any one band agree. At
    # 32 x 4 a pair at Jaccard 0.7 is a candidate with probability > 0.999, one at 0.5 with 0.87:
    # the bands only gather candidates, the threshold below decides.
    bands: int = 32
    rows: int = 4  # MinHash rows per band (permutations = bands * rows)
    # The estimated Jaccard similarity of the shingle sets (the fraction of equal signature
    # values) at or above which a candidate pair is a near-duplicate. At 128 permutations the
    # estimate's standard deviation is ~0.04, so 0.6 finds pairs at a true Jaccard >= 0.7 and
    # rejects those below 0.5, each with a probability of ~99%. 0 keeps every LSH candidate.
    threshold: float = 0.6
    ngram: int = 5  # word n-grams shingled per document
    seed: int = 1  # seed of the MinHash permutations (signatures of different seeds never match)


def check(cfg: NearDedupConfig) -> None:
    """Refuse a config that cannot work, before any document is read."""
    from lmpipe.errors import ConfigError

    if cfg.bands < 1 or cfg.rows < 1 or cfg.ngram < 1:
        raise ConfigError("config keys 'curate.near_dedup.bands', 'rows' and 'ngram' must each be >= 1 "
                          f"(got {cfg.bands}, {cfg.rows}, {cfg.ngram})")
    if not 0.0 <= cfg.threshold <= 1.0:
        raise ConfigError(f"config key 'curate.near_dedup.threshold' must lie in [0, 1] (got {cfg.threshold})")


def words(text: str) -> list[str]:
    """The lowercased words of ``text``: runs of letters, digits and underscores."""
    return _WORD.findall((text or "").lower())


def shingles(text: str, ngram: int) -> list[str]:
    """The word ``ngram``-grams of ``text``, or its normalized words as one shingle when it has
    fewer than ``ngram`` words."""
    w = words(text)
    if len(w) < ngram:
        return [" ".join(w)]
    return [" ".join(w[i : i + ngram]) for i in range(len(w) - ngram + 1)]


def signature(text: str, cfg: NearDedupConfig) -> list[int]:
    """The MinHash signature (``bands * rows`` unsigned 32-bit values) of ``text``'s shingles."""
    import rensa

    mh = rensa.RMinHash(cfg.bands * cfg.rows, cfg.seed)
    mh.update(shingles(text, cfg.ngram))
    return [int(v) for v in mh.digest()]


def band_keys(sig: list[int], cfg: NearDedupConfig) -> list[int]:
    """One signed 64-bit key per band: blake2b of (band index, the band's values)."""
    rows, keys = cfg.rows, []
    for band in range(cfg.bands):
        values = sig[band * rows : (band + 1) * rows]
        packed = struct.pack(f"<q{len(values)}Q", band, *values)
        keys.append(int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little", signed=True))
    return keys


def with_signatures(df, cfg: NearDedupConfig, text_col: str = "text"):
    """``id long, sig array<long>, bands array<long>`` for a DataFrame of ``id`` and ``text_col``,
    computed on the executors."""

    def compute(batches):
        import pyarrow as pa

        list_type = pa.list_(pa.int64())
        for batch in batches:
            sigs = [signature(t, cfg) for t in batch.column(text_col).to_pylist()]
            yield pa.RecordBatch.from_arrays(
                [batch.column("id").cast(pa.int64()), pa.array(sigs, type=list_type),
                 pa.array([band_keys(s, cfg) for s in sigs], type=list_type)], names=["id", "sig", "bands"])

    return df.select("id", text_col).mapInArrow(compute, SIG_DDL)


def _verified(edges, docs, threshold: float):
    """The edges whose endpoints' signatures agree on at least ``threshold`` of their values."""
    from pyspark.sql import functions as F

    a = docs.select(F.col("id").alias("src"), F.col("sig").alias("sig_a"))
    b = docs.select(F.col("id").alias("dst"), F.col("sig").alias("sig_b"))
    equal = F.aggregate(F.zip_with("sig_a", "sig_b", lambda x, y: (x == y).cast("int")), F.lit(0),
                        lambda acc, x: acc + x)
    est = equal / F.size("sig_a")
    return edges.join(a, "src").join(b, "dst").where(est >= F.lit(threshold)).select("src", "dst")


def candidate_edges(docs, cfg: NearDedupConfig):
    """``src long, dst long`` (src > dst): each member of an LSH bucket linked to the bucket's
    lowest id, deduplicated; when ``cfg.threshold`` > 0, only the pairs whose signatures agree
    on at least that fraction of values. ``docs``: ``id long, bands array<long>`` (and
    ``sig array<long>`` when verifying), read twice when verifying: persist it if it is costly
    to recompute."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    members = docs.select("id", F.explode("bands").alias("band"))
    root = F.min("id").over(Window.partitionBy("band"))
    edges = (members.withColumn("root", root).where(F.col("id") != F.col("root"))
             .select(F.col("id").alias("src"), F.col("root").alias("dst")).distinct())
    if cfg.threshold > 0:
        if "sig" not in docs.columns:
            from lmpipe.errors import ConfigError

            raise ConfigError("near_dedup: verifying candidates (threshold > 0) needs a sig column")
        edges = _verified(edges, docs, cfg.threshold)
    return edges


def _large_star(edges):
    """Every node links its larger neighbours to the smallest node of its neighbourhood."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    both = edges.select(F.col("src").alias("u"), F.col("dst").alias("v")).unionByName(
        edges.select(F.col("dst").alias("u"), F.col("src").alias("v")))
    m = F.least(F.col("u"), F.min("v").over(Window.partitionBy("u")))
    return (both.withColumn("m", m).where(F.col("v") > F.col("u"))
            .select(F.col("v").alias("src"), F.col("m").alias("dst")).distinct())


def _small_star(edges):
    """Every node links itself and its smaller neighbours to the smallest of them."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    m = F.min("dst").over(Window.partitionBy("src"))  # dst < src: the smallest of src's set
    nodes = edges.withColumn("m", m).select(F.explode(F.array("src", "dst")).alias("node"), "m")
    return nodes.where(F.col("node") != F.col("m")).select(
        F.col("node").alias("src"), F.col("m").alias("dst")).distinct()


def _is_star_forest(edges) -> bool:
    """Whether every node links to one node only and no linked-to node links on: each connected
    group is then one star around its lowest id (every edge has src > dst)."""
    from pyspark.sql import functions as F

    fanout = edges.groupBy("src").count().where(F.col("count") > 1).select("src")
    chained = edges.select(F.col("dst").alias("src")).join(edges.select("src"), "src", "left_semi")
    return fanout.unionByName(chained).limit(1).count() == 0


def connected_components(edges, spark, max_iterations: int = MAX_ITERATIONS):
    """``id long, component long`` for every node of ``edges`` (``src, dst`` longs, either
    direction), the component being its lowest id. Alternates large-star and small-star until
    the graph is a forest of stars; raises past ``max_iterations`` rounds."""
    from pyspark.sql import functions as F

    cur = edges.select(F.greatest("src", "dst").alias("src"), F.least("src", "dst").alias("dst"))
    cur = cur.where(F.col("src") != F.col("dst")).distinct().localCheckpoint(eager=True)
    rounds = 0
    while not _is_star_forest(cur):
        if rounds >= max_iterations:
            raise RuntimeError(f"connected components did not converge within {max_iterations} rounds "
                               "of large-star/small-star")
        rounds += 1
        # Each round's edges are materialized once: the convergence check reads them and the
        # next round starts from them, and the plan's lineage stays one round long.
        cur = _small_star(_large_star(cur)).localCheckpoint(eager=True)
    log(f"near-dedup: connected components converged after {rounds} large-star/small-star rounds")
    leaves = cur.select(F.col("src").alias("id"), F.col("dst").alias("component"))
    roots = cur.select(F.col("dst").alias("id"), F.col("dst").alias("component"))
    return leaves.unionByName(roots).distinct()


def duplicate_groups(docs, cfg: NearDedupConfig, spark):
    """``id long, component long`` of every document with at least one near-duplicate."""
    return connected_components(candidate_edges(docs, cfg), spark)


def removals(groups):
    """``id long`` of each document a group loses: all but its lowest id, never a negative
    (protected) id."""
    from pyspark.sql import functions as F

    return groups.where((F.col("id") != F.col("component")) & (F.col("id") >= 0)).select("id")


def near_duplicates(docs, cfg: NearDedupConfig, spark):
    """``id long`` of every document to remove: every member of a group of near-duplicates but
    its lowest id; negative ids (earlier runs) are never returned. ``docs``: ``id long,
    bands array<long>, sig array<long>`` (:func:`with_signatures`)."""
    if not cfg.enabled:
        return spark.createDataFrame([], "id long")
    return removals(duplicate_groups(docs, cfg, spark))
