"""Pack token streams into fixed-length sequences and write them as Parquet shards.

Shard format (the contract later stages rely on): a Parquet file with one column
``input_ids``, a fixed-size list of ``seq_len + 1`` unsigned ints (uint16 when the
vocab fits, else uint32). Each sequence holds seq_len inputs plus the shifted target.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmpipe.storage import sha256_file


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def shard_table(seqs: np.ndarray) -> pa.Table:
    """A (n, seq_len + 1) array as a table with one fixed-size-list column ``input_ids``."""
    n, width = seqs.shape
    flat = pa.array(np.ascontiguousarray(seqs).reshape(-1))
    return pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(flat, width)})


def write_shard(seqs: np.ndarray, path: str, compression: str = "zstd") -> None:
    pq.write_table(
        shard_table(seqs),
        path,
        compression=None if compression == "none" else compression,
        row_group_size=1024,
        write_statistics=False,  # per-row min/max of list columns is noise
        store_schema=True,
    )


def read_shard(path) -> np.ndarray:
    """The ``input_ids`` of one shard as an (n, seq_len + 1) array."""
    table = pq.read_table(path, columns=["input_ids"])
    col = table.column("input_ids").combine_chunks()
    width = col.type.list_size
    return col.values.to_numpy(zero_copy_only=False).reshape(-1, width)


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
