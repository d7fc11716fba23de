"""What the tokenize benchmarks share: the corpus's texts, one tokenizer for every run, and
raw ``tokenizers`` ``encode_batch`` as the baseline."""

from __future__ import annotations

import json
import time
from pathlib import Path

from lmpipe import config as cfglib
from spark_jobs import tokenizer as toklib
from spark_jobs import worker


def texts_of(corpus: Path) -> list[str]:
    """Every document's text, from the corpus's JSONL files in name order."""
    texts = []
    for f in sorted(corpus.glob("*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            texts.extend(json.loads(line)["text"] for line in fh)
    return texts


def tokenizer(work: Path, texts: list[str], vocab_size: int):
    """(path, tokenizer): a byte-level BPE trained once on the first quarter of ``texts`` and
    kept in ``work``, so every run of a benchmark uses the same one."""
    path = work / "tokenizer.json"
    if not path.exists():
        tok = toklib.train(iter(texts[: len(texts) // 4]), cfglib.build(toklib.TokenizerConfig, {"vocab_size": vocab_size}))
        path.write_text(tok.to_str())
    return path, toklib.from_json(path.read_text())


def raw_encode(tok, texts: list[str]) -> tuple[float, int]:
    """(seconds, tokens with one EOS per document) of ``encode_batch`` over ``texts`` on all
    cores (rayon), in the batches the tokenize job uses."""
    t0, tokens = time.perf_counter(), 0
    for i in range(0, len(texts), worker.DOC_BATCH):
        tokens += sum(len(e.ids) + 1 for e in tok.encode_batch_fast(texts[i : i + worker.DOC_BATCH], add_special_tokens=False))
    return time.perf_counter() - t0, tokens
