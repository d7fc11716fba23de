"""Mirror a local run folder to the run's object-storage prefix (when ``out`` is on S3), and back.

A run on S3 trains in a local staging folder. Checkpoints go up as they are committed (the
marker last), and the run's files when it ends; a task retried on another machine, or on an
empty staging folder, gets the run's files and its newest committed checkpoint back first,
so it resumes where the run stopped.
"""

from __future__ import annotations

from pathlib import Path

from lmpipe.log import log
from lmpipe.storage import is_s3, open_store
from training import checkpoint as ckpt
from training.config import CONFIG_FILE, DS_FILE, RESOLVED_FILE

# What later stages and a resumed run read from the run folder: its configs, progress, the
# MLflow run and registered version, and the folders of the export and the data lineage.
RUN_FILES = (CONFIG_FILE, RESOLVED_FILE, DS_FILE, "metrics.jsonl", "batches.jsonl", "mlflow_run.json",
             "model_version.json")
RUN_FOLDERS = ("export", "data")


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
    for name in RUN_FOLDERS:
        for p in sorted((run / name).rglob("*")) if (run / name).is_dir() else []:
            if p.is_file():
                store.put_file(f"{name}/{p.relative_to(run / name).as_posix()}", p)
    return store.uri


def restore(run: Path, cfg) -> str | None:
    """Bring back what the staging folder lacks: the run's files, and its newest committed
    checkpoint on S3. Returns the checkpoint tag downloaded, if any."""
    if not is_s3(cfg.out):
        return None
    store = open_store(cfg.out, cfg.storage)
    if not (run / CONFIG_FILE).is_file():
        got = [name for name in RUN_FILES if store.exists(name) and store.get_file(name, run / name)]
        if got:
            log(f"restored {', '.join(got)} from {store.uri}")
    remote = sorted({o.key.split("/")[1] for o in store.list("checkpoints") if o.key.endswith("/" + ckpt.MARKER)})
    if not remote or remote[-1] in ckpt.committed(run / "checkpoints"):
        return None
    tag = remote[-1]
    store.download_prefix(f"checkpoints/{tag}", run / "checkpoints" / tag)
    log(f"downloaded checkpoint {store.url('checkpoints/' + tag)}")
    return tag
