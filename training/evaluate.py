"""``lmpipe evaluate``: held-out perplexity of a candidate and the champion on the same shards.

    lmpipe evaluate --model PATH|models:/NAME/VERSION|models:/NAME@ALIAS --shards URI [--out DIR]

Deterministic: the whole validation split (or its first ``max_sequences``) in manifest
order, a fixed batch size, fp32, greedy samples. The comparison is only valid with the
same tokenizer; a model trained with another one is reported "not comparable".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import field
from pathlib import Path

from lmpipe import config as cfglib
from lmpipe.config import stage_config
from lmpipe.errors import ConfigError
from lmpipe.log import log
from lmpipe.settings import home
from lmpipe.storage import StorageConfig, join, open_store
from registry import resolve as resolver
from registry import tracking
from registry.tracking import TrackingConfig

CONFIG_FILE = "evaluate_config.json"  # the resolved config, beside metrics.json

PROMPTS = ["def ", "import ", "The ", "class "]


@stage_config
class EvalConfig:
    model: str = ""  # a model folder, s3:// prefix, models:/NAME/VERSION or models:/NAME@ALIAS
    shards: str = ""  # the shard set whose validation split is evaluated
    out: str | None = None  # where metrics.json goes (default: the model's training run's eval/, local or S3)
    batch_size: int = 8  # sequences per forward pass
    max_sequences: int | None = None  # evaluate at most this many (default: the whole split)
    sample_tokens: int = 24  # tokens per greedy sample
    compare_champion: bool = True  # also evaluate the current champion on the same shards
    seed: int = 0  # sampling seed
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def evaluate_one(model_dir: Path, shards, cfg: EvalConfig) -> dict:
    """Mean loss and perplexity over the validation split, plus greedy samples."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmpipe.storage import sha256_file

    want = shards.manifest["tokenizer"]["sha256"]
    have = sha256_file(model_dir / "tokenizer.json") if (model_dir / "tokenizer.json").is_file() else None
    if have != want:
        return {"comparable": False, "reason": f"tokenizer sha256 {have} differs from the shards' {want}"}
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, torch_dtype=torch.float32)
    model.eval()
    n = len(shards) if cfg.max_sequences is None else min(cfg.max_sequences, len(shards))
    total, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, n, cfg.batch_size):
            import numpy as np

            batch = torch.from_numpy(shards.rows(np.arange(start, min(start + cfg.batch_size, n))))
            logits = model(input_ids=batch[:, :-1]).logits.float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1),
                                                    reduction="sum")
            total += nll.item()
            count += batch[:, 1:].numel()
        tok = AutoTokenizer.from_pretrained(model_dir)
        samples = []
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=cfg.sample_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
            samples.append({"prompt": p, "completion": tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)})
    loss = total / max(count, 1)
    return {"comparable": True, "mean_loss": loss, "perplexity": math.exp(loss), "tokens": count, "sequences": n,
            "seconds": round(time.perf_counter() - t0, 2), "samples": samples}


