"""One training rank, started by the DeepSpeed launcher: ``deepspeed --module training.rank --run-dir D``.

Reads the resolved config that ``lmpipe train`` wrote into the run folder, builds the model,
resumes from the newest committed checkpoint if there is one, trains, checkpoints, exports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lmpipe import config as cfglib
from lmpipe.errors import LmpipeError

EXIT_NAN = 3


def _say(rank: int, msg: str) -> None:
    if rank == 0:
        print(f"[train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _all_finite(t, dist) -> bool:
    import torch

    flag = torch.tensor([1.0 if bool(torch.isfinite(t).all()) else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.item() == 1.0


def _params_finite(engine, dist) -> bool:
    import torch

    ok = all(bool(torch.isfinite(getattr(p, "ds_tensor", p).data).all()) for p in engine.module.parameters())
    flag = torch.tensor([1.0 if ok else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.item() == 1.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--local_rank", type=int, default=None)  # passed by some launchers
    args = ap.parse_args(argv)
    try:
        return train(Path(args.run_dir))
    except LmpipeError as exc:
        print(f"[train rank {os.environ.get('RANK', '?')}] error: {exc}", file=sys.stderr, flush=True)
        return 1


def train(run: Path) -> int:
    import deepspeed
    import torch
    import torch.nn.functional as F
    from deepspeed import comm as dist

    from training import checkpoint as ckpt
    from training import data as datalib
    from training import ds_config, export, lineage, recipes, sync
    from training.config import TrainConfig

    cfg = cfglib.build(TrainConfig, json.loads((run / "train_config.json").read_text()))
    resolved = json.loads((run / "resolved.json").read_text())
    cpu = not torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if not cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    prec = ds_config.precision(cfg.deepspeed.precision)
    b = ds_config.batch(cfg.micro_batch_size, cfg.grad_accum, world, cfg.global_batch_size)

    data = datalib.ShardSet(cfg.shards, run / "cache" / "shards", cfg.storage)
    order = datalib.Order(len(data), b.micro, world, cfg.seed)
    man = data.manifest
    vocab, eos = man["tokenizer"]["vocab_size"], man["tokenizer"]["eos_id"]
    mcfg = cfglib.build(recipes.ModelConfig, resolved["model"])
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = recipes.build_model(mcfg, vocab, eos)
    tags = ckpt.committed(run / "checkpoints")
    if resolved.get("init_weights") and not tags:
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(load_file(resolved["init_weights"]["path"]), strict=False)
        tied = {"lm_head.weight"} if mcfg.tie_embeddings else set()
        if unexpected or set(missing) - tied:
            raise LmpipeError(f"init_from: weights do not fit the model (missing {missing}, unexpected {unexpected})")
        _say(rank, f"warm start: weights from {resolved['init_weights']['ref']}")
    if cfg.deepspeed.activation_checkpointing:
        model.gradient_checkpointing_enable()
    n_params = sum(p.numel() for p in model.parameters())
    ds = json.loads((run / "ds_config.json").read_text())
    ds["train_batch_size"] = b.global_size  # world size is only known here, on the ranks
    ds["gradient_accumulation_steps"] = b.accum
    engine, _, _, sched = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    device = engine.device

    tokens_per_step = b.global_size * data.seq_len
    _say(rank, f"{world} ranks ({'CPU/gloo' if cpu else 'GPU/nccl'}), ZeRO-{cfg.deepspeed.zero_stage}, {prec}; "
               f"{n_params:,} params; batch {b.micro} x {b.accum} accum x {world} ranks = {b.global_size} "
               f"sequences = {tokens_per_step:,} tokens per step")
    _say(rank, ds_config.memory_table(n_params, world, prec))
    _say(rank, datalib.describe(data, order))

    step, position, nan_streak = 0, 0, 0
    root = run / "checkpoints"
    if tags:
        marker = ckpt.verify(root, tags[-1])
        try:
            path, client = engine.load_checkpoint(str(root), tag=tags[-1], load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        except Exception as exc:
            raise LmpipeError(f"checkpoint {root / tags[-1]} cannot be loaded: {type(exc).__name__}: {exc}") from None
        if path is None:  # DeepSpeed only warns: never silently start from step 0
            raise LmpipeError(f"DeepSpeed found no checkpoint in {root / tags[-1]}: refusing to restart from step 0")
        step, position = marker["step"], marker["position"]
        rng = root / tags[-1] / f"rng-rank{rank}.pt"
        if rng.is_file():
            torch.set_rng_state(torch.load(rng, weights_only=True))
        _say(rank, f"resumed from {root / tags[-1]} at step {step} (data position {position})")

    def save() -> None:
        if not _params_finite(engine, dist):
            raise LmpipeError(f"the model has non-finite weights at step {step}: not checkpointing it")
        t = ckpt.tag(step)
        engine.save_checkpoint(str(root), tag=t, client_state={"step": step, "position": position},
                               save_latest=False)
        (root / t).mkdir(parents=True, exist_ok=True)
        torch.save(torch.get_rng_state(), root / t / f"rng-rank{rank}.pt")
        dist.barrier()  # every rank has written its part
        if rank == 0:
            ckpt.commit(root, t, {"step": step, "position": position, "world_size": world})
            ckpt.prune(root, cfg.keep_checkpoints)
            where = sync.upload_checkpoint(run, cfg, t)
            _say(rank, f"checkpoint {t} committed{f' and uploaded to {where}' if where else ''}")
        dist.barrier()

    loader = datalib.Loader(data, order, rank, position, cfg.prefetch)
    metrics = open(run / "metrics.jsonl", "a", buffering=1) if rank == 0 else None  # line-buffered: survives a kill
    batches = open(run / "batches.jsonl", "a", buffering=1) if rank == 0 and cfg.debug.log_batches else None
    flops_tok = ds_config.flops_per_token(n_params, mcfg.num_layers, mcfg.hidden_size, data.seq_len)
    start_step, t_start = step, time.perf_counter()
    t_log, losses, waited0 = time.perf_counter(), [], 0.0
    launched_steps = 0
    while step < cfg.max_steps:
        pos, batch = loader.next()
        batch = batch.to(device)
        logits = engine(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        if pos in cfg.debug.inject_nan_steps:
            loss = loss * float("nan")
        position = pos + 1
        if not _all_finite(loss.detach(), dist):
            # Drop this micro-batch: no backward, no step, so DeepSpeed's state is untouched.
            nan_streak += 1
            _say(rank, f"non-finite loss at step {step} (data position {pos}): micro-batch skipped "
                       f"({nan_streak} in a row)")
            if nan_streak >= cfg.nan_abort_after:
                _say(rank, f"aborting: {nan_streak} consecutive non-finite losses (nan_abort_after)")
                loader.close()
                return EXIT_NAN
            continue
        nan_streak = 0
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
        if batches is not None:
            batches.write(json.dumps({"position": pos, "ids": order.global_ids(pos).tolist()}) + "\n")
        if not boundary:
            continue
        step += 1
        launched_steps += 1
        if cfg.debug.step_delay_s:
            time.sleep(cfg.debug.step_delay_s)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            mean = torch.stack(losses).mean()
            dist.all_reduce(mean)
            mean = mean.item() / world
            now = time.perf_counter()
            dt_ = now - t_log
            done = step - start_step
            tps = cfg.log_every * tokens_per_step / dt_ if dt_ else 0.0
            eta = (now - t_start) / max(done, 1) * (cfg.max_steps - step)
            line = {"step": step, "loss": round(mean, 5), "lr": sched.get_last_lr()[0], "tokens_per_s": round(tps),
                    "data_wait_frac": round((loader.waited - waited0) / dt_, 4) if dt_ else 0.0,
                    "time": time.time()}
            extra = ""
            if cpu:
                import resource

                line["max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
            else:
                mfu = tps * flops_tok / (cfg.launch.peak_tflops * 1e12 * world)
                mem = torch.cuda.max_memory_allocated() / 2**30
                line.update(mfu=round(mfu, 4), max_mem_gib=round(mem, 2))
                extra = f" | MFU {mfu:.1%} | mem {mem:.1f} GiB"
            _say(rank, f"step {step}/{cfg.max_steps} | loss {mean:.4f} | lr {line['lr']:.2e} | {tps:,.0f} tok/s | "
                       f"ETA {eta:.0f}s | data wait {line['data_wait_frac']:.1%}{extra}")
            if metrics:
                metrics.write(json.dumps(line) + "\n")
                try:
                    lineage.log_metrics(resolved.get("mlflow_run_id"), line, step)
                except Exception as exc:  # tracking trouble must not kill a training run
                    _say(rank, f"warning: could not log metrics to MLflow: {exc}")
            t_log, losses, waited0 = now, [], loader.waited
        if step % cfg.save_every == 0 and step < cfg.max_steps:
            save()
        if cfg.debug.exit_after_steps and launched_steps >= cfg.debug.exit_after_steps:
            loader.close()
            return 0
    loader.close()
    for f in (metrics, batches):
        if f:
            f.close()
    latest = ckpt.committed(root)
    if not latest or latest[-1] != ckpt.tag(step):
        save()
    export.export(engine, run, data, resolved, rank, dist, step)
    _say(rank, f"done: {step} steps; model exported to {run / 'export'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
