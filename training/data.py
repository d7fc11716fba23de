"""Training data: shards from a manifest, deterministic order, rank partitioning, prefetch.

Order is a pure function of (seed, position): the position is the number of global
micro-batches consumed. Global micro-batch ``m`` lies in epoch ``m // per_epoch``, whose
order is a permutation seeded by (seed, epoch); rank ``r`` takes its slice of it. Saving
the position in a checkpoint and restoring it gives exactly the batches an uninterrupted
run would have seen.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path

import numpy as np

from lmpipe import manifest as manifestlib
from lmpipe.errors import LmpipeError, StorageError
from lmpipe.storage import open_store, sha256_file


class ShardSet:
    """The sequences of one split as memory-mapped arrays (one per shard), verified by sha256."""

    def __init__(self, uri: str, cache_dir: Path, storage=None, split: str = "train"):
        self.store, self.storage = open_store(uri, storage), storage
        self.manifest = manifestlib.read(self.store)  # refuses a prefix without a manifest
        self.seq_len = self.manifest["seq_len"]
        entries = self.manifest["splits"][split]["shards"]
        if not entries:
            raise LmpipeError(f"{uri} has no {split} shards")
        self.arrays = [self._load(e, Path(cache_dir)) for e in entries]
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def _load(self, entry: dict, cache: Path) -> np.ndarray:
        """Shard -> cached .npy (uint16/32 rows), memory-mapped. Downloads are sha256-verified.
        A shard the manifest references in another shard set (its ``root``) is read there.

        Several ranks on a node may fill the same cache at once: each works on files of its own
        (pid-suffixed) and publishes the .npy with an atomic rename, so none sees a half file.
        """
        npy = cache / f"{entry['sha256']}.npy"
        if not npy.exists():
            cache.mkdir(parents=True, exist_ok=True)
            own = f"{os.getpid()}-{threading.get_ident()}"
            store, key = manifestlib.shard_location(self.store, entry, self.storage)
            local = getattr(store, "root", None)
            src = store.path(key) if local is not None else cache / f"{entry['sha256']}.{own}.parquet"
            listed = f"shard {store.url(key)}, listed in {self.store.url(manifestlib.MANIFEST)},"
            if local is None:
                try:
                    store.get_file(key, src)
                except StorageError as exc:
                    raise StorageError(f"{listed} cannot be read: {exc}") from None
            elif not src.is_file():
                raise StorageError(f"{listed} does not exist")
            try:
                actual = sha256_file(src)
                if actual != entry["sha256"]:
                    raise LmpipeError(f"shard {store.url(key)} has sha256 {actual}, "
                                      f"the manifest says {entry['sha256']}: refusing to train on it")
                from lmpipe.manifest import read_shard

                tmp = cache / f"{entry['sha256']}.{own}.tmp.npy"
                np.save(tmp, read_shard(src))
                tmp.replace(npy)
            finally:
                if local is None:
                    src.unlink(missing_ok=True)
        return np.load(npy, mmap_mode="r")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def rows(self, idx: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self.offsets, idx, side="right") - 1
        return np.stack([self.arrays[s][i - self.offsets[s]] for s, i in zip(shard, idx)]).astype(np.int64)


class Order:
    """Which samples each rank reads at each global micro-batch position."""

    def __init__(self, n: int, micro: int, world: int, seed: int):
        self.n, self.micro, self.world, self.seed = n, micro, world, seed
        self.per_epoch = n // (micro * world)
        if self.per_epoch == 0:
            raise LmpipeError(f"only {n} training sequences: fewer than one global micro-batch "
                              f"({micro} x {world} ranks)")
        self._cache: tuple[int, np.ndarray] | None = None

    def global_ids(self, position: int) -> np.ndarray:
        epoch, k = divmod(position, self.per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        width = self.micro * self.world
        return self._cache[1][k * width : (k + 1) * width]

    def rank_ids(self, position: int, rank: int) -> np.ndarray:
        return self.global_ids(position)[rank * self.micro : (rank + 1) * self.micro]


class Loader:
    """Background prefetch of this rank's micro-batches from a position onward."""

    def __init__(self, data: ShardSet, order: Order, rank: int, start: int, prefetch: int = 4, pin: bool = False):
        self.data, self.order, self.rank, self.pin = data, order, rank, pin
        self.position = start
        self.waited = 0.0
        self._q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(start,), daemon=True, name="prefetch")
        self._thread.start()

    def _fill(self, pos: int) -> None:
        import torch

        try:
            while not self._stop.is_set():
                batch = torch.from_numpy(self.data.rows(self.order.rank_ids(pos, self.rank)))
                if self.pin:  # page-locked: the copy to the GPU can overlap compute
                    batch = batch.pin_memory()
                while not self._stop.is_set():
                    try:
                        self._q.put((pos, batch), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                pos += 1
        except Exception as exc:  # surface loader errors in the training loop
            self._q.put((None, exc))

    def next(self):
        """(position, tensor of shape (micro, seq_len + 1))."""
        t = time.perf_counter()
        pos, batch = self._q.get()
        self.waited += time.perf_counter() - t
        if pos is None:
            raise batch
        assert pos == self.position, (pos, self.position)
        self.position += 1
        return pos, batch

    def close(self) -> None:
        """Stop and join the prefetch thread, so no thread is inside torch when the process exits."""
        self._stop.set()
        self._thread.join(timeout=10)


def describe(data: ShardSet, order: Order) -> str:
    return (f"{len(data):,} training sequences of {data.seq_len} tokens in {len(data.arrays)} shards; "
            f"{order.per_epoch:,} global micro-batches per epoch")


__all__ = ["ShardSet", "Order", "Loader", "describe"]
