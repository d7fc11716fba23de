"""One training rank, started by DeepSpeed's launcher: ``deepspeed --module training.trainer --run-dir D``.

It reads what ``lmpipe train`` resolved into the run folder (config, model shape, batch,
precision), and :class:`Trainer` does the rest in plain steps: ``setup`` (process group,
data, model, DeepSpeed engine), ``resume`` (the newest committed checkpoint), ``train_step``
(one micro-batch), ``log``, ``save``, and at the end the export.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lmpipe import config as cfglib
from lmpipe import settings
from lmpipe.errors import ExitCode, LmpipeError
from lmpipe.log import log

EXIT_NAN = ExitCode.NAN_ABORT


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="training.trainer")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--local_rank", type=int, default=None)  # passed by some launchers
    args = ap.parse_args(argv)
    from training.launcher import load_rank_env

    load_rank_env(Path(args.run_dir))  # multi-node: S3 settings and secrets, never on a command line
    try:
        return Trainer(Path(args.run_dir)).run()
    except LmpipeError as exc:
        log(f"rank {settings.get('RANK') or '?'}: {exc}", level="error")
        return ExitCode.ERROR
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Tear the process group down before the interpreter exits.

    Left to interpreter shutdown, gloo's worker threads can be destroyed while still
    joinable, and the rank then dies in ``std::terminate`` after a finished run.
    """
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


