"""Near-duplicate detection: MinHash signatures, LSH candidate edges, connected components
(large-star / small-star) and the documents removed, on Spark local[2].

Every expected value comes from the fixtures' construction: documents are runs of distinct
made-up words, so a word replaced at least five words away from the ends and from any other
edit removes exactly five of the 196 five-word shingles of a 200-word document."""

import random

import pytest

from lmpipe import config
from lmpipe.errors import ConfigError
from spark_jobs.curate import neardup
from spark_jobs.curate.neardup import NearDedupConfig

CFG = NearDedupConfig()


@pytest.fixture(scope="module")
def spark():
    from spark_jobs import sparkutil

    session = sparkutil.session("local[2]", "test-neardup", {"spark.sql.shuffle.partitions": "4",
                                                             "spark.default.parallelism": "4"})
    yield session
    session.stop()


def base(topic: str, n: int = 200) -> list[str]:
    return [f"{topic}{i}" for i in range(n)]


def edit(words: list[str], positions) -> list[str]:
    out = list(words)
    for p in positions:
        out[p] = f"edit{p}x"
    return out


def exact_jaccard(a: list[str], b: list[str], n: int = 5) -> float:
    sa = {tuple(a[i : i + n]) for i in range(len(a) - n + 1)}
    sb = {tuple(b[i : i + n]) for i in range(len(b) - n + 1)}
    return len(sa & sb) / len(sa | sb)


def estimate(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


# --- signatures -------------------------------------------------------------------------------

def test_signature_identical_texts_identical_signatures():
    text = " ".join(base("alpha"))
    assert neardup.signature(text, CFG) == neardup.signature(text, CFG)
    assert len(neardup.signature(text, CFG)) == CFG.bands * CFG.rows
    # Case, punctuation and whitespace are normalized away.
    assert neardup.signature("Alpha0,  ALPHA1.\n" + " ".join(base("alpha")[2:]), CFG) == neardup.signature(text, CFG)


def test_signature_estimates_jaccard():
    a = base("alpha")
    near = edit(a, [50, 150])  # 10 of 196 shingles changed: J = 186 / 206
    far = base("omega")
    j_near = exact_jaccard(a, near)
    assert j_near == pytest.approx(186 / 206)
    sa, sn, sf = (neardup.signature(" ".join(w), CFG) for w in (a, near, far))
    assert abs(estimate(sa, sn) - j_near) < 0.12  # 128 values: the estimate's sd is ~0.026
    assert estimate(sa, sn) > 0.75
    assert exact_jaccard(a, far) == 0.0
    assert estimate(sa, sf) < 0.05


def test_short_document_is_one_shingle():
    assert neardup.signature("Hello,   World!", CFG) == neardup.signature("hello world", CFG)
    assert neardup.signature("hello world", CFG) != neardup.signature("hello there", CFG)
    # Six words are two shingles: one word more than a five-word document, one shingle more.
    six, five = neardup.signature("a b c d e f", CFG), neardup.signature("a b c d e", CFG)
    assert six != five and estimate(six, five) > 0.3


def test_band_keys_one_per_band_signed_64_bit():
    sig = neardup.signature(" ".join(base("alpha")), CFG)
    keys = neardup.band_keys(sig, CFG)
    assert len(keys) == CFG.bands and len(set(keys)) == CFG.bands
    assert all(-(1 << 63) <= k < (1 << 63) for k in keys)
    changed = list(sig)
    changed[CFG.rows * 3 + 1] += 1  # a value of band 3
    other = neardup.band_keys(changed, CFG)
    assert [i for i in range(CFG.bands) if keys[i] != other[i]] == [3]
    # The band index is part of the key: equal values in different bands never share a bucket.
    same = [7] * (CFG.bands * CFG.rows)
    assert len(set(neardup.band_keys(same, CFG))) == CFG.bands


def test_config_from_mapping_and_check():
    cfg = config.build(NearDedupConfig, {"bands": 20, "rows": 5, "threshold": 0.7})
    assert (cfg.bands, cfg.rows, cfg.threshold, cfg.ngram, cfg.enabled) == (20, 5, 0.7, 5, True)
    with pytest.raises(ConfigError, match="near_dedup|band"):
        config.build(NearDedupConfig, {"band": 3})
    with pytest.raises(ConfigError, match="threshold"):
        neardup.check(NearDedupConfig(threshold=1.5))


# --- connected components ---------------------------------------------------------------------

def components(spark, edges, **kw) -> dict[int, int]:
    df = spark.createDataFrame(edges, "src long, dst long")
    return {r["id"]: r["component"] for r in neardup.connected_components(df, spark, **kw).collect()}


def test_cc_chain(spark):
    assert components(spark, [(5, 4), (4, 3), (3, 2), (2, 1)]) == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}


