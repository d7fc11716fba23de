"""Pack token streams into fixed-length sequences and write them as shards.

Each document arrives already ending in EOS; the packer concatenates them and cuts rows of
``seq_len + 1`` tokens (the shard format is in :mod:`lmpipe.manifest`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lmpipe.manifest import write_shard
from lmpipe.storage import sha256_file


@dataclass
class ShardInfo:
    split: str
    path: str
    sequences: int
    tokens: int
    bytes: int
    sha256: str


class Packer:
    """Concatenates documents (each already ending in EOS) and cuts them into
    sequences of ``seq_len + 1`` tokens. Every ``shard_sequences`` sequences it
    writes a shard through ``publish(local_file, relative_path)``. The tail that
    does not fill a whole sequence is dropped and counted, as in nanoGPT-style packing.
    """

    def __init__(
        self,
        split: str,
        part: int,
        seq_len: int,
        dtype: np.dtype,
        shard_sequences: int,
        publish: Callable[[str, str], None],
        compression: str = "zstd",
        eos_id: int | None = None,
    ):
        self.split, self.part, self.width = split, part, seq_len + 1
        self.dtype, self.shard_sequences = dtype, shard_sequences
        self.publish, self.compression = publish, compression
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[ShardInfo] = []
        self.documents = 0
        self.document_tokens = 0
        self.dropped_tokens = 0
        self.dropped_documents = 0  # documents whose EOS fell in the dropped tail
        self.eos_id = eos_id

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids.astype(self.dtype, copy=False))
        self.pending_tokens += len(ids)
        self.documents += 1
        self.document_tokens += len(ids)
        while self.pending_tokens >= self.width * self.shard_sequences:
            self._emit(self.shard_sequences)

    def _emit(self, n_seq: int) -> None:
        flat = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        take = n_seq * self.width
        self._write(flat[:take].reshape(n_seq, self.width))
        rest = flat[take:]
        self.pending = [rest] if len(rest) else []
        self.pending_tokens = len(rest)

    def close(self) -> list[ShardInfo]:
        """Write the last, shorter shard; drop the tail that does not fill a sequence."""
        if n := self.pending_tokens // self.width:
            self._emit(n)
        self.dropped_tokens = self.pending_tokens
        if self.pending and self.eos_id is not None:
            self.dropped_documents = int(sum(np.count_nonzero(p == self.eos_id) for p in self.pending))
        self.pending, self.pending_tokens = [], 0
        return self.shards

    def _write(self, seqs: np.ndarray) -> None:
        rel = f"{self.split}/part-{self.part:05d}-{len(self.shards):05d}.parquet"
        fd, tmp = tempfile.mkstemp(suffix=".parquet", prefix="lmpipe-shard-")
        os.close(fd)
        try:
            write_shard(seqs, tmp, self.compression)
            info = ShardInfo(self.split, rel, len(seqs), int(seqs.size), os.path.getsize(tmp), sha256_file(tmp))
            self.publish(tmp, rel)
        finally:
            os.unlink(tmp)
        self.shards.append(info)
