"""The promotion gate on a real MLflow registry (SQLite), with versions whose tags a test sets:
a non-finite perplexity is refused, and a promotion retried after the alias moved is
reported once."""

from __future__ import annotations

import json

import pytest
from test_resolve import model_folder, register, registry  # noqa: F401  (the fixture)

from registry import promote, tracking


def candidate(cfg, tmp_path, name: str, perplexity: str) -> str:
    """A registered version that finished training, passed its data checks and was evaluated."""
    c = tracking.client(cfg)
    version = register(model_folder(tmp_path / name, name), cfg)
    run_id = c.get_model_version(cfg.model_name, version).run_id
    c.set_terminated(run_id, "FINISHED")
    tags = {"lmpipe.training_status": "FINISHED", "lmpipe.data_checks_success": "true",
            "lmpipe.eval.shards": "s3://b/shards", "lmpipe.eval.shards_manifest_sha256": "0" * 64,
            "lmpipe.eval.comparable": "true", "lmpipe.eval.perplexity": perplexity}
    for key, value in tags.items():
        c.set_model_version_tag(cfg.model_name, version, key, value)
    return version


@pytest.mark.parametrize("perplexity", ["nan", "inf"])
def test_a_non_finite_perplexity_is_never_promoted(registry, tmp_path, perplexity):  # noqa: F811
    v = candidate(registry, tmp_path, "diverged", perplexity)
    d = promote.promote(registry, v, 0.01)  # no champion yet: nothing else to compare with
    assert d["decision"] == "refused" and any("not finite" in r for r in d["reasons"]), d
    assert tracking.alias_version(tracking.client(registry), registry.model_name, "champion") is None


def test_a_promote_retried_after_the_alias_moved_reports_the_promotion_once(registry, tmp_path, monkeypatch):  # noqa: F811
    """The first attempt moves the alias and dies before its bookkeeping; each retry reports the
    promotion (exit 0, so the DAG emits the asset), and it is recorded exactly once."""
    c = tracking.client(registry)
    name = registry.model_name
    v1, v2 = candidate(registry, tmp_path, "one", "20.0"), candidate(registry, tmp_path, "two", "10.0")
    assert promote.promote(registry, v1, 0.01)["decision"] == "promoted"

    def crash(*a, **k):
        raise RuntimeError("the task died here")

    with monkeypatch.context() as m:
        m.setattr(tracking, "log_champion", crash)
        with pytest.raises(RuntimeError, match="the task died here"):
            promote.promote(registry, v2, 0.01)
    assert str(c.get_model_version_by_alias(name, "champion").version) == v2  # the side effect happened

    for _ in range(2):  # the retry, and one more
        d = promote.promote(registry, v2, 0.01)
        assert d["decision"] == "promoted" and d["candidate"] == v2, d
    assert tracking.champion_history(c, name) == [v1, v2]
    assert [e[:2] for e in tracking.champion_log(c, name)] == [[v1, "promoted"], [v2, "promoted"]]
    assert json.loads(c.get_model_version(name, v2).tags["lmpipe.promotion.last"])["decision"] == "promoted"


def test_the_champion_promoted_again_is_not_refused(registry, tmp_path):  # noqa: F811
    v = candidate(registry, tmp_path, "only", "12.0")
    first = promote.promote(registry, v, 0.01)
    again = promote.promote(registry, v, 0.01)
    assert first["decision"] == again["decision"] == "promoted" and again["at"] == first["at"]


def test_the_champion_log_is_one_tag_per_event_and_the_history_replays_it(registry):  # noqa: F811
    """Hundreds of changes of champion: no tag value grows, and the rollback stack equals a plain
    list the test keeps by hand."""
    c = tracking.client(registry)
    name = registry.model_name
    tracking.ensure_model(c, name)
    stack, rng = [], __import__("random").Random(3)
    for i in range(240):
        if len(stack) >= 2 and rng.random() < 0.3:
            current = stack.pop()
            tracking.log_champion(c, name, stack[-1], f"rollback from v{current}", f"t{i}")
        else:
            stack.append(str(i))
            tracking.log_champion(c, name, str(i), "promoted", f"t{i}")
    tags = c.get_registered_model(name).tags
    assert max(len(v) for v in tags.values()) < 100
    assert tracking.champion_history(c, name) == stack
    assert len(tracking.champion_log(c, name)) == 240


def test_promotions_of_one_model_are_serialised(registry, tmp_path):  # noqa: F811
    """A second promotion waits while one holds the model's lock, then decides against the new champion."""
    import threading

    v1, v2 = candidate(registry, tmp_path, "one", "20.0"), candidate(registry, tmp_path, "two", "25.0")
    done = []
    with promote.serialised(registry.model_name):
        t = threading.Thread(target=lambda: done.append(promote.promote(registry, v2, 0.01)))
        t.start()
        t.join(timeout=3)
        assert t.is_alive() and not done, "the promotion did not wait for the lock"
        assert promote._promote(registry, v1, 0.01)["decision"] == "promoted"  # inside the lock
    t.join(timeout=60)
    assert done[0]["decision"] == "refused" and done[0]["champion"] == v1, done  # it saw v1, 25 > 20


def test_a_champion_with_another_tokenizer_is_compared_by_bits_per_byte(registry, tmp_path):  # noqa: F811
    """Perplexities over different tokenizations are not comparable; bits per byte are."""
    c = tracking.client(registry)
    name = registry.model_name
    old = candidate(registry, tmp_path, "old-tokenizer", "9.0")  # lower perplexity, but other tokens
    new = candidate(registry, tmp_path, "new-tokenizer", "30.0")
    for v, sha, bpb in ((old, "a" * 64, "1.60"), (new, "b" * 64, "1.20")):
        c.set_model_version_tag(name, v, "lmpipe.eval.tokenizer_sha256", sha)
        c.set_model_version_tag(name, v, "lmpipe.eval.bits_per_byte", bpb)
    assert promote.promote(registry, old, 0.01)["decision"] == "promoted"
    d = promote.promote(registry, new, 0.01)
    assert d["decision"] == "promoted" and d["metric"] == "bits_per_byte", d
    assert (d["candidate_perplexity"], d["champion_perplexity"]) == (1.20, 1.60)
