"""The promotion gate: ``lmpipe promote --candidate VERSION | --run DIR``, ``--rollback``, and ``lmpipe models``.

``champion`` moves to the candidate only if its training run completed, its shards passed
the data checks, and it beats the champion's validation perplexity on the same shards by
``margin`` (relative). Every decision, taken or refused, is recorded on the model version.
With ``run`` (a training run folder, as lm_pipeline gives it) the candidate is the version
that run registered, and the run's HTML report is written after the decision.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import re
from collections.abc import Iterator
from dataclasses import field

from lmpipe import config as cfglib
from lmpipe.config import stage_config
from lmpipe.errors import ConfigError, ExitCode, LmpipeError
from lmpipe.log import log
from lmpipe.settings import home
from lmpipe.storage import StorageConfig, open_store
from registry import tracking
from registry.tracking import TrackingConfig

EXIT_REFUSED = ExitCode.REFUSED


@stage_config
class PromoteConfig:
    candidate: str | None = None  # the model version to promote ...
    run: str | None = None  # ... or the training run folder whose registered version is the candidate
    margin: float = 0.01  # required relative perplexity improvement over the champion
    rollback: bool = False  # move champion back to the previous champion instead
    report: bool = True  # write the run's HTML report (run/report/index.html) after the decision
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


def run(cfg: PromoteConfig) -> int:
    """Promote (or roll back); print the decision; exit code OK, or REFUSED."""
    if cfg.rollback:
        rollback(cfg.tracking)
        return ExitCode.OK
    version = cfg.candidate or _registered_version(cfg.run, cfg.storage)
    d = promote(cfg.tracking, version, cfg.margin)
    print(describe(d))
    if cfg.report and cfg.run:
        from registry import report

        print(report.build_uri(cfg.run, cfg.storage))
    return ExitCode.OK if d["decision"] == "promoted" else EXIT_REFUSED


def _registered_version(run_dir: str | None, storage=None) -> str:
    if not run_dir:
        raise ConfigError("give --candidate VERSION, --run DIR or --rollback")
    store = open_store(run_dir, storage)
    if not store.exists("model_version.json"):
        raise LmpipeError(f"{run_dir} registered no model version (no model_version.json): did its training finish?")
    return str(json.loads(store.get_bytes("model_version.json"))["version"])


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _score(v, shards_sha: str, metric: str) -> float | None:
    """A version's evaluation on the shard set ``shards_sha``: ``perplexity`` or ``bits_per_byte``."""
    t = v.tags
    if t.get("lmpipe.eval.shards_manifest_sha256") == shards_sha and t.get("lmpipe.eval.comparable") == "true":
        value = t.get(f"lmpipe.eval.{metric}")
        return float(value) if value is not None else None
    return None


def _metric(cand, champ) -> str:
    """Perplexity between models that share a tokenizer; bits per byte, which does not depend on
    the tokenizer, between models that do not."""
    a, b = cand.tags.get("lmpipe.eval.tokenizer_sha256"), champ.tags.get("lmpipe.eval.tokenizer_sha256")
    return "bits_per_byte" if a and b and a != b else "perplexity"