def test_cc_two_components_any_direction_duplicates_and_loops(spark):
    edges = [(1, 2), (3, 2), (2, 3), (10, 11), (12, 11), (11, 12), (3, 3)]
    assert components(spark, edges) == {1: 1, 2: 1, 3: 1, 10: 10, 11: 10, 12: 10}


def test_cc_star(spark):
    assert components(spark, [(7, leaf) for leaf in (1, 2, 3, 4, 5, 6)]) == {n: 1 for n in range(1, 8)}
    assert components(spark, [(0, leaf) for leaf in (9, 8, 7)]) == {0: 0, 7: 0, 8: 0, 9: 0}


def test_cc_min_in_middle_of_long_path(spark, capsys):
    # 40 - 38 - ... - 2 - 0 - 1 - 3 - ... - 39: the lowest id sits in the middle of a 41-node path.
    path = list(range(40, 0, -2)) + [0] + list(range(1, 40, 2))
    edges = list(zip(path, path[1:]))
    random.Random(0).shuffle(edges)
    assert components(spark, edges) == {n: 0 for n in range(41)}
    rounds = int(capsys.readouterr().err.split("converged after ")[1].split()[0])
    assert 2 <= rounds <= 12


def test_cc_negative_ids(spark):
    assert components(spark, [(-3, 4), (4, 9), (9, -1)]) == {-3: -3, -1: -3, 4: -3, 9: -3}


def test_cc_no_edges(spark):
    assert components(spark, []) == {}


def test_cc_round_cap(spark):
    with pytest.raises(RuntimeError, match="did not converge within 1 round"):
        components(spark, [(5, 4), (4, 3), (3, 2), (2, 1)], max_iterations=1)


# --- near-duplicates --------------------------------------------------------------------------

A, C0, D, E, P = base("alpha"), base("gamma"), base("delta"), base("epsilon"), base("pi")
C1 = edit(C0, range(10, 190, 30))  # 6 edits: J(C0, C1) = 166 / 226
C2 = edit(C1, range(25, 190, 30))  # 6 more: J(C1, C2) = 166 / 226, J(C0, C2) = 136 / 256
DOCS = {
    0: A,
    1: edit(A, [40, 120]),  # J 186 / 206
    2: edit(A, [20, 60, 100, 160]),  # J 176 / 216
    3: D,  # distinct
    4: C0, 5: C1, 6: C2,  # a chain: 4 ~ 5 ~ 6, while 4 and 6 are less similar than the threshold
    7: E, 12: list(E),  # an exact copy
    8: edit(A, range(7, 190, 12)),  # similar to A but not a near copy: 16 edits, J 116 / 276
    -2: P,  # earlier runs' documents, already trained on
    -1: edit(P, [90]),
    9: edit(P, [30, 70, 130]),  # a new near copy of an earlier document
}
REMOVED = {1, 2, 5, 6, 9, 12}
GROUPS = {0: {0, 1, 2}, 4: {4, 5, 6}, 7: {7, 12}, -2: {-2, -1, 9}}


