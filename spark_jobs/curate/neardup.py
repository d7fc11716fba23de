"""Near-duplicate detection: banded MinHash-LSH as Spark shuffles, then connected components.

Each document gets a MinHash signature of its word n-gram shingles (:func:`signatures`), cut
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

import itertools
import re

from lmpipe.config import stage_config
from lmpipe.log import log

# How signatures and band keys are computed: signatures of another scheme never match these,
# so an incremental run refuses a base whose signatures were made by another.
SCHEME = "word-ngram-poly64/rensa-rminhash-2"
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


def compatible(cfg: NearDedupConfig, base: dict | None, base_scheme: str | None, where: str) -> None:
    """Refuse to dedup against an earlier run (``base``: its ``near_dedup`` config, from its
    manifest) whose signatures cannot match this run's: another shape, seed or scheme."""
    from lmpipe.errors import ConfigError

    if not cfg.enabled or not base or not base.get("enabled", True):
        return
    for key in ("bands", "rows", "ngram", "seed"):
        if base.get(key) != getattr(cfg, key):
            raise ConfigError(f"config key 'curate.near_dedup.{key}' is {getattr(cfg, key)} but base {where} used "
                              f"{base.get(key)}: near-dup signatures of the two never match; keep the base's value")
    if base_scheme != SCHEME:
        raise ConfigError(f"base {where} has near-dup signatures of scheme {base_scheme or 'unrecorded'}, this lmpipe "
                          f"computes {SCHEME}: tokenize the corpus once without base= to start a new lineage")


def words(text: str) -> list[str]:
    """The lowercased words of ``text``: runs of letters, digits and underscores."""
    return _WORD.findall((text or "").lower())


def signatures(texts: list[str], cfg: NearDedupConfig):
    """The MinHash signatures of ``texts``' shingles: a ``(len(texts), bands * rows)`` uint64
    array of unsigned 32-bit values, computed for the whole batch at once. rensa hashes each
    word to 64 bits; a shingle's hash is a polynomial of its words' hashes (mod 2**64), and rensa
    takes the minima over the flat array of every document's shingle hashes."""
    import numpy as np
    import rensa

    n, perm = cfg.ngram, cfg.bands * cfg.rows
    if not texts:
        return np.zeros((0, perm), np.uint64)
    split = [words(t) for t in texts]
    counts = np.fromiter(map(len, split), np.int64, len(split))
    (flat_words,) = rensa.RMinHash.hash_token_sets([list(itertools.chain.from_iterable(split))])
    h = np.array(flat_words, np.uint64)
    doc_of = np.repeat(np.arange(len(texts)), counts)
    m = max(len(h) - n + 1, 0)
    grams = _poly(h, n, m)
    starts = np.flatnonzero(doc_of[:m] == doc_of[n - 1 : n - 1 + m])  # all n words in one document
    # A document of fewer than n words is one shingle of all its words (none: of no word).
    short = np.flatnonzero(counts < n)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    short_grams = np.array([_poly(h[offsets[d] : offsets[d + 1]], counts[d], 1)[0] if counts[d] else 0
                            for d in short], np.uint64)
    owner = np.concatenate([doc_of[starts], short])
    order = np.argsort(owner, kind="stable")
    flat = np.concatenate([grams[starts], short_grams])[order]
    rows = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=len(texts)))]).astype(np.uint64)
    digests = rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, rows, perm, cfg.seed)
    return np.array(digests.to_rows(), np.uint64).reshape(len(texts), perm)


_MULT = 0x9E3779B97F4A7C15  # odd: shingle hashes are polynomials mod 2**64


def _poly(h, n: int, m: int):
    """The hashes of the ``m`` runs of ``n`` consecutive values of ``h`` that start at 0..m-1."""
    import numpy as np

    g = h[:m].copy()
    for k in range(1, n):
        g = g * np.uint64(_MULT) + h[k : k + m]
    return g


def signature(text: str, cfg: NearDedupConfig) -> list[int]:
    """The MinHash signature of one document (see :func:`signatures`)."""
    return [int(v) for v in signatures([text], cfg)[0]]


def band_key_matrix(sigs, cfg: NearDedupConfig):
    """One signed 64-bit key per band of each signature in ``sigs`` (a ``(docs, bands * rows)``
    uint64 array): a polynomial of the band's index and values mod 2**64, mixed by splitmix64's
    finalizer so the keys spread over the hash shuffle's partitions."""
    import numpy as np

    with np.errstate(over="ignore"):
        vals = np.asarray(sigs, np.uint64).reshape(len(sigs), cfg.bands, cfg.rows)
        key = np.broadcast_to(np.arange(1, cfg.bands + 1, dtype=np.uint64), vals.shape[:2]).copy()
        for r in range(cfg.rows):
            key = key * np.uint64(_MULT) + vals[:, :, r]
        key ^= key >> np.uint64(30)
        key *= np.uint64(0xBF58476D1CE4E5B9)
        key ^= key >> np.uint64(27)
        key *= np.uint64(0x94D049BB133111EB)
        key ^= key >> np.uint64(31)
    return key.view(np.int64)


def band_keys(sig: list[int], cfg: NearDedupConfig) -> list[int]:
    """One signed 64-bit key per band of one signature (see :func:`band_key_matrix`)."""
    return [int(k) for k in band_key_matrix([sig], cfg)[0]]


def with_signatures(df, cfg: NearDedupConfig, text_col: str = "text"):
    """``id long, sig array<long>, bands array<long>`` for a DataFrame of ``id`` and ``text_col``,
    computed on the executors."""

    def compute(batches):
        import numpy as np
        import pyarrow as pa

        list_type = pa.list_(pa.int64())
        for batch in batches:
            sigs = signatures(batch.column(text_col).to_pylist(), cfg)
            yield pa.RecordBatch.from_arrays(
                [batch.column("id").cast(pa.int64()), _lists(sigs.view(np.int64), list_type),
                 _lists(band_key_matrix(sigs, cfg), list_type)], names=["id", "sig", "bands"])

    return df.select("id", text_col).mapInArrow(compute, SIG_DDL)


def _lists(matrix, list_type):
    """An Arrow list column with one row per row of a 2-D int64 array, without Python objects."""
    import pyarrow as pa

    rows, width = matrix.shape
    offsets = pa.array(range(0, rows * width + 1, width), pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1)), type=list_type)


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
