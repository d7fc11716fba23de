"""Committed checkpoints: DeepSpeed writes a tag folder, lmpipe commits it with a marker.

After every rank has written its part (a barrier), rank 0 writes ``COMMITTED.json`` into
the tag folder with the sha256 of every file. Only tags with a marker count, and a tag is
verified against its marker before it is loaded: a corrupt or tampered file is a clear
error, never a silent restart. (DeepSpeed's loader unpickles its own files, so verifying
them against our marker is what makes loading them safe.) DeepSpeed's ``latest`` file is
never used: lmpipe always names the tag it loads.

The marker is signed (HMAC-SHA256) with a key only the trainers hold: ``LMPIPE_CHECKPOINT_KEY``,
else a key generated once into ``$LMPIPE_HOME/checkpoint.key`` (mode 600). Whoever can write to
the bucket can change files and the marker's digests, but not sign them: a tag whose marker is
unsigned or wrongly signed is refused before DeepSpeed reads any of its files.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
import time
from pathlib import Path

from lmpipe import settings
from lmpipe.errors import LmpipeError
from lmpipe.log import log
from lmpipe.storage import sha256_file

MARKER = "COMMITTED.json"
PREFIX = "step-"


def tag(step: int) -> str:
    return f"{PREFIX}{step:08d}"


KEY_FILE = "checkpoint.key"


def signing_key() -> bytes:
    """``LMPIPE_CHECKPOINT_KEY``, else this machine's key under ``$LMPIPE_HOME`` (made once, mode 600).
    ``lmpipe train`` resolves it before the ranks start and hands it to them in their environment."""
    if key := settings.get("LMPIPE_CHECKPOINT_KEY"):
        return key.encode()
    path = settings.home() / KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        except FileExistsError:
            pass
    return path.read_text().strip().encode()


def key_id(key: bytes) -> str:
    """A short public name of a key, so a marker can say which key signed it."""
    return hashlib.sha256(b"lmpipe-checkpoint-key:" + key).hexdigest()[:12]


def _signature(marker: dict, key: bytes) -> str:
    body = json.dumps({k: v for k, v in marker.items() if k != "signature"}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def commit(root: Path, tag_: str, info: dict, key: bytes | None = None) -> Path:
    folder = root / tag_
    files = {p.relative_to(folder).as_posix(): sha256_file(p)
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MARKER}
    marker = {**info, "tag": tag_, "files": files, "committed_at": time.time()}
    key = key or signing_key()
    marker["signature"] = {"alg": "hmac-sha256", "key_id": key_id(key), "value": _signature(marker, key)}
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


def verify(root: Path, tag_: str, key: bytes | None = None) -> dict:
    """The tag's marker, once its signature and every file's sha256 check out; else a clear error."""
    folder = root / tag_
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LmpipeError(f"checkpoint {folder} has an unreadable {MARKER}: {exc}") from None
    check_signature(folder, marker, key or signing_key())
    for rel, sha in marker["files"].items():
        p = folder / rel
        if not p.is_file():
            raise LmpipeError(f"checkpoint {folder} is corrupt: {rel} is missing")
        if sha256_file(p) != sha:
            raise LmpipeError(f"checkpoint {folder} is corrupt: {rel} does not match its sha256 in {MARKER}")
    return marker


def check_signature(folder: Path, marker: dict, key: bytes) -> None:
    sig = marker.get("signature") if isinstance(marker, dict) else None
    if not isinstance(sig, dict) or not isinstance(sig.get("value"), str):
        raise LmpipeError(f"checkpoint {folder} is refused: its {MARKER} is unsigned, so nothing shows a trainer "
                          "wrote it (it may have been planted); its files are not read")
    if sig.get("key_id") != key_id(key):
        raise LmpipeError(f"checkpoint {folder} is refused: it was signed with checkpoint key {sig.get('key_id')!r}, "
                          f"this trainer holds {key_id(key)!r}; set LMPIPE_CHECKPOINT_KEY to the key that trained it")
    if not hmac.compare_digest(sig["value"], _signature(marker, key)):
        raise LmpipeError(f"checkpoint {folder} is refused: its {MARKER} does not match its signature (it was "
                          "changed after the trainer signed it); its files are not read")


def prune(root: Path, keep: int) -> None:
    tags = committed(root)
    for t in tags[: max(0, len(tags) - keep)]:
        shutil.rmtree(root / t, ignore_errors=True)