def run(cfg: EvalConfig) -> dict:
    from training.data import ShardSet

    if not cfg.model or not cfg.shards:
        raise ConfigError("config keys 'model' and 'shards' are required (--model REF --shards URI)")
    tracking.s3_env(cfg.storage)
    model_dir, ref = resolver.resolve(cfg.model, cfg.tracking, cfg.storage)
    info = {"ref": cfg.model, "name": ref.name, "version": ref.version, "run_id": ref.run_id}
    cache = home() / "cache" / "shards"
    shards = ShardSet(cfg.shards, cache, cfg.storage, split="validation")
    manifest_sha = hashlib.sha256(open_store(cfg.shards, cfg.storage).get_bytes("manifest.json")).hexdigest()
    log(f"evaluating {cfg.model} on {len(shards):,} validation sequences of {cfg.shards}")
    result = {"shards": cfg.shards, "shards_manifest_sha256": manifest_sha, "batch_size": cfg.batch_size,
              "candidate": {**info, **evaluate_one(model_dir, shards, cfg)}}
    if cfg.compare_champion and tracking_ready(cfg):
        c = tracking.client(cfg.tracking)
        champ = tracking.alias_version(c, cfg.tracking.model_name, tracking.CHAMPION)
        if champ is not None and str(champ.version) != str(info.get("version")):
            cdir, cref = resolver.resolve(f"models:/{cfg.tracking.model_name}/{champ.version}", cfg.tracking,
                                          cfg.storage)
            log(f"evaluating champion version {champ.version} on the same shards")
            cinfo = {"ref": cref.ref, "name": cref.name, "version": cref.version, "run_id": cref.run_id}
            result["champion"] = {**cinfo, **evaluate_one(cdir, shards, cfg)}
            _record(c, cfg.tracking.model_name, champ.version, result["champion"], cfg.shards, manifest_sha)
    cand = result["candidate"]
    if info.get("version") is not None:
        c = tracking.client(cfg.tracking)
        _record(c, info.get("name", cfg.tracking.model_name), info["version"], cand, cfg.shards, manifest_sha)
        if cand["comparable"] and math.isfinite(cand["perplexity"]):
            c.set_registered_model_alias(info.get("name", cfg.tracking.model_name), tracking.CANDIDATE, info["version"])
    # beside the training run the model came from (local or on S3), else under $LMPIPE_HOME
    out = open_store(cfg.out or (join(ref.run, "eval") if ref.run else home() / "evals" / manifest_sha[:12]),
                     cfg.storage)
    out.put_bytes(CONFIG_FILE, cfglib.dump(cfg).encode())
    result["config_file"] = CONFIG_FILE
    out.put_bytes("metrics.json", json.dumps(result, indent=2).encode())
    result["metrics_path"] = out.url("metrics.json")
    log(summary(result))
    return result


def tracking_ready(cfg: EvalConfig) -> bool:
    if not cfg.tracking.enabled:
        return False
    c = tracking.client(cfg.tracking)
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(cfg.tracking.model_name)
        return True
    except MlflowException:
        return False


def _record(c, name: str, version, r: dict, shards: str, manifest_sha: str) -> None:
    """Evaluation results as tags on the model version (and metrics on its training run)."""
    tags = {"lmpipe.eval.shards": shards, "lmpipe.eval.shards_manifest_sha256": manifest_sha,
            "lmpipe.eval.comparable": str(r["comparable"]).lower()}
    if r["comparable"]:
        tags.update({"lmpipe.eval.perplexity": repr(r["perplexity"]), "lmpipe.eval.mean_loss": repr(r["mean_loss"])})
    for k, v in tags.items():
        c.set_model_version_tag(name, str(version), k, v)
    run_id = c.get_model_version(name, str(version)).run_id
    if run_id and r["comparable"]:
        c.log_metric(run_id, "eval_perplexity", r["perplexity"])
        c.log_metric(run_id, "eval_mean_loss", r["mean_loss"])


def summary(result: dict) -> str:
    rows = []
    for role in ("candidate", "champion"):
        r = result.get(role)
        if r is None:
            continue
        who = f"v{r['version']}" if r.get("version") else r["ref"]
        if r["comparable"]:
            rows.append(f"  {role:9} {who}: perplexity {r['perplexity']:.3f}, mean loss {r['mean_loss']:.4f} "
                        f"({r['tokens']:,} tokens)")
        else:
            rows.append(f"  {role:9} {who}: not comparable ({r['reason']})")
    return "evaluation on " + result["shards"] + "\n" + "\n".join(rows) + f"\n  metrics: {result['metrics_path']}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a model folder, s3:// prefix, models:/NAME/VERSION or models:/NAME@ALIAS (model)")
    p.add_argument("--shards", help="shard set whose validation split is evaluated (shards)")
    p.add_argument("--out", help="folder for metrics.json; default: the run's eval/ (out)")
    p.add_argument("--config", help="YAML or JSON config: evaluate keys, or a run config whose 'evaluate' section is used")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. max_sequences=200")


def config_from_args(args) -> EvalConfig:
    flags = {"model": args.model, "shards": args.shards, "out": args.out}
    return cfglib.from_cli(EvalConfig, args.config, args.overrides, flags, "evaluate")
