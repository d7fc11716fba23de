"""Training recipes: named functions returning a whole :class:`Recipe` (model shape, learning
rate, warmup, batch and steps). Vocab size and EOS always come from the shard manifest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmpipe.config import stage_config
from lmpipe.errors import ConfigError


@stage_config
class ModelConfig:
    arch: Literal["llama", "gpt2"] = "llama"
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # llama: grouped-query attention; None = num_heads
    intermediate_size: int | None = None  # llama MLP width; None = 8/3 * hidden, rounded
    max_position_embeddings: int = 2048
    dropout: float = 0.0
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    init_std: float = 0.02


@dataclass(frozen=True)
class Recipe:
    """A whole training recipe: the model's shape and how to train it. Every value is a default
    that ``train`` keys override (``optim.lr=...``, ``model.num_layers=...``, ``max_steps=...``)."""

    model: ModelConfig
    lr: float
    warmup_steps: int
    micro_batch_size: int
    max_steps: int
    grad_accum: int = 1
    global_batch_size: int | None = None  # when set, grad_accum follows from it and the world size
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1


def tiny() -> Recipe:
    """~1-5 M params (with a 4-8k vocab): trains on CPU in minutes; the demo and CI recipe."""
    return Recipe(ModelConfig(arch="llama", hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384,
                              max_position_embeddings=1024),
                  lr=3e-3, warmup_steps=20, micro_batch_size=8, max_steps=150)


def gpt2_124m() -> Recipe:
    """GPT-2 small (124 M params with the 50k vocab), trained as llm.c trains it on 10B tokens:
    lr 6e-4, 700 warmup steps, 512 sequences of 1024 tokens (0.5 M tokens) per step."""
    return Recipe(ModelConfig(arch="gpt2", hidden_size=768, num_layers=12, num_heads=12, max_position_embeddings=1024,
                              dropout=0.0),
                  lr=6e-4, warmup_steps=700, micro_batch_size=16, global_batch_size=512, max_steps=19_073,
                  min_lr_ratio=0.0)


def llama_1b() -> Recipe:
    """A Llama-3.2-1B-shaped model for GPUs (16 layers, 2048 wide, GQA 32/8 heads): lr 3e-4,
    2000 warmup steps, 512 sequences per step (1 M tokens at seq_len 2048)."""
    return Recipe(ModelConfig(arch="llama", hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                              intermediate_size=8192, max_position_embeddings=4096, rope_theta=500000.0),
                  lr=3e-4, warmup_steps=2000, micro_batch_size=8, global_batch_size=512, max_steps=20_000)


RECIPES = {"tiny": tiny, "gpt2-124m": gpt2_124m, "llama-1b": llama_1b}


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"config key 'recipe': unknown recipe {name!r} (known: {', '.join(RECIPES)})")
    return RECIPES[name]()


def hf_config(m: ModelConfig, vocab_size: int, eos_id: int):
    """The transformers config for ``m`` (SDPA attention, no weights download)."""
    import transformers

    common = dict(vocab_size=vocab_size, eos_token_id=eos_id, bos_token_id=eos_id, pad_token_id=eos_id,
                  tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std, use_cache=False)
    if m.arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=m.hidden_size, n_layer=m.num_layers, n_head=m.num_heads,
                                      n_positions=m.max_position_embeddings, resid_pdrop=m.dropout,
                                      embd_pdrop=m.dropout, attn_pdrop=m.dropout, **common)
    else:
        inter = m.intermediate_size or 256 * ((int(8 * m.hidden_size / 3) + 255) // 256)
        cfg = transformers.LlamaConfig(hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                                       num_attention_heads=m.num_heads,
                                       num_key_value_heads=m.num_kv_heads or m.num_heads, intermediate_size=inter,
                                       max_position_embeddings=m.max_position_embeddings, rope_theta=m.rope_theta,
                                       attention_dropout=m.dropout, **common)
    cfg._attn_implementation = "sdpa"
    return cfg


def build_model(m: ModelConfig, vocab_size: int, eos_id: int):
    import transformers

    return transformers.AutoModelForCausalLM.from_config(hf_config(m, vocab_size, eos_id), attn_implementation="sdpa")


def param_count(m: ModelConfig, vocab_size: int) -> int:
    """Exact parameter count, without building the model (meta device)."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(m, vocab_size, 0))
    return sum(p.numel() for p in model.parameters())
