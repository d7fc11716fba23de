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
import sys
import time
from dataclasses import field
from pathlib import Path

from lmpipe import config as cfglib
from lmpipe import tracking
from lmpipe.config import stage_config
from lmpipe.errors import LmpipeError
from lmpipe.log import log
from lmpipe.storage import StorageConfig, open_store
from lmpipe.tracking import TrackingConfig

PROMPTS = ["def ", "import ", "The ", "class "]


@stage_config
class EvalConfig:
    model: str = ""
    shards: str = ""
    out: str | None = None  # where metrics.json goes (default: the run's eval/ folder)
    batch_size: int = 8
    max_sequences: int | None = None
    sample_tokens: int = 24
    compare_champion: bool = True
    seed: int = 0
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def resolve_model(ref: str, cfg: EvalConfig) -> tuple[Path, dict]:
    """A local model folder for ``ref``, and what we know of it (registry version, run)."""
    info: dict = {"ref": ref}
    if ref.startswith("models:/"):
        import mlflow

        c = tracking.client(cfg.tracking)
        name, _, rest = ref[len("models:/"):].partition("/")
        name, _, alias = name.partition("@")
        v = tracking.alias_version(c, name, alias) if alias else c.get_model_version(name, rest)
        if v is None:
            raise LmpipeError(f"{ref}: no model version has alias {alias!r}")
        dest = tracking.home() / "models" / name / str(v.version)
        if not (dest / "config.json").is_file():
            mlflow.artifacts.download_artifacts(f"models:/{name}/{v.version}", dst_path=str(dest))
        info.update(name=name, version=v.version, run_id=v.run_id, tags=dict(v.tags))
        return dest, info
    if ref.startswith("s3://"):
        dest = tracking.home() / "models" / hashlib.sha256(ref.encode()).hexdigest()[:16]
        if not (dest / "config.json").is_file():
            open_store(ref, cfg.storage).download_prefix("", dest)
        return dest, info
    path = Path(open_store(ref).root)
    if not (path / "config.json").is_file():
        raise LmpipeError(f"{ref} is not a model folder (no config.json): pass a run's export/ or models:/NAME@ALIAS")
    mv = path.parent / "model_version.json"
    if mv.is_file():
        info.update(json.loads(mv.read_text()))
    return path, info


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
        raise LmpipeError("--model and --shards are required")
    tracking.s3_env(cfg.storage)
    model_dir, info = resolve_model(cfg.model, cfg)
    cache = tracking.home() / "cache" / "shards"
    shards = ShardSet(cfg.shards, cache, cfg.storage, split="validation")
    manifest_sha = hashlib.sha256(open_store(cfg.shards, cfg.storage).get_bytes("manifest.json")).hexdigest()
    log(f"evaluating {cfg.model} on {len(shards):,} validation sequences of {cfg.shards}")
    result = {"shards": cfg.shards, "shards_manifest_sha256": manifest_sha, "batch_size": cfg.batch_size,
              "candidate": {**info, "tags": None, **evaluate_one(model_dir, shards, cfg)}}
    if cfg.compare_champion and tracking_ready(cfg):
        c = tracking.client(cfg.tracking)
        champ = tracking.alias_version(c, cfg.tracking.model_name, tracking.CHAMPION)
        if champ is not None and str(champ.version) != str(info.get("version")):
            cdir, cinfo = resolve_model(f"models:/{cfg.tracking.model_name}/{champ.version}", cfg)
            log(f"evaluating champion version {champ.version} on the same shards")
            result["champion"] = {**cinfo, "tags": None, **evaluate_one(cdir, shards, cfg)}
            _record(c, cfg.tracking.model_name, champ.version, result["champion"], cfg.shards, manifest_sha)
    cand = result["candidate"]
    if info.get("version") is not None:
        c = tracking.client(cfg.tracking)
        _record(c, info.get("name", cfg.tracking.model_name), info["version"], cand, cfg.shards, manifest_sha)
        if cand["comparable"] and math.isfinite(cand["perplexity"]):
            c.set_registered_model_alias(info.get("name", cfg.tracking.model_name), tracking.CANDIDATE, info["version"])
    out = Path(cfg.out) if cfg.out else (model_dir.parent / "eval" if (model_dir.parent / "train_config.json").is_file()
                                          else tracking.home() / "evals" / manifest_sha[:12])
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    result["metrics_path"] = str(out / "metrics.json")
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
    p.add_argument("--model", help="a model folder, s3:// prefix, models:/NAME/VERSION or models:/NAME@ALIAS")
    p.add_argument("--shards", help="shard set whose validation split is evaluated")
    p.add_argument("--out", help="folder for metrics.json (default: the run's eval/)")
    p.add_argument("--config", help="YAML or JSON config (an 'evaluate:' section is used if present)")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def config_from_args(args) -> EvalConfig:
    flags = {"model": args.model, "shards": args.shards, "out": args.out}
    return cfglib.from_cli(EvalConfig, args.config, args.overrides, flags, "evaluate")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lmpipe evaluate")
    add_arguments(p)
    try:
        run(config_from_args(p.parse_args(argv)))
    except LmpipeError as exc:
        print(f"lmpipe evaluate: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0

