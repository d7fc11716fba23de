"""``lmpipe train``: resolve the config, prepare the run folder, start the ranks with DeepSpeed.

    lmpipe train --shards URI --out URI [--recipe tiny] [--zero-stage N] [--nproc N]
                 [--hostfile F] [--config F] [key=value ...]

This process trains nothing itself: it resolves the recipe, the batch and the precision once,
writes them into the run folder, and starts DeepSpeed's launcher (``python -m
deepspeed.launcher.runner``, the ``deepspeed`` command), which runs ``training.trainer`` on
every rank: ``nproc`` per node, multi-node through a hostfile, NCCL on GPUs, DeepSpeed's CPU
accelerator over gloo where there is no GPU. Running it again on the same ``--out`` resumes
from the newest committed checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from lmpipe import config as cfglib
from lmpipe import manifest, settings
from lmpipe.errors import ConfigError, LmpipeError
from lmpipe.log import log
from lmpipe.storage import is_s3, open_store
from training import checkpoint as ckpt
from training import ds_config, recipes, sync
from training.config import CONFIG_FILE, DS_FILE, RESOLVED_FILE, RESUMABLE_CHANGES, TrainConfig, resolve
RUN_OUTPUTS = ("checkpoints", "export", "export.tmp", "metrics.jsonl", "batches.jsonl", "mlflow_run.json",
               "model_version.json", "data", "eval", "report")
CPU_RANKS = 2  # ranks per node when there is no GPU and launch.nproc is not set


def run_dir(cfg: TrainConfig) -> Path:
    """The local run folder: ``out`` itself, or a staging folder when ``out`` is on S3."""
    if not is_s3(cfg.out):
        return Path(open_store(cfg.out).root)
    if cfg.work_dir:
        return Path(cfg.work_dir)
    return settings.home() / "runs" / hashlib.sha256(cfg.out.encode()).hexdigest()[:16]


def nproc(cfg: TrainConfig) -> int:
    """Ranks per node: ``launch.nproc``, else every GPU of this node, else CPU_RANKS."""
    import torch

    if cfg.launch.nproc:
        return cfg.launch.nproc
    return torch.cuda.device_count() if torch.cuda.is_available() else CPU_RANKS


def prepare(cfg: TrainConfig) -> tuple[TrainConfig, Path, dict, dict]:
    """Resolve and check everything, decide fresh or resume, and write the run folder's
    ``train_config.json``, ``resolved.json`` and ``ds_config.json``. Returns (the resolved
    config, run folder, shard manifest, resolved)."""
    if not cfg.shards or not cfg.out:
        raise ConfigError("config keys 'shards' and 'out' are required (--shards URI --out URI)")
    cfg = resolve(cfg)
    cfg = replace(cfg, launch=replace(cfg.launch, nproc=nproc(cfg)))
    man = manifest.read(open_store(cfg.shards, cfg.storage))  # refuses a prefix without a manifest
    if man["seq_len"] > cfg.model["max_position_embeddings"]:
        raise ConfigError(f"the shards' seq_len is {man['seq_len']} (tokenize.seq_len) but config key "
                          f"'model.max_position_embeddings' is {cfg.model['max_position_embeddings']} "
                          f"(recipe {cfg.recipe!r}): tokenize with a shorter seq_len or raise the model's")
    world = cfg.launch.nproc * cfg.launch.num_nodes
    b = ds_config.batch(cfg.micro_batch_size, cfg.grad_accum, world, cfg.global_batch_size)
    prec = ds_config.precision(cfg.deepspeed.precision)
    ds = ds_config.build(cfg, b, prec)  # before anything is written: a bad deepspeed.extra key stops here
    run = _open_run(cfg)
    _check_world(run, cfg, world)
    init = _init_weights(cfg, man) if not ckpt.committed(run / "checkpoints") else None
    resolved = {"recipe": cfg.recipe, "model": cfg.model, "world_size": world, "precision": prec,
                "batch": {"micro": b.micro, "accum": b.accum, "world": b.world, "global": b.global_size},
                "shards_manifest": man["run_id"], "init_weights": init}
    (run / CONFIG_FILE).write_text(cfglib.dump(cfg))
    (run / RESOLVED_FILE).write_text(json.dumps(resolved, indent=2))
    (run / DS_FILE).write_text(json.dumps(ds, indent=2))
    n = recipes.param_count(cfglib.build(recipes.ModelConfig, cfg.model), man["tokenizer"]["vocab_size"])
    log(f"{cfg.recipe}: {n:,} parameters; {b.micro} x {b.accum} accum x {world} ranks = {b.global_size} sequences "
        f"x {man['seq_len']} = {b.global_size * man['seq_len']:,} tokens per step; {cfg.max_steps} steps, "
        f"lr {cfg.optim.lr:g}, warmup {cfg.optim.warmup_steps}")
    log(ds_config.memory_table(n, world, prec))
    return cfg, run, man, resolved


def _open_run(cfg: TrainConfig) -> Path:
    """The run folder, emptied for ``fresh``, or checked for a resume with the same config."""
    run = run_dir(cfg)
    run.mkdir(parents=True, exist_ok=True)
    if cfg.fresh:
        for name in RUN_OUTPUTS:
            target = run / name
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        if is_s3(cfg.out):
            open_store(cfg.out, cfg.storage).delete_prefix("checkpoints")
        return run
    sync.restore(run, cfg)
    if any(run.iterdir()):
        if not (run / CONFIG_FILE).is_file():
            raise LmpipeError(f"{cfg.out} is not empty and holds no lmpipe run: pass --fresh to train there")
        _check_resume(run, cfg)
        tags = ckpt.committed(run / "checkpoints")
        if tags:
            # Refused here, before any rank starts, as each rank refuses it again as it loads.
            ckpt.verify(run / "checkpoints", tags[-1])
            log(f"resuming {cfg.out} from checkpoint {tags[-1]} (signature and sha256 verified)")
        elif (run / "checkpoints").exists() or (run / "metrics.jsonl").exists():
            log(f"{cfg.out} has no committed checkpoint: starting from step 0", level="warning")
    return run


def _check_resume(run: Path, cfg: TrainConfig) -> None:
    """A run folder may only be continued with the same config (bar RESUMABLE_CHANGES)."""
    old, new = _flat(json.loads((run / CONFIG_FILE).read_text())), _flat(cfglib.to_dict(cfg))
    diff = sorted(k for k in set(old) | set(new) if k.split(".")[0] not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
    if diff:
        named = ", ".join(f"{k}: {old.get(k)!r} in the run, {new.get(k)!r} now" for k in diff)
        raise LmpipeError(f"{run} holds a run with a different config ({named}): "
                          "resume with the same settings, or pass --fresh to start over")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_world(run: Path, cfg: TrainConfig, world: int) -> None:
    """A resume keeps the rank count of its newest checkpoint: the data order and the global batch
    depend on it, so another count would silently train on a different stream."""
    tags = ckpt.committed(run / "checkpoints")
    if not tags:
        return
    was = json.loads((run / "checkpoints" / tags[-1] / ckpt.MARKER).read_text()).get("world_size")
    if was is not None and was != world:
        raise ConfigError(f"checkpoint {tags[-1]} of {cfg.out} was written by {was} ranks, but this resume would "
                          f"start {world} (launch.nproc={cfg.launch.nproc} x launch.num_nodes="
                          f"{cfg.launch.num_nodes}): resume with {was} ranks, or pass --fresh to start over")


def _init_weights(cfg: TrainConfig, man: dict) -> dict | None:
    """Resolve ``init_from`` to a local safetensors file, refusing a model of another shape or tokenizer."""
    from registry import resolve as resolver

    if not cfg.init_from:
        return None
    try:
        ref = resolver.lookup(cfg.init_from, cfg.tracking, cfg.storage)
    except resolver.NoSuchVersion as exc:
        if cfg.init_missing != "scratch":
            raise
        log(f"nothing to warm-start from ({exc}): training from scratch")
        return None
    path = resolver.fetch(ref, cfg.storage)
    meta_file = path / "lmpipe.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("tokenizer_sha256") != man["tokenizer"]["sha256"]:
        raise ConfigError(f"init_from {cfg.init_from}: its tokenizer differs from the shards' tokenizer "
                          f"(sha256 {str(meta.get('tokenizer_sha256'))[:12]} vs {man['tokenizer']['sha256'][:12]}): "
                          "warm start needs shards made with the same tokenizer (tokenize with base=)")
    theirs = meta.get("model") or {}
    if theirs != cfg.model:
        diff = sorted(k for k in set(cfg.model) | set(theirs) if cfg.model.get(k) != theirs.get(k))
        raise ConfigError(f"init_from {cfg.init_from}: model shape differs from recipe {cfg.recipe!r} at {', '.join(diff)}")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise LmpipeError(f"init_from {cfg.init_from}: no model.safetensors in {path}")
    log(f"warm start from {cfg.init_from}" + (f" (version {ref.version})" if ref.version else ""))
    return {"ref": cfg.init_from, "path": str(weights), "version": ref.version or ""}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(cfg: TrainConfig, run: Path, port: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc(cfg)),
           "--master_port", str(port or cfg.launch.master_port or _free_port())]
    if cfg.launch.hostfile:
        cmd += ["--hostfile", cfg.launch.hostfile, "--num_nodes", str(cfg.launch.num_nodes)]
    return [*cmd, "--module", "training.trainer", "--run-dir", str(run)]


def _shm_buffers(addr: str, port: int) -> list[Path]:
    """DeepSpeed's CPU allreduce buffers in /dev/shm for one master address and port. DeepSpeed
    never removes them: each run would leak ~70 MB of RAM per rank, and a later run on the same
    port would map a stale buffer and hang."""
    return list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_*"))


def _remove(paths: list[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def _launch_env(cfg: TrainConfig, mlflow_run: str | None) -> dict[str, str]:
    import torch

    from training import checkpoint as ckpt

    # The ranks get the checkpoint key in their environment (never on a command line).
    env = dict(os.environ, PYTHONUNBUFFERED="1", LMPIPE_CHECKPOINT_KEY=ckpt.signing_key().decode())
    if mlflow_run:
        from registry import tracking

        env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri(cfg.tracking)
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator, ranks over gloo
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc(cfg))))
        if not cfg.launch.hostfile:
            env.setdefault("MASTER_ADDR", "127.0.0.1")
        env["PATH"] = build_path()
        clear_stale_build_locks()
    return env


def build_path() -> str:
    """``PATH`` with this interpreter's folder first. torch JIT-builds DeepSpeed's CPU ops with
    the first ``ninja`` on ``PATH``, and ninja 1.11 and 1.12+ hash build commands differently:
    ranks started from a shell, a test or an Airflow worker, each with another ``PATH``, would
    each rebuild what the other ninja built (half a minute or more per launch). The
    environment's own ninja (a DeepSpeed dependency) always builds them. Calling it again adds
    nothing, and an unset ``PATH`` never becomes an empty entry (the working directory)."""
    own = str(Path(sys.executable).parent)
    rest = [p for p in (settings.get("PATH") or "").split(os.pathsep) if p and p != own]
    return os.pathsep.join([own, *rest])


RANK_ENV = "rank-env.json"  # multi-node: what every rank loads at start (mode 600), removed after the run
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "LMPIPE_CHECKPOINT_KEY",
           "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD")


def rank_env(cfg: TrainConfig, env: dict[str, str], run: Path) -> dict[str, str]:
    """The launcher's environment. Multi-node, DeepSpeed's runner writes every variable it
    forwards (``MLFLOW_*``, ``PYTHON*``, ``NCCL_*``, ``.deepspeed_env``) into the pdsh command
    line, where any user of either machine can read it, and forwards no ``AWS_*`` at all. So the
    S3 settings, the checkpoint key and MLflow's secrets go into ``<run>/rank-env.json`` (mode
    600, in the run folder every node shares), which each rank loads (:func:`load_rank_env`),
    and the secrets leave the runner's environment."""
    if not cfg.launch.hostfile:
        return env  # local ranks inherit the environment, which no other user can read
    ranks = {k: v for k, v in env.items() if k.startswith(("AWS_", "LMPIPE_")) or k in SECRETS}
    path = run / RANK_ENV
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(ranks, f)
    return {k: v for k, v in env.items() if k not in SECRETS}


