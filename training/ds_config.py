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


def batch(micro: int, accum: int | None, world: int, global_size: int | None = None) -> Batch:
    """The one place for micro batch x accumulation x world size = global batch."""
    accum = 1 if accum is None else accum
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


# DeepSpeed keys that typed config sets: deepspeed.extra may not set them (the error names the key to use).
OWNED = {
    "train_batch_size": "global_batch_size", "train_micro_batch_size_per_gpu": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum", "gradient_clipping": "optim.grad_clip",
    "zero_optimization.stage": "deepspeed.zero_stage", "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param": "deepspeed.offload_params", "bf16.enabled": "deepspeed.precision",
    "fp16.enabled": "deepspeed.precision", "optimizer.params.lr": "optim.lr",
    "scheduler.params.total_num_steps": "max_steps", "scheduler.params.warmup_num_steps": "optim.warmup_steps",
}


def build(cfg, b: Batch, prec: str) -> dict:
    """The DeepSpeed JSON, generated from typed config (never hand-written), with
    ``deepspeed.extra`` merged over it."""
    return merge_extra(_generated(cfg, b, prec), cfg.deepspeed.extra)


def merge_extra(generated: dict, extra: dict, path: str = "") -> dict:
    """``generated`` with ``extra`` merged in, key by key; a key that typed config owns is refused."""
    out = dict(generated)
    for key, value in extra.items():
        dotted = f"{path}{key}"
        if dotted in OWNED:
            raise ConfigError(f"config key 'deepspeed.extra.{dotted}' is set by '{OWNED[dotted]}': use that instead")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_extra(out[key], value, dotted + ".")
        else:
            if isinstance(value, dict) and any(f"{dotted}.{k}" in OWNED for k in _leaves(value)):
                raise ConfigError(f"config key 'deepspeed.extra.{dotted}' would replace keys that typed config sets")
            out[key] = value
    return out


def _leaves(d: dict, prefix: str = "") -> list[str]:
    return [x for k, v in d.items() for x in (_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"])]


def _generated(cfg, b: Batch, prec: str) -> dict:
    import torch

    ds, opt = cfg.deepspeed, cfg.optim
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


# ---------------------------------------------------------------- sizing (docs/deploy/zero-sizing.md)

# ZeRO choices in the order to try them: each step trades more communication (or PCIe traffic
# to CPU memory) for less GPU memory, so the first one that fits is the one to use.
ZERO_OPTIONS = [  # (label, stage, offload_optimizer, offload_params)
    ("ZeRO-0", 0, False, False),
    ("ZeRO-1", 1, False, False),
    ("ZeRO-2", 2, False, False),
    ("ZeRO-2 + offload opt", 2, True, False),
    ("ZeRO-3", 3, False, False),
    ("ZeRO-3 + offload opt", 3, True, False),
    ("ZeRO-3 + offload opt+params", 3, True, True),
]
# The formula counts model states only; activations, NCCL buffers and allocator fragmentation
# need the rest, so a choice "fits" when its states take at most this share of the GPU.
STATE_SHARE = 0.5
# Vocab sizes the runbook assumes per recipe (the real one comes from the shard manifest).
SIZING_VOCAB = {"tiny": 4096, "gpt2-124m": 50304, "llama-1b": 128256}
# Bigger models than the recipes, by parameter count alone (the formula needs nothing else).
SIZING_EXAMPLES = {"8 B model": 8_000_000_000, "70 B model": 70_000_000_000}


def pick_zero(params: int, world: int, gpu_gib: float, prec: str = "bf16", share: float = STATE_SHARE) -> str | None:
    """The first ZERO_OPTIONS label whose model states fit in ``share`` of a ``gpu_gib`` GPU."""
    for label, stage, off_opt, off_par in ZERO_OPTIONS:
        if memory_per_rank(params, world, stage, prec, off_opt, off_par) <= share * gpu_gib * 1024**3:
            return label
    return None


def sizing_markdown(models: dict[str, int], worlds=(1, 8, 64), gpus_gib=(16, 24, 40, 80), prec: str = "bf16") -> str:
    """Two markdown tables: model-state GiB per GPU for every ZeRO option, and the option to pick."""
    gib = 1024**3
    head = ["model", "params", "GPUs", *(label for label, *_ in ZERO_OPTIONS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, n in models.items():
        for w in worlds:
            cells = [f"{memory_per_rank(n, w, s, prec, oo, op) / gib:.2f}" for _, s, oo, op in ZERO_OPTIONS]
            lines.append(f"| {name} | {n / 1e6:,.1f} M | {w} | " + " | ".join(cells) + " |")
    head = ["model", "GPUs", *(f"{g} GiB GPU" for g in gpus_gib)]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, n in models.items():
        for w in worlds:
            picks = [pick_zero(n, w, g, prec) or "does not fit" for g in gpus_gib]
            lines.append(f"| {name} | {w} | " + " | ".join(picks) + " |")
    return "\n".join(lines)


def runbook_sizing(prec: str = "bf16") -> str:
    """The runbook's tables, for the recipes' exact parameter counts."""
    from training import recipes

    models = {f"{name} (vocab {vocab:,})": recipes.param_count(recipes.recipe(name).model, vocab)
              for name, vocab in SIZING_VOCAB.items()}
    return sizing_markdown({**models, **SIZING_EXAMPLES}, prec=prec)


if __name__ == "__main__":  # python -m training.ds_config [PARAMS]: the runbook tables, or one model's
    import sys

    print(sizing_markdown({f"{int(sys.argv[1]):,} params": int(sys.argv[1])}) if len(sys.argv) > 1 else runbook_sizing())
