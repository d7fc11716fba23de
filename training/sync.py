"""Mirror a local run folder to the run's object-storage prefix (when ``out`` is on S3)."""

from __future__ import annotations

from pathlib import Path

from lmpipe.log import log
from lmpipe.storage import is_s3, open_store
from training import checkpoint as ckpt
from training.config import CONFIG_FILE, DS_FILE, RESOLVED_FILE

RUN_FILES = (CONFIG_FILE, RESOLVED_FILE, DS_FILE, "metrics.jsonl", "batches.jsonl")


def upload_checkpoint(run: Path, cfg, tag: str) -> str | None:
    """Upload one committed tag; its marker goes last, so a partial upload never counts."""
    if not is_s3(cfg.out):
        return None
    store = open_store(cfg.out, cfg.storage)
    folder = run / "checkpoints" / tag
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != ckpt.MARKER)
    for p in [*files, folder / ckpt.MARKER]:
        store.put_file(f"checkpoints/{tag}/{p.relative_to(folder).as_posix()}", p)
    return store.url(f"checkpoints/{tag}")


def upload_run(run: Path, cfg) -> str | None:
    if not is_s3(cfg.out):
        return None
    store = open_store(cfg.out, cfg.storage)
    for name in RUN_FILES:
        if (run / name).is_file():
            store.put_file(name, run / name)
    export = run / "export"
    if export.is_dir():
        for p in sorted(export.rglob("*")):
            if p.is_file():
                store.put_file(f"export/{p.relative_to(export).as_posix()}", p)
    return store.uri


def download_latest(run: Path, cfg) -> str | None:
    """Fetch the newest committed checkpoint from S3 when the local staging folder lacks it."""
    if not is_s3(cfg.out):
        return None
    store = open_store(cfg.out, cfg.storage)
    remote = sorted({o.key.split("/")[1] for o in store.list("checkpoints") if o.key.endswith("/" + ckpt.MARKER)})
    if not remote or remote[-1] in ckpt.committed(run / "checkpoints"):
        return None
    tag = remote[-1]
    store.download_prefix(f"checkpoints/{tag}", run / "checkpoints" / tag)
    log(f"downloaded checkpoint {store.url('checkpoints/' + tag)}")
    return tag