class Trainer:
    def __init__(self, run: Path):
        from training.config import CONFIG_FILE, RESOLVED_FILE, TrainConfig

        self.run_dir, self.root = run, run / "checkpoints"
        self.cfg = cfglib.build(TrainConfig, json.loads((run / CONFIG_FILE).read_text()))
        self.resolved = json.loads((run / RESOLVED_FILE).read_text())
        self.step = self.position = self.nan_streak = 0

    def say(self, msg: str) -> None:
        if self.rank == 0:
            log(msg)

    # ------------------------------------------------------------------ setup and resume

    def setup(self) -> None:
        import deepspeed
        import torch
        from deepspeed import comm as dist

        from training import data as datalib
        from training import ds_config
        from training.config import DS_FILE

        self.cpu = not torch.cuda.is_available()
        if not self.cpu:  # before the process group: NCCL binds each rank to its current device
            torch.cuda.set_device(int(settings.get("LOCAL_RANK") or 0))
        deepspeed.init_distributed(dist_backend="gloo" if self.cpu else "nccl")
        self.dist, self.rank, self.world = dist, dist.get_rank(), dist.get_world_size()
        if self.world != self.resolved["world_size"]:
            raise LmpipeError(f"{self.world} ranks started but the run was resolved for {self.resolved['world_size']}")
        b = self.resolved["batch"]
        self.batch, self.prec = ds_config.Batch(b["micro"], b["accum"], b["world"]), self.resolved["precision"]
        self.data = datalib.ShardSet(self.cfg.shards, self.run_dir / "cache" / "shards", self.cfg.storage)
        self.order = datalib.Order(len(self.data), self.batch.micro, self.world, self.cfg.seed)
        model = self._model()
        ds = json.loads((self.run_dir / DS_FILE).read_text())
        self.engine, _, _, self.sched = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
        self.device = self.engine.device
        self.n_params = sum(p.numel() for p in model.parameters())
        self.tokens_per_step = self.batch.global_size * self.data.seq_len
        self.say(f"{self.world} ranks ({'CPU/gloo' if self.cpu else 'GPU/nccl'}), ZeRO-{self.cfg.deepspeed.zero_stage}, "
                 f"{self.prec}; {self.n_params:,} params; batch {self.batch.micro} x {self.batch.accum} accum x "
                 f"{self.world} ranks = {self.batch.global_size} sequences = {self.tokens_per_step:,} tokens per step")
        self.say(ds_config.memory_table(self.n_params, self.world, self.prec))
        self.say(datalib.describe(self.data, self.order))

    def _model(self):
        """The model, with identical initial weights on every rank (or the warm-start weights)."""
        import torch

        from training import checkpoint as ckpt
        from training import recipes

        man = self.data.manifest
        self.mcfg = cfglib.build(recipes.ModelConfig, self.resolved["model"])
        torch.manual_seed(self.cfg.seed)
        model = recipes.build_model(self.mcfg, man["tokenizer"]["vocab_size"], man["tokenizer"]["eos_id"])
        init = self.resolved.get("init_weights")
        if init and not ckpt.committed(self.root):
            from safetensors.torch import load_file

            missing, unexpected = model.load_state_dict(load_file(init["path"]), strict=False)
            tied = {"lm_head.weight"} if self.mcfg.tie_embeddings else set()
            if unexpected or set(missing) - tied:
                raise LmpipeError(f"init_from: weights do not fit the model (missing {missing}, unexpected {unexpected})")
            self.say(f"warm start: weights from {init['ref']}")
        if self.cfg.deepspeed.activation_checkpointing:
            model.gradient_checkpointing_enable()
        return model

    def resume(self) -> None:
        """Load the newest committed checkpoint, verified against its marker; never start over silently."""
        import torch

        from training import checkpoint as ckpt

        tags = ckpt.committed(self.root)
        if not tags:
            return
        marker = ckpt.verify(self.root, tags[-1])
        try:
            path, _client = self.engine.load_checkpoint(str(self.root), tag=tags[-1], load_optimizer_states=True,
                                                        load_lr_scheduler_states=True)
        except Exception as exc:
            raise LmpipeError(f"checkpoint {self.root / tags[-1]} cannot be loaded: {type(exc).__name__}: {exc}") from None
        if path is None:  # DeepSpeed only warns: never silently start from step 0
            raise LmpipeError(f"DeepSpeed found no checkpoint in {self.root / tags[-1]}: refusing to restart from step 0")
        self.step, self.position = marker["step"], marker["position"]
        rng = self.root / tags[-1] / f"rng-rank{self.rank}.pt"
        if rng.is_file():  # verified with the tag; tensors only (weights_only)
            state = torch.load(rng, weights_only=True)
            state = state if isinstance(state, dict) else {"cpu": state}
            torch.set_rng_state(state["cpu"])
            if "cuda" in state and not self.cpu:
                torch.cuda.set_rng_state(state["cuda"])
        self.say(f"resumed from {self.root / tags[-1]} at step {self.step} (data position {self.position})")

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        from training import data as datalib

        self.setup()
        self.resume()
        loader = datalib.Loader(self.data, self.order, self.rank, self.position, self.cfg.prefetch, pin=not self.cpu)
        self.metrics = open(self.run_dir / "metrics.jsonl", "a", buffering=1) if self.rank == 0 else None
        log_batches = self.rank == 0 and self.cfg.debug.log_batches
        self.batches = open(self.run_dir / "batches.jsonl", "a", buffering=1) if log_batches else None
        self.losses, self.launched, self.t_start = [], 0, time.perf_counter()
        self.start_step, self.t_log, self.waited0 = self.step, self.t_start, 0.0
        try:
            while self.step < self.cfg.max_steps:
                outcome = self.train_step(*loader.next())
                if outcome == "abort":
                    return EXIT_NAN
                if outcome == "stepped" and self.after_step(loader):
                    return ExitCode.OK
        finally:
            loader.close()
            for f in (self.metrics, self.batches):
                if f:
                    f.close()
        self.finish()
        return ExitCode.OK

    def train_step(self, pos: int, batch) -> str:
        """One micro-batch: "skipped" (non-finite loss), "abort", "accumulated" or "stepped"."""
        import torch.nn.functional as F

        batch = batch.to(self.device, non_blocking=True)  # pinned by the loader on GPUs
        logits = self.engine(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        dbg = self.cfg.debug
        if pos in dbg.inject_nan_steps and (not dbg.inject_nan_ranks or self.rank in dbg.inject_nan_ranks):
            loss = loss * float("nan")
        self.position = pos + 1
        if not self._all_finite(loss.detach()):
            # Drop this micro-batch: no backward, no step, so DeepSpeed's state is untouched.
            self.nan_streak += 1
            self.say(f"non-finite loss at step {self.step} (data position {pos}): micro-batch skipped "
                     f"({self.nan_streak} in a row)")
            if self.nan_streak >= self.cfg.nan_abort_after:
                self.say(f"aborting: {self.nan_streak} consecutive non-finite losses (nan_abort_after)")
                return "abort"
            return "skipped"
        self.nan_streak = 0
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.backward(loss)
        self.engine.step()
        self.losses.append(loss.detach())
        if self.batches is not None:
            self.batches.write(json.dumps({"position": pos, "ids": self.order.global_ids(pos).tolist()}) + "\n")
        if not boundary:
            return "accumulated"
        self.step += 1
        self.launched += 1
        return "stepped"

    def after_step(self, loader) -> bool:
        """Log, checkpoint; True when this launch should stop early (debug.exit_after_steps)."""
        cfg = self.cfg
        if cfg.debug.step_delay_s:
            time.sleep(cfg.debug.step_delay_s)
        if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
            self.log(loader)
        if self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
            self.save()
        return bool(cfg.debug.exit_after_steps and self.launched >= cfg.debug.exit_after_steps)

    def _all_finite(self, t) -> bool:
        """Whether ``t`` is finite on every rank. The flag lives on the engine's device: NCCL
        reduces only accelerator tensors."""
        import torch

        flag = torch.tensor([1.0 if bool(torch.isfinite(t).all()) else 0.0], device=self.device)
        self.dist.all_reduce(flag, op=self.dist.ReduceOp.MIN)
        return flag.item() == 1.0

    # ------------------------------------------------------------------ log, save, finish

    def log(self, loader) -> None:
        import torch

        from training import ds_config, lineage

        mean = torch.stack(self.losses).mean()
        self.dist.all_reduce(mean)
        mean = mean.item() / self.world
        now = time.perf_counter()
        dt_ = now - self.t_log
        tps = self.cfg.log_every * self.tokens_per_step / dt_ if dt_ else 0.0
        eta = (now - self.t_start) / max(self.step - self.start_step, 1) * (self.cfg.max_steps - self.step)
        line = {"step": self.step, "loss": round(mean, 5), "lr": self.sched.get_last_lr()[0], "tokens_per_s": round(tps),
                "data_wait_frac": round((loader.waited - self.waited0) / dt_, 4) if dt_ else 0.0, "time": time.time()}
        extra = ""
        if self.cpu:
            import resource

            line["max_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
        else:
            flops = ds_config.flops_per_token(self.n_params, self.mcfg.num_layers, self.mcfg.hidden_size, self.data.seq_len)
            mfu = tps * flops / (self.cfg.launch.peak_tflops * 1e12 * self.world)
            mem = torch.cuda.max_memory_allocated() / 2**30
            line.update(mfu=round(mfu, 4), max_mem_gib=round(mem, 2))
            extra = f" | MFU {mfu:.1%} | mem {mem:.1f} GiB"
        self.say(f"step {self.step}/{self.cfg.max_steps} | loss {mean:.4f} | lr {line['lr']:.2e} | {tps:,.0f} tok/s | "
                 f"ETA {eta:.0f}s | data wait {line['data_wait_frac']:.1%}{extra}")
        if self.metrics:
            self.metrics.write(json.dumps(line) + "\n")
            try:
                lineage.log_metrics(self.resolved.get("mlflow_run_id"), line, self.step)
            except Exception as exc:  # tracking trouble must not kill a training run
                self.say(f"warning: could not log metrics to MLflow: {exc}")
        self.t_log, self.losses, self.waited0 = now, [], loader.waited

    def save(self) -> None:
        """A checkpoint tag, committed by rank 0 once every rank has written its part."""
        import torch

        from training import checkpoint as ckpt
        from training import sync

        if not self._params_finite():
            raise LmpipeError(f"the model has non-finite weights at step {self.step}: not checkpointing it")
        t = ckpt.tag(self.step)
        self.engine.save_checkpoint(str(self.root), tag=t, client_state={"step": self.step, "position": self.position},
                                    save_latest=False)
        (self.root / t).mkdir(parents=True, exist_ok=True)
        rng = {"cpu": torch.get_rng_state(), **({} if self.cpu else {"cuda": torch.cuda.get_rng_state()})}
        torch.save(rng, self.root / t / f"rng-rank{self.rank}.pt")
        self.dist.barrier()  # every rank has written its part
        if self.rank == 0:
            from lmpipe.storage import sha256_file
            from training.config import CONFIG_FILE

            config = self.run_dir / CONFIG_FILE  # the marker points at the resolved config it trained with
            ckpt.commit(self.root, t, {"step": self.step, "position": self.position, "world_size": self.world,
                                       "config": f"../../{CONFIG_FILE}", "config_sha256": sha256_file(config)})
            ckpt.prune(self.root, self.cfg.keep_checkpoints)
            where = sync.upload_checkpoint(self.run_dir, self.cfg, t)
            self.say(f"checkpoint {t} committed{f' and uploaded to {where}' if where else ''}")
        self.dist.barrier()

    def _params_finite(self) -> bool:
        import torch

        ok = all(bool(torch.isfinite(getattr(p, "ds_tensor", p).data).all()) for p in self.engine.module.parameters())
        return self._all_finite(torch.tensor(0.0 if ok else float("nan")))

    def finish(self) -> None:
        from training import checkpoint as ckpt
        from training import export

        latest = ckpt.committed(self.root)
        if not latest or latest[-1] != ckpt.tag(self.step):
            self.save()
        export.export(self.engine, self.run_dir, self.data, self.resolved, self.rank, self.dist, self.step)
        self.say(f"done: {self.step} steps; model exported to {self.run_dir / 'export'}")


if __name__ == "__main__":
    sys.exit(main())
