"""Typed training config; the DeepSpeed JSON is generated from it (``training.ds_config``)."""

from __future__ import annotations

from dataclasses import field
from typing import Any, Literal

from lmpipe.config import stage_config
from lmpipe.storage import StorageConfig
from lmpipe.tracking import TrackingConfig


@stage_config
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0


@stage_config
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False  # optimizer states (and step) on CPU
    offload_params: bool = False  # parameters on CPU (ZeRO-3 only)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPUs that have it, else fp32
    activation_checkpointing: bool = False


@stage_config
class LaunchConfig:
    nproc: int = 1  # ranks per node (GPUs per node, or CPU ranks)
    hostfile: str | None = None  # DeepSpeed hostfile for multi-node ("host slots=N" lines)
    num_nodes: int = 1
    master_port: int = 0  # 0: a free port on this machine (single node); set one for multi-node
    peak_tflops: float = 989.0  # per GPU, for MFU: H100 SXM dense bf16


@stage_config
class DebugConfig:
    inject_nan_steps: list[int] = field(default_factory=list)  # make the loss NaN at these micro-batches
    log_batches: bool = False  # write every global batch's sample ids to batches.jsonl
    exit_after_steps: int | None = None  # stop (exit 0) after this many steps in this launch
    step_delay_s: float = 0.0  # sleep after each step (tests use it to kill a run mid-way)


@stage_config
class TrainConfig:
    shards: str = ""  # shard set from `lmpipe tokenize` (local, file://, s3://)
    out: str = ""  # the run folder (local, file://, s3://)
    recipe: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # overrides of the recipe's ModelConfig
    micro_batch_size: int = 8
    grad_accum: int = 1
    global_batch_size: int | None = None  # if set, grad_accum is derived from it
    max_steps: int = 200
    seed: int = 1234
    save_every: int = 50
    keep_checkpoints: int = 3
    log_every: int = 10
    nan_abort_after: int = 5  # abort after this many consecutive non-finite losses
    prefetch: int = 4  # micro-batches prepared ahead by the loader thread
    fresh: bool = False  # start over in a folder that already holds a run
    # Warm start: initial weights from a model folder, s3:// prefix or models:/NAME@ALIAS (e.g. the
    # champion). Same recipe/model shape and tokenizer required. Ignored when resuming a checkpoint.
    init_from: str | None = None
    work_dir: str | None = None  # local staging when ``out`` is on S3 (default: $LMPIPE_HOME/runs/...)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# Keys that may change when a run resumes; everything else must match the run's config.
RESUMABLE_CHANGES = ("max_steps", "save_every", "keep_checkpoints", "log_every", "prefetch", "fresh", "work_dir",
                     "launch", "debug", "nan_abort_after", "tracking")
