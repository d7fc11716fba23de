"""Benchmark: DeepSpeed ZeRO-2 and ZeRO-3 training against a plain PyTorch loop, same model and batch.

Prints one JSON line per result: tokens/s, MFU (on GPU, against --peak-tflops, default
989 for H100 SXM bf16, with the nanoGPT FLOP formula), peak memory against the ZeRO
paper's bytes-per-parameter formula, data-wait share, and the ratios to the plain loop.

    .venv/bin/python bench/bench_train.py                       # CPU: tiny recipe, seq 256
    python bench/bench_train.py --recipe gpt2-124m --seq-len 1024 --micro 16 --steps 60   # one GPU
"""

import argparse
import os
import sys
import json
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from lmpipe import manifest
from lmpipe.manifest import token_dtype, write_shard
from lmpipe.storage import open_store, sha256_file


def emit(**kw) -> None:
    print(json.dumps({"bench": "train", **kw}), flush=True)


def synthetic_shards(out: Path, vocab: int, seq_len: int, sequences: int) -> Path:
    """Random-token shards in the real format (training speed does not depend on the text)."""
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    (out / "tokenizer.json").write_text(tok.to_str())
    splits = {}
    for split, n in (("train", sequences), ("validation", max(8, sequences // 50))):
        (out / split).mkdir(exist_ok=True)
        rel = f"{split}/part-00000-00000.parquet"
        write_shard(rng.integers(0, vocab, (n, seq_len + 1)).astype(token_dtype(vocab)), str(out / rel))
        e = {"path": rel, "sequences": n, "tokens": n * (seq_len + 1), "bytes": (out / rel).stat().st_size,
             "sha256": sha256_file(out / rel)}
        splits[split] = {"sequences": n, "tokens": e["tokens"], "documents": n, "shards": [e]}
    manifest.write(open_store(out), {
        "format_version": 1, "seq_len": seq_len, "dtype": str(token_dtype(vocab)),
        "tokenizer": {"path": "tokenizer.json", "sha256": sha256_file(out / "tokenizer.json"), "vocab_size": vocab,
                      "eos_id": 0},
        "splits": splits, "input": {"uri": "synthetic", "documents_read": 0, "documents_used": 0,
                                    "duplicates_removed": 0, "skipped": {}},
        "created_at": "bench", "run_id": "bench", "config": {}})
    return out


def plain_loop(args, vocab: int, shards: Path) -> dict:
    """The baseline: the same HF model, AdamW, clipping and batch, no DeepSpeed."""
    import torch
    import torch.nn.functional as F

    from training import ds_config, recipes
    from training.data import Order, ShardSet

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    m = recipes.recipe(args.recipe).model
    torch.manual_seed(0)
    model = recipes.build_model(m, vocab, 0).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=cuda)
    data = ShardSet(str(shards), shards / "_cache")
    order = Order(len(data), args.micro, 1, 0)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = None
    for step in range(args.steps):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        batch = torch.from_numpy(data.rows(order.rank_ids(step, 0))).to(dev)
        with amp:
            logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tps = (args.steps - args.warmup) * args.micro * args.seq_len / dt
    # GPU: peak allocated; CPU: peak RSS of the process (model states plus everything else)
    mem = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    flops = ds_config.flops_per_token(n_params, m.num_layers, m.hidden_size, args.seq_len)
    return {"tokens_per_s": tps, "peak_mem_gib": mem / 2**30, "params": n_params,
            "mfu": tps * flops / (args.peak_tflops * 1e12) if cuda else None}


def deepspeed_run(args, stage: int, shards: Path, work: Path) -> dict:
    out = work / f"zero{stage}"
    cmd = [sys.executable, "-m", "lmpipe.cli", "train", "--shards", str(shards), "--out", str(out), "--fresh",
           "--recipe", args.recipe, "--zero-stage", str(stage), "--nproc", "1", f"micro_batch_size={args.micro}",
           f"max_steps={args.steps}", f"log_every={args.warmup}", f"save_every={10**6}", "optim.lr=1e-4",
           f"launch.peak_tflops={args.peak_tflops}", "prefetch=4"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steady = lines[1:] or lines  # the first window includes compilation and warm-up
    tps = sum(x["tokens_per_s"] for x in steady) / len(steady)
    return {"tokens_per_s": tps, "data_wait_frac": max(x["data_wait_frac"] for x in steady),
            "mfu": steady[-1].get("mfu"),
            "peak_mem_gib": steady[-1].get("max_mem_gib", steady[-1].get("max_rss_gib"))}


def main() -> None:
    import torch

    from training import ds_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=None, help="default: 4096 for tiny, else 50304")
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    vocab = args.vocab or (4096 if args.recipe == "tiny" else 50304)
    work = Path(tempfile.mkdtemp(prefix="lmpipe-bench-train-"))
    shards = synthetic_shards(work / "shards", vocab, args.seq_len, max(args.micro * args.steps, 256))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu x{os.cpu_count()}"
    prec = ds_config.precision("auto")

    base = plain_loop(args, vocab, shards)
    emit(metric="plain_pytorch", recipe=args.recipe, seq_len=args.seq_len, micro_batch=args.micro, device=device,
         precision=prec, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in base.items()})
    goals = {2: 0.95, 3: 0.8}
    for stage in (2, 3):
        r = deepspeed_run(args, stage, shards, work)
        formula = ds_config.memory_per_rank(base["params"], 1, stage, prec) / 2**30
        emit(metric=f"zero{stage}", device=device, tokens_per_s=round(r["tokens_per_s"]),
             ratio_vs_plain=round(r["tokens_per_s"] / base["tokens_per_s"], 3), goal=goals[stage],
             mfu=r["mfu"], peak_mem_gib=r["peak_mem_gib"], zero_formula_model_states_gib=round(formula, 3),
             data_wait_frac=r["data_wait_frac"], data_wait_goal="<= 0.01")


if __name__ == "__main__":
    main()