def load_rank_env(run: Path) -> None:
    """In a rank: the settings :func:`rank_env` left for it, before anything reads them."""
    path = run / RANK_ENV
    if path.is_file():
        os.environ.update(json.loads(path.read_text()))


BUILD_LOCK_STALE_S = 600  # a JIT build of DeepSpeed's CPU ops takes about 2 minutes on 2 cores


def clear_stale_build_locks(max_age_s: float = BUILD_LOCK_STALE_S) -> list[Path]:
    """Remove torch extension build locks older than ``max_age_s``. A rank killed while DeepSpeed
    builds or loads its CPU ops leaves ``<torch_extensions>/<python>/<op>/lock`` behind, and every
    later rank on the machine then waits for it to go, forever (torch polls for the file)."""
    import time

    from torch.utils.cpp_extension import get_default_build_root

    root = Path(settings.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    removed = []
    for lock in sorted({*root.glob("*/lock"), *root.glob("*/*/lock")}):
        with contextlib.suppress(FileNotFoundError):
            age = time.time() - lock.stat().st_mtime
            if age > max_age_s:
                lock.unlink()
                removed.append(lock)
                log(f"removed a stale build lock {lock} ({age / 60:.0f} min old), left by a rank killed "
                    "mid-build: the ranks would have waited on it forever", level="warning")
    return removed


def run(cfg: TrainConfig) -> int:
    from training import lineage

    cfg, run_path, man, resolved = prepare(cfg)
    mlflow_run = lineage.start(cfg, run_path, man, resolved["model"])
    resolved["mlflow_run_id"] = mlflow_run
    (run_path / RESOLVED_FILE).write_text(json.dumps(resolved, indent=2))
    sync.upload_run(run_path, cfg)  # the run's config on S3 from the start: a retry elsewhere resumes with it
    env = rank_env(cfg, _launch_env(cfg, mlflow_run), run_path)
    port = cfg.launch.master_port or _free_port()
    cmd = launch_command(cfg, run_path, port)
    shm = env.get("MASTER_ADDR") if env.get("DS_ACCELERATOR") == "cpu" and not cfg.launch.hostfile else None
    if shm:
        _remove(_shm_buffers(shm, port))
    log("launching: " + " ".join(cmd))
    # Same process group as us: a kill of the job (Airflow's timeout, a SIGKILL to the group)
    # reaches the launcher and its ranks too, so no orphaned ranks keep training.
    proc = subprocess.Popen(cmd, env=env)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise
    finally:
        if shm:
            _remove(_shm_buffers(shm, port))
        (run_path / RANK_ENV).unlink(missing_ok=True)
    lineage.finish(cfg, run_path, man, mlflow_run, rc)
    where = sync.upload_run(run_path, cfg)  # after finish: later stages read model_version.json
    if rc == 0:
        log(f"training finished; run folder {where or run_path}, model in {(where or str(run_path)) + '/export'}")
    else:
        log(f"training exited with code {rc}; run `lmpipe train` again with the same --out to resume", level="warning")
    return rc


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", help="shard set from `lmpipe tokenize` (shards)")
    p.add_argument("--out", help="run folder, local or s3://; an existing run resumes (out)")
    p.add_argument("--recipe", help=f"training recipe: {', '.join(recipes.RECIPES)} (recipe)")
    p.add_argument("--zero-stage", type=int, help="DeepSpeed ZeRO stage 0-3 (deepspeed.zero_stage)")
    p.add_argument("--nproc", type=int, help="ranks per node (launch.nproc)")
    p.add_argument("--hostfile", help="DeepSpeed hostfile for multi-node (launch.hostfile)")
    p.add_argument("--fresh", action="store_true", default=None, help="start over in a folder that holds a run (fresh)")
    p.add_argument("--config", help="YAML or JSON config: train keys, or a run config whose 'train' section is used")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. max_steps=500 model.hidden_size=256")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = {"shards": args.shards, "out": args.out, "recipe": args.recipe, "deepspeed.zero_stage": args.zero_stage,
             "launch.nproc": args.nproc, "launch.hostfile": args.hostfile, "fresh": args.fresh}
    return cfglib.from_cli(TrainConfig, args.config, args.overrides, flags, "train")
