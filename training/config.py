"""The train stage's typed config (the ``train`` section of a run config), and its resolution.

Keys left empty (``None``) take the recipe's value: learning rate, warmup, batch and steps,
and the model's shape (``model`` holds overrides of the recipe's). :func:`resolve` fills them
in, so the resolved config that ``lmpipe config show train`` prints, that the run folder
keeps and that MLflow records says exactly what trained. The DeepSpeed JSON is generated
from it (``training.ds_config``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import field, replace
from pathlib import Path
from typing import Any, Literal

from lmpipe import config as cfglib
from lmpipe.config import stage_config
from lmpipe.errors import ConfigError
from lmpipe.storage import StorageConfig
from registry.tracking import TrackingConfig
from training import recipes


@stage_config
class OptimConfig:
    lr: float | None = None  # default: the recipe's
    min_lr_ratio: float | None = None  # cosine decays to lr * min_lr_ratio; default: the recipe's
    warmup_steps: int | None = None  # default: the recipe's
    weight_decay: float | None = None  # default: the recipe's
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # gradient norm clipping


@stage_config
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2  # DeepSpeed ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters
    offload_optimizer: bool = False  # optimizer states (and step) on CPU; ZeRO stage 1-3
    offload_params: bool = False  # parameters on CPU; ZeRO stage 3 only
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPUs that have it, else fp32
    activation_checkpointing: bool = False  # recompute activations in backward (the HF model's gradient checkpointing)
    # Any other DeepSpeed config key, merged into the generated JSON, e.g.
    # deepspeed.extra.zero_optimization.reduce_bucket_size=2e8. Keys that typed config sets are refused.
    extra: dict[str, Any] = field(default_factory=dict)


@stage_config
class LaunchConfig:
    nproc: int | None = None  # ranks per node; default: every GPU of the launching node, or 2 CPU ranks
    hostfile: str | None = None  # DeepSpeed hostfile for multi-node ("host slots=N" lines)
    num_nodes: int = 1  # nodes; more than 1 needs launch.hostfile
    master_port: int = 0  # 0: a free port on this machine (single node); set one for multi-node
    peak_tflops: float = 989.0  # per GPU, for MFU: H100 SXM dense bf16


@stage_config
class DebugConfig:
    inject_nan_steps: list[int] = field(default_factory=list)  # make the loss NaN at these micro-batches
    inject_nan_ranks: list[int] = field(default_factory=list)  # ... on these ranks only (empty: every rank)
    log_batches: bool = False  # write every global batch's sample ids to batches.jsonl
    exit_after_steps: int | None = None  # stop (exit 0) after this many steps in this launch
    step_delay_s: float = 0.0  # sleep after each step (tests use it to kill a run mid-way)


@stage_config
class TrainConfig:
    shards: str = ""  # shard set from `lmpipe tokenize` (local, file://, s3://)
    out: str = ""  # the run folder (local, file://, s3://)
    recipe: str = "tiny"  # training/recipes.py: tiny, gpt2-124m, llama-1b
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the recipe's model shape
    micro_batch_size: int | None = None  # sequences per rank per micro-batch; default: the recipe's
    grad_accum: int | None = None  # default: the recipe's (or derived from global_batch_size)
    global_batch_size: int | None = None  # if set, grad_accum is derived from it; default: the recipe's
    max_steps: int | None = None  # optimizer steps; default: the recipe's
    seed: int = 1234  # initial weights and data order
    save_every: int = 50  # steps between committed checkpoints
    keep_checkpoints: int = 3  # committed checkpoints kept locally
    log_every: int = 10  # steps between progress lines and metrics
    nan_abort_after: int = 5  # abort after this many consecutive non-finite losses
    prefetch: int = 4  # micro-batches prepared ahead by the loader thread
    fresh: bool = False  # start over in a folder that already holds a run
    # Warm start: initial weights from a model folder, s3:// prefix or models:/NAME@ALIAS (e.g. the
    # champion). Same recipe/model shape and tokenizer required. Ignored when resuming a checkpoint.
    init_from: str | None = None
    init_missing: Literal["error", "scratch"] = "error"  # when init_from names an alias that has no version yet
    # The shard-check result.json recorded as the version's lineage; default: the newest under <shards>/_checks/
    data_checks: str | None = None
    work_dir: str | None = None  # local staging when ``out`` is on S3 (default: $LMPIPE_HOME/runs/...)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# The run folder's resolved config (what trained), and what the launcher resolved for the ranks.
CONFIG_FILE, RESOLVED_FILE, DS_FILE = "train_config.json", "resolved.json", "ds_config.json"

# Keys that may change when a run resumes; everything else must match the run's config.
RESUMABLE_CHANGES = ("max_steps", "save_every", "keep_checkpoints", "log_every", "prefetch", "fresh", "work_dir",
                     "launch", "debug", "nan_abort_after", "tracking", "init_missing", "data_checks")


def resolve(cfg: TrainConfig, prefix: str = "") -> TrainConfig:
    """``cfg`` with every recipe default filled in and the model shape complete; checked.
    Errors name keys after ``prefix`` (``train.`` in a run config)."""
    try:
        r = recipes.recipe(cfg.recipe)
        model = cfglib.build(recipes.ModelConfig, {**dataclasses.asdict(r.model), **cfg.model}, prefix="model.")
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("config key '", f"config key '{prefix}")) from None
    model = dataclasses.asdict(model)
    accum, global_size = cfg.grad_accum, cfg.global_batch_size
    if accum is None and global_size is None:  # the recipe's batch, unless the user set one
        accum, global_size = (None, r.global_batch_size) if r.global_batch_size else (r.grad_accum, None)
    o = cfg.optim
    optim = replace(o, lr=_pick(o.lr, r.lr), warmup_steps=_pick(o.warmup_steps, r.warmup_steps),
                    min_lr_ratio=_pick(o.min_lr_ratio, r.min_lr_ratio),
                    weight_decay=_pick(o.weight_decay, r.weight_decay))
    out = replace(cfg, model=model, micro_batch_size=_pick(cfg.micro_batch_size, r.micro_batch_size),
                  grad_accum=accum, global_batch_size=global_size, max_steps=_pick(cfg.max_steps, r.max_steps),
                  optim=optim)
    check(out, prefix)
    return out


def _pick(value, default):
    return default if value is None else value


def check(cfg: TrainConfig, prefix: str = "") -> None:
    """Refuse settings that contradict each other, naming both keys (after ``prefix``, e.g. ``train.``)."""
    def k(name: str) -> str:
        return f"'{prefix}{name}'"

    ds, launch = cfg.deepspeed, cfg.launch
    if ds.offload_params and ds.zero_stage != 3:
        raise ConfigError(f"config key {k('deepspeed.offload_params')} needs {k('deepspeed.zero_stage')} 3 "
                          f"(got {ds.zero_stage})")
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise ConfigError(f"config key {k('deepspeed.offload_optimizer')} needs {k('deepspeed.zero_stage')} "
                          "1, 2 or 3 (got 0)")
    if launch.num_nodes < 1 or (launch.nproc is not None and launch.nproc < 1):
        raise ConfigError(f"config keys {k('launch.num_nodes')} and {k('launch.nproc')} must be >= 1")
    if launch.num_nodes > 1 and not launch.hostfile:
        raise ConfigError(f"config key {k('launch.num_nodes')} is {launch.num_nodes}: more than one node needs "
                          f"{k('launch.hostfile')} (a DeepSpeed hostfile)")
    if launch.hostfile:
        hosts = hostfile_hosts(launch.hostfile, k("launch.hostfile"))
        if launch.num_nodes > len(hosts):
            raise ConfigError(f"config key {k('launch.num_nodes')} is {launch.num_nodes} but {k('launch.hostfile')} "
                              f"{launch.hostfile} lists {len(hosts)} host(s)")
        short = [h for h, slots in hosts[: launch.num_nodes] if launch.nproc and slots < launch.nproc]
        if short:
            raise ConfigError(f"config key {k('launch.nproc')} is {launch.nproc} but {k('launch.hostfile')} gives "
                              f"{', '.join(short)} fewer slots")


def hostfile_hosts(path: str, key: str = "'launch.hostfile'") -> list[tuple[str, int]]:
    """(host, slots) of a DeepSpeed hostfile (``host slots=N`` lines; comments and blanks skipped)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"config key {key}: cannot read {path}: {exc}") from None
    hosts = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        slots = next((w.split("=", 1)[1] for w in words[1:] if w.startswith("slots=")), "1")
        if not slots.isdigit():
            raise ConfigError(f"config key {key}: {path} has a bad line {line.strip()!r}")
        hosts.append((words[0], int(slots)))
    if not hosts:
        raise ConfigError(f"config key {key}: {path} lists no host")
    return hosts
