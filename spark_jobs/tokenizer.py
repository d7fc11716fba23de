"""Byte-level BPE tokenizers: train one with HF ``tokenizers``, or load an existing ``tokenizer.json``."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from lmpipe.config import stage_config
from lmpipe.errors import LmpipeError

EOS = "<|endoftext|>"
PAD = "<|pad|>"


@stage_config
class TokenizerConfig:
    # Train a byte-level BPE unless ``path`` names an existing tokenizer.json (local or s3://).
    path: str | None = None
    vocab_size: int = 4096  # fits the tiny recipe; real models want 32k-128k
    eos_token: str = EOS  # appended to every document; the packer is the only source of it
    special_tokens: list[str] | None = None  # default: [eos_token, "<|pad|>"]
    min_frequency: int = 2  # BPE merge threshold
    # Training reads a deterministic sample of the corpus: whole files, in an order fixed by
    # a hash of their names, until this many MB of text.
    train_sample_mb: int = 64


def train(texts: Iterable[str], cfg: TokenizerConfig):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = cfg.special_tokens or [cfg.eos_token, PAD]
    if cfg.eos_token not in specials:
        specials = [cfg.eos_token, *specials]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.encode_special_tokens = True
    return tok


def from_json(text: str, eos_token: str = EOS, where: str = "tokenizer"):
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise LmpipeError(f"{where} is not a valid tokenizer.json: {exc}") from exc
    if tok.token_to_id(eos_token) is None:
        raise LmpipeError(f"{where} has no EOS token {eos_token!r}; set tokenizer.eos_token")
    # A document that contains the text "<|endoftext|>" must not get a document boundary:
    # special tokens in the input are encoded as plain text. Only the packer adds EOS.
    tok.encode_special_tokens = True
    return tok


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