def test_fixture_jaccards():
    assert exact_jaccard(A, DOCS[1]) == 186 / 206 and exact_jaccard(A, DOCS[2]) == 176 / 216
    assert exact_jaccard(C0, C1) == exact_jaccard(C1, C2) == 166 / 226 > 0.7
    assert exact_jaccard(C0, C2) == 136 / 256 < CFG.threshold
    assert exact_jaccard(A, DOCS[8]) == 116 / 276 < 0.45
    assert exact_jaccard(P, DOCS[9]) == 181 / 211 and exact_jaccard(A, D) == 0


def signed_docs(spark, cfg=CFG):
    rows = [(i, " ".join(w)) for i, w in DOCS.items()]
    random.Random(1).shuffle(rows)  # row order is not document order: ids are
    df = spark.createDataFrame(rows, "id long, text string").repartition(3)
    return neardup.with_signatures(df, cfg)


def test_near_duplicates(spark):
    docs = signed_docs(spark)
    removed = {r["id"] for r in neardup.near_duplicates(docs, CFG, spark).collect()}
    assert removed == REMOVED
    groups = {}
    for r in neardup.duplicate_groups(docs, CFG, spark).collect():
        groups.setdefault(r["component"], set()).add(r["id"])
    assert groups == GROUPS


def test_chain_is_joined_through_its_middle(spark):
    edges = {(r["src"], r["dst"]) for r in neardup.candidate_edges(signed_docs(spark), CFG).collect()}
    assert {(5, 4), (6, 5)} <= edges
    assert (6, 4) not in edges  # C0 and C2 are in one group only through C1
    assert (8, 0) not in edges


def test_verification_drops_similar_pairs(spark):
    # 64 bands of 2 rows: a pair at Jaccard 0.42 shares a band with probability ~1 - 1e-5.
    wide = NearDedupConfig(bands=64, rows=2, threshold=0.0)
    docs = signed_docs(spark, wide)
    unverified = {(r["src"], r["dst"]) for r in neardup.candidate_edges(docs, wide).collect()}
    assert (8, 0) in unverified
    verified = NearDedupConfig(bands=64, rows=2, threshold=0.6)
    edges = {(r["src"], r["dst"]) for r in neardup.candidate_edges(docs, verified).collect()}
    assert (8, 0) not in edges and {(1, 0), (2, 0), (5, 4)} <= edges
    removed = {r["id"] for r in neardup.near_duplicates(docs, verified, spark).collect()}
    assert removed == REMOVED


def test_verification_needs_signatures(spark):
    docs = signed_docs(spark).select("id", "bands")
    with pytest.raises(ConfigError, match="sig"):
        neardup.candidate_edges(docs, CFG)
    no_verify = NearDedupConfig(threshold=0.0)
    assert {r["id"] for r in neardup.near_duplicates(docs, no_verify, spark).collect()} >= REMOVED


def test_disabled_removes_nothing(spark):
    off = NearDedupConfig(enabled=False)
    assert neardup.near_duplicates(signed_docs(spark), off, spark).collect() == []


def test_each_task_gets_its_own_partition_holding_its_edits(spark):
    """Stage 2 runs one task per partition, partition i holding task i, tasks without edits
    included: a hash partitioning by task would pair some tasks up and leave others empty."""
    from spark_jobs.curate import stage

    n = 7
    rows = [(1, 4, "c4.too_few_sentences", None), (3, 0, None, "rewritten"), (3, 9, stage.NEAR, None),
            (6, 2, stage.EXACT, None)]
    edit_rows = spark.createDataFrame(rows, "task int, idx long, reason string, text string")
    out = stage.by_task(spark, spark.range(0, n, numPartitions=n), edit_rows, n)
    parts = out.rdd.glom().collect()
    assert len(parts) == n
    got = [[(r["id"], sorted((e["idx"], e["reason"], e["text"]) for e in r["edits"])) for r in p] for p in parts]
    assert got == [[(0, [])], [(1, [(4, "c4.too_few_sentences", None)])], [(2, [])],
                   [(3, [(0, None, "rewritten"), (9, stage.NEAR, None)])], [(4, [])], [(5, [])],
                   [(6, [(2, stage.EXACT, None)])]]
