"""Committed checkpoints: DeepSpeed writes a tag folder, lmpipe commits it with a marker.

After every rank has written its part (a barrier), rank 0 writes ``COMMITTED.json`` into
the tag folder with the sha256 of every file. Only tags with a marker count, and a tag is
verified against its marker before it is loaded: a corrupt or tampered file is a clear
error, never a silent restart. (DeepSpeed's loader unpickles its own files, so verifying
them against our marker is what makes loading them safe.) DeepSpeed's ``latest`` file is
never used: lmpipe always names the tag it loads.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from lmpipe.errors import LmpipeError
from lmpipe.log import log
from lmpipe.storage import sha256_file

MARKER = "COMMITTED.json"
PREFIX = "step-"


def tag(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def commit(root: Path, tag_: str, info: dict) -> Path:
    folder = root / tag_
    files = {p.relative_to(folder).as_posix(): sha256_file(p)
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}
    marker = {**info, "tag": tag_, "files": files, "committed_at": time.time()}
    tmp = folder / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=1, sort_keys=True))
    os.replace(tmp, folder / MARKER)
    return folder / MARKER


def committed(root: Path) -> list[str]:
    """Committed tags, oldest first; uncommitted ones are reported and ignored."""
    if not root.is_dir():
        return []
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))
    good = [t for t in tags if (root / t / MARKER).is_file()]
    for t in tags:
        if t not in good:
            log(f"checkpoint {root / t} has no {MARKER} (its save did not finish): ignoring it", level="warning")
    return good


def verify(root: Path, tag_: str) -> dict:
    folder = root / tag_
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LmpipeError(f"checkpoint {folder} has an unreadable {MARKER}: {exc}") from None
    for rel, sha in marker["files"].items():
        p = folder / rel
        if not p.is_file():
            raise LmpipeError(f"checkpoint {folder} is corrupt: {rel} is missing")
        if sha256_file(p) != sha:
            raise LmpipeError(f"checkpoint {folder} is corrupt: {rel} does not match its sha256 in {MARKER}")
    return marker


def prune(root: Path, keep: int) -> None:
    tags = committed(root)
    for t in tags[: max(0, len(tags) - keep)]:
        shutil.rmtree(root / t, ignore_errors=True)
