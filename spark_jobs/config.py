"""The tokenize stage's typed config (the ``tokenize`` section of a run config)."""

from __future__ import annotations

from dataclasses import field
from typing import Literal

from lmpipe.config import stage_config
from lmpipe.errors import ConfigError
from lmpipe.storage import StorageConfig
from spark_jobs.corpus import CorpusConfig
from spark_jobs.curate.config import CurateConfig
from spark_jobs.tokenizer import TokenizerConfig


@stage_config
class TokenizeConfig:
    corpus: str = ""  # file, folder or prefix (local, file:// or s3://)
    out: str = ""  # shard set prefix (local, file:// or s3://)
    seq_len: int = 256  # tokens per training sequence; at most the recipe's max_position_embeddings
    validation_fraction: float = 0.02  # share of documents (by a hash of their id) in the validation split
    spark_master: str = "local[*]"  # Spark master when run by `lmpipe tokenize`; spark-submit's --master wins
    spark_conf: dict[str, str] = field(default_factory=dict)  # extra Spark settings, e.g. spark_conf.spark.executor.memory=8g
    # Input MB per read task. Tasks follow from the data, never from the cluster size,
    # so shard names and contents are the same on any cluster.
    partition_mb: int = 8
    shard_sequences: int = 8192  # sequences per shard file
    compression: Literal["zstd", "snappy", "none"] = "zstd"  # shard Parquet compression
    dedup: bool = True  # remove exact duplicates (by content hash; the first by position is kept)
    curate: CurateConfig = field(default_factory=CurateConfig)  # filters, near-dup, decontamination
    overwrite: bool = False  # replace a published shard set under ``out``
    # A previous shard set of the same corpus: tokenize only the corpus files it has not seen
    # (e.g. new date partitions), with its tokenizer; ``out``'s manifest references its shards.
    base: str | None = None
    run_id: str | None = None  # names the Spark app and the manifest's run; default: random
    reader: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


def check(cfg: TokenizeConfig) -> list[str]:
    """Refuse a config that cannot work, before any file is read; return the names of the
    configured curation filters, in order."""
    if not cfg.corpus:
        raise ConfigError("config key 'corpus' is required (--corpus URI)")
    if not cfg.out:
        raise ConfigError("config key 'out' is required (--out URI)")
    if cfg.seq_len < 1:
        raise ConfigError(f"config key 'seq_len' must be >= 1 (got {cfg.seq_len})")
    if not 0 <= cfg.validation_fraction < 1:
        raise ConfigError(f"config key 'validation_fraction' must be in [0, 1) (got {cfg.validation_fraction})")
    if cfg.shard_sequences < 1 or cfg.partition_mb < 1:
        raise ConfigError("config keys 'shard_sequences' and 'partition_mb' must be >= 1")
    names = _check_curate(cfg.curate)
    if cfg.tokenizer.vocab_size < 260 and not cfg.tokenizer.path:
        raise ConfigError(f"config key 'tokenizer.vocab_size' must be >= 260 for byte-level BPE (got {cfg.tokenizer.vocab_size})")
    return names


def _check_curate(cur: CurateConfig) -> list[str]:
    from spark_jobs.curate import filters, neardup

    chain = filters.build(cur.filters, cur.languages)  # an unknown filter or key is named here
    neardup.check(cur.near_dedup)
    if cur.decontaminate_ngram < 1 or cur.removed_sample < 0:
        raise ConfigError("config key 'curate.decontaminate_ngram' must be >= 1 and 'curate.removed_sample' >= 0")
    return [f.name for f in chain]