def decide(c, name: str, version: str, margin: float) -> dict:
    """The gate's decision and its reasons, with the numbers compared."""
    cand = c.get_model_version(name, version)
    reasons = []
    run_status = c.get_run(cand.run_id).info.status if cand.run_id else "UNKNOWN"
    if cand.tags.get("lmpipe.training_status") != "FINISHED" or run_status != "FINISHED":
        reasons.append(f"training run did not complete (run status {run_status})")
    checks = cand.tags.get("lmpipe.data_checks_success", "missing")
    if checks != "true":
        reasons.append(f"data checks of its shards did not pass ({checks}: {cand.tags.get('lmpipe.data_checks')})")
    shards_sha = cand.tags.get("lmpipe.eval.shards_manifest_sha256")
    cand_ppl = _score(cand, shards_sha, "perplexity") if shards_sha else None
    if cand_ppl is None:
        reasons.append("no comparable evaluation of the candidate: run `lmpipe evaluate` first")
    elif not math.isfinite(cand_ppl):
        reasons.append(f"its perplexity is not finite ({cand_ppl}): a diverged model is never promoted")
    champ = tracking.alias_version(c, name, tracking.CHAMPION)
    champ_ppl, metric = None, "perplexity"
    if champ is not None and str(champ.version) != str(version) and cand_ppl is not None:
        metric = _metric(cand, champ)
        mine, champ_ppl = _score(cand, shards_sha, metric), _score(champ, shards_sha, metric)
        label = "perplexity" if metric == "perplexity" else "bits per byte (another tokenizer)"
        if champ_ppl is None or mine is None:
            reasons.append(f"champion v{champ.version} is not comparable on the candidate's shards")
        elif not mine <= champ_ppl * (1 - margin):
            reasons.append(f"{label} {mine:.4f} is not better than champion v{champ.version}'s "
                           f"{champ_ppl:.4f} by {margin:.1%}")
        if metric == "bits_per_byte":
            cand_ppl = mine
    elif champ is not None and str(champ.version) == str(version):
        reasons.append(f"v{version} is already the champion")
    return {"decision": "refused" if reasons else "promoted", "reasons": reasons, "candidate": str(version),
            "candidate_perplexity": cand_ppl, "champion": champ and str(champ.version),
            "champion_perplexity": champ_ppl, "metric": metric, "margin": margin, "at": _now()}


def already_promoted(c, name: str, version: str) -> dict | None:
    """When ``version`` already holds the champion alias (a retried promotion, or one run again):
    its promotion stands. An attempt that moved the alias and stopped before its bookkeeping
    (event log, then decision tags) has it finished here, once."""
    champ = tracking.alias_version(c, name, tracking.CHAMPION)
    if champ is None or str(champ.version) != version:
        return None
    events = tracking.champion_log(c, name)
    logged = bool(events) and events[-1][:2] == [version, "promoted"]
    last = json.loads(champ.tags.get("lmpipe.promotion.last") or "{}")
    if logged and last.get("decision") == "promoted" and last.get("at") == events[-1][2]:
        log(f"v{version} is the champion already: its promotion at {last['at']} stands")
        return last
    d = {"decision": "promoted", "reasons": [], "candidate": version, "candidate_perplexity": None,
         "champion": None, "champion_perplexity": None, "resumed": True,
         "at": events[-1][2] if logged else _now()}
    if not logged:
        tracking.log_champion(c, name, version, "promoted", d["at"])
    c.set_model_version_tag(name, version, f"lmpipe.promotion.{d['at']}", json.dumps(d))
    c.set_model_version_tag(name, version, "lmpipe.promotion.last", json.dumps(d))
    log(f"v{version} holds the champion alias from an earlier attempt: its promotion is now complete")
    return d


@contextlib.contextmanager
def serialised(name: str) -> Iterator[None]:
    """One promotion or rollback of ``name`` at a time on this machine (an exclusive lock under
    ``$LMPIPE_HOME/locks``). Across machines, lm_pipeline runs one promote task at a time."""
    import fcntl

    path = home() / "locks" / f"promote-{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def promote(cfg, version: str, margin: float) -> dict:
    with serialised(cfg.model_name):
        return _promote(cfg, version, margin)


def _promote(cfg, version: str, margin: float) -> dict:
    c = tracking.client(cfg)
    name = cfg.model_name
    if (done := already_promoted(c, name, str(version))) is not None:
        return done
    d = decide(c, name, str(version), margin)
    if d["decision"] == "promoted":
        c.set_registered_model_alias(name, tracking.CHAMPION, str(version))
        tracking.log_champion(c, name, str(version), "promoted", d["at"])
    c.set_model_version_tag(name, str(version), f"lmpipe.promotion.{d['at']}", json.dumps(d))
    c.set_model_version_tag(name, str(version), "lmpipe.promotion.last", json.dumps(d))
    log(describe(d))
    return d


