"""``lmpipe evaluate``: held-out perplexity of a candidate and the champion on the same shards.

    lmpipe evaluate --model PATH|models:/NAME/VERSION|models:/NAME@ALIAS --shards URI [--out DIR]

Deterministic: the whole validation split (or its first ``max_sequences``) in manifest
order, a fixed batch size, fp32, greedy samples. Perplexity compares models that share the
shards' tokenizer. Bits per byte (the summed loss in bits over the UTF-8 bytes the predicted
tokens stand for) does not depend on the tokenizer: a model with another tokenizer is scored
on the same text, re-encoded with its own tokenizer, and compared by bits per byte.
"""

from __future__ import annotations

import argparse
import functools
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


def token_bytes(tok):
    """UTF-8 bytes each token id of a ``tokenizers.Tokenizer`` stands for (0 for special tokens):
    byte-level BPE pieces through the GPT-2 byte-to-character table, other pieces by decoding."""
    import numpy as np

    chars = set(_char_bytes())
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    out = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for piece, i in tok.get_vocab().items():
        if piece not in special:
            out[i] = len(piece) if all(c in chars for c in piece) else len(tok.decode([i]).encode("utf-8"))
    return out


@functools.cache
def _char_bytes() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character to byte (built once)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def retokenized(row, shard_tok, shard_eos: int, model_tok, model_eos: int, limit: int) -> list[int]:
    """One validation sequence re-encoded with another tokenizer: the same bytes and the same
    document boundaries (the shards' EOS becomes the model's), cut to the model's context."""
    ids: list[int] = []
    piece: list[int] = []
    for t in [*row.tolist(), None]:
        if t is not None and t != shard_eos:
            piece.append(t)
            continue
        ids += model_tok.encode(shard_tok.decode(piece), add_special_tokens=False).ids  # byte-level decode
        if t is not None:
            ids.append(model_eos)
        piece = []
    return ids[:limit]


def evaluate_one(model_dir: Path, shards, cfg: EvalConfig) -> dict:
    """Loss, perplexity and bits per byte over the validation split, plus greedy samples."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmpipe.storage import sha256_file

    want = shards.manifest["tokenizer"]["sha256"]
    have = sha256_file(model_dir / "tokenizer.json") if (model_dir / "tokenizer.json").is_file() else None
    if have is None:
        return {"comparable": False, "reason": f"{model_dir} has no tokenizer.json"}
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, torch_dtype=torch.float32)
    model.eval()
    n = len(shards) if cfg.max_sequences is None else min(cfg.max_sequences, len(shards))
    model_tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    nbytes, same = token_bytes(model_tok), have == want
    if not same:  # the same text, in this model's own tokens
        shard_tok = Tokenizer.from_str(shards.store.get_bytes(shards.manifest["tokenizer"]["path"]).decode())
        shard_eos, limit = shards.manifest["tokenizer"]["eos_id"], model.config.max_position_embeddings
    total, count, nbytes_total = 0.0, 0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        step = cfg.batch_size if same else 1
        for start in range(0, n, step):
            rows = shards.rows(np.arange(start, min(start + step, n)))
            if same:
                batch = torch.from_numpy(rows)
            else:
                batch = torch.tensor([retokenized(rows[0], shard_tok, shard_eos, model_tok, model.config.eos_token_id,
                                                  limit)])
            logits = model(input_ids=batch[:, :-1]).logits.float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1),
                                                    reduction="sum")
            total += nll.item()
            count += batch[:, 1:].numel()
            nbytes_total += int(nbytes[batch[:, 1:].numpy()].sum())
        tok = AutoTokenizer.from_pretrained(model_dir)
        samples = []
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=cfg.sample_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
            samples.append({"prompt": p, "completion": tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)})
    loss = total / max(count, 1)
    bpb = total / math.log(2) / nbytes_total if nbytes_total else float("nan")
    return {"comparable": True, "same_tokenizer": same, "tokenizer_sha256": have, "mean_loss": loss,
            "perplexity": math.exp(loss), "bits_per_byte": bpb, "tokens": count, "bytes": nbytes_total,
            "sequences": n, "seconds": round(time.perf_counter() - t0, 2), "samples": samples}


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
        tags.update({"lmpipe.eval.perplexity": repr(r["perplexity"]), "lmpipe.eval.mean_loss": repr(r["mean_loss"]),
                     "lmpipe.eval.bits_per_byte": repr(r["bits_per_byte"]),
                     "lmpipe.eval.tokenizer_sha256": r["tokenizer_sha256"]})
    for k, v in tags.items():
        c.set_model_version_tag(name, str(version), k, v)
    run_id = c.get_model_version(name, str(version)).run_id
    if run_id and r["comparable"]:
        c.log_metric(run_id, "eval_perplexity", r["perplexity"])
        c.log_metric(run_id, "eval_mean_loss", r["mean_loss"])
        c.log_metric(run_id, "eval_bits_per_byte", r["bits_per_byte"])


def summary(result: dict) -> str:
    rows = []
    for role in ("candidate", "champion"):
        r = result.get(role)
        if r is None:
            continue
        who = f"v{r['version']}" if r.get("version") else r["ref"]
        if r["comparable"]:
            ppl = f"perplexity {r['perplexity']:.3f}, " if r.get("same_tokenizer", True) else "another tokenizer: "
            rows.append(f"  {role:9} {who}: {ppl}{r['bits_per_byte']:.4f} bits/byte, mean loss {r['mean_loss']:.4f} "
                        f"({r['tokens']:,} tokens, {r['bytes']:,} bytes)")
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
