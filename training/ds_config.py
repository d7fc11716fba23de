"""Batch arithmetic, the generated DeepSpeed config, and the ZeRO memory formula."""

from __future__ import annotations

from dataclasses import dataclass

from lmpipe.errors import ConfigError


@dataclass(frozen=True)
class Batch:
    micro: int
    accum: int
    world: int

    @property
    def global_size(self) -> int:
        return self.micro * self.accum * self.world


def batch(micro: int, accum: int, world: int, global_size: int | None = None) -> Batch:
    """The one place for micro batch x accumulation x world size = global batch."""
    if micro < 1 or accum < 1 or world < 1:
        raise ConfigError(f"micro_batch_size ({micro}), grad_accum ({accum}) and world size ({world}) must be >= 1")
    if global_size is not None:
        if global_size % (micro * world):
            raise ConfigError(f"global_batch_size {global_size} is not a multiple of micro_batch_size {micro} "
                              f"x world size {world}")
        accum = global_size // (micro * world)
    return Batch(micro, accum, world)


def precision(requested: str) -> str:
    import torch

    if requested != "auto":
        if requested in ("bf16", "fp16") and not torch.cuda.is_available():
            raise ConfigError(f"deepspeed.precision={requested} needs a GPU; use fp32 (or auto) on CPU")
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def build(cfg, b: Batch, prec: str) -> dict:
    """The DeepSpeed JSON, generated from typed config (never hand-written)."""
    import torch

    ds, opt = cfg.deepspeed, cfg.optim
    if ds.offload_params and ds.zero_stage != 3:
        raise ConfigError("deepspeed.offload_params needs deepspeed.zero_stage=3")
    gpu = torch.cuda.is_available()
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage:
        zero.update(contiguous_gradients=True, overlap_comm=gpu, reduce_bucket_size=5e7)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}
    if ds.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_batch_size": b.global_size,
        "train_micro_batch_size_per_gpu": b.micro,
        "gradient_accumulation_steps": b.accum,
        "gradient_clipping": opt.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay,
                       # torch's AdamW unless offloaded (DeepSpeedCPUAdam): no JIT-built fused kernels needed
                       **({} if ds.offload_optimizer else {"torch_adam": True, "adam_w_mode": True})},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": max(cfg.max_steps, 1), "warmup_num_steps": max(opt.warmup_steps, 1),
                       "warmup_min_ratio": 0.0, "cos_min_ratio": opt.min_lr_ratio, "warmup_type": "linear"},
        },
        "steps_per_print": 10**9,  # lmpipe prints its own progress lines
        "wall_clock_breakdown": False,
    }


# Bytes per parameter (params, grads, optimizer states): the ZeRO paper's mixed-precision Adam
# (2 + 2 + 12: fp32 master copy, momentum, variance) and plain fp32 Adam (4 + 4 + 8).
BYTES = {"bf16": (2, 2, 12), "fp16": (2, 2, 12), "fp32": (4, 4, 8)}


def memory_per_rank(params: int, world: int, stage: int, prec: str, offload_optimizer=False,
                    offload_params=False) -> float:
    """Model-state bytes per rank (no activations), after the ZeRO paper's formula."""
    p, g, o = (x * params for x in BYTES[prec])
    if offload_optimizer:
        o = 0
    if offload_params:
        p = 0
    if stage >= 1:
        o /= world
    if stage >= 2:
        g /= world
    if stage >= 3:
        p /= world
    return p + g + o


def memory_table(params: int, world: int, prec: str) -> str:
    gib = 1024**3
    cells = [f"ZeRO-{s} {memory_per_rank(params, world, s, prec) / gib:.2f} GiB" for s in range(4)]
    return f"model states per rank ({prec}, {world} ranks): " + ", ".join(cells)


def flops_per_token(params: int, layers: int, hidden: int, seq_len: int) -> float:
    """nanoGPT's estimate (PaLM appendix B): 6N + 12 L H T per token, forward and backward."""
    return 6 * params + 12 * layers * hidden * seq_len