def rollback(cfg) -> dict:
    with serialised(cfg.model_name):
        return _rollback(cfg)


def _rollback(cfg) -> dict:
    c = tracking.client(cfg)
    name = cfg.model_name
    hist = tracking.champion_history(c, name)
    if len(hist) < 2:
        raise LmpipeError(f"{name} has no previous champion to roll back to (history: {hist})")
    current, previous = hist[-1], hist[-2]
    c.set_registered_model_alias(name, tracking.CHAMPION, previous)
    d = {"decision": "rolled back", "from": current, "to": previous, "at": _now()}
    tracking.log_champion(c, name, previous, f"rollback from v{current}", d["at"])
    c.set_model_version_tag(name, current, f"lmpipe.promotion.{d['at']}", json.dumps(d))
    c.set_model_version_tag(name, previous, f"lmpipe.promotion.{d['at']}", json.dumps(d))
    log(f"champion rolled back from v{current} to v{previous}")
    return d


def describe(d: dict) -> str:
    if d["decision"] == "promoted" and d.get("candidate_perplexity") is None:
        return f"promoted v{d['candidate']} to champion (an earlier attempt moved the alias; its promotion stands)"
    if d["decision"] == "promoted":
        champ = f" over champion v{d['champion']} ({d['champion_perplexity']:.4f})" if d["champion"] else " (no champion yet)"
        what = "bits per byte" if d.get("metric") == "bits_per_byte" else "perplexity"
        return f"promoted v{d['candidate']} to champion: {what} {d['candidate_perplexity']:.4f}{champ}"
    return f"refused to promote v{d['candidate']}: " + "; ".join(d["reasons"])


def models_table(cfg) -> str:
    c = tracking.client(cfg)
    name = cfg.model_name
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        return f"no registered model {name!r} yet"
    log_ = tracking.champion_log(c, name)
    rows = [("version", "aliases", "perplexity", "data", "date", "champion history")]
    found = c.search_model_versions(f"name='{name}'")
    # search results do not carry aliases: fetch each version
    for v in sorted((c.get_model_version(name, str(x.version)) for x in found), key=lambda v: int(v.version)):
        ppl = v.tags.get("lmpipe.eval.perplexity")
        rows.append((v.version, ",".join(v.aliases) or "-", f"{float(ppl):.3f}" if ppl and math.isfinite(float(ppl)) else "-",
                     v.tags.get("lmpipe.shards_manifest", "-").removesuffix("/manifest.json"),
                     dt.datetime.fromtimestamp(v.creation_timestamp / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                     ",".join(f"#{i + 1}" for i, (h, _e, _t) in enumerate(log_) if h == str(v.version)) or "-"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows)
    events = "\n".join(f"  #{i + 1} {t}  v{v}  {e}" for i, (v, e, t) in enumerate(log_))
    return table + ("\n\nchampion history:\n" + events if events else "")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--candidate", help="model version to promote (candidate)")
    g.add_argument("--run", help="training run folder: promote the version it registered (run)")
    g.add_argument("--rollback", action="store_true", default=None,
                   help="move champion back to the previous champion (rollback)")
    p.add_argument("--margin", type=float, help="required relative perplexity improvement (margin)")
    p.add_argument("--config", help="YAML or JSON config: promote keys, or a run config whose 'promote' section is used")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. tracking.model_name=lmpipe")


def config_from_args(args: argparse.Namespace) -> PromoteConfig:
    flags = {"candidate": args.candidate, "run": args.run, "rollback": args.rollback, "margin": args.margin}
    return cfglib.from_cli(PromoteConfig, args.config, args.overrides, flags, "promote")
