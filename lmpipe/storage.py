"""One small object-storage layer: local folders (the embedded default) and S3/MinIO.

A ``Store`` is rooted at a URI (``/data/x``, ``file:///data/x``, ``s3://bucket/prefix``)
and addresses objects by relative keys. Keys that could escape the root (``..``,
absolute paths) are rejected, and downloads never write outside their target folder.

S3 (:mod:`lmpipe.s3`) goes through boto3 with its standard credential chain (``AWS_ACCESS_KEY_ID``...,
``AWS_PROFILE``) and endpoint settings (``AWS_ENDPOINT_URL`` or ``endpoint_url`` for
MinIO). Large files go up in multipart uploads with SHA-256 checksums, which S3
verifies per part.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO
from urllib.parse import urlparse

from lmpipe.config import stage_config
from lmpipe.errors import StorageError, UnsafeKeyError

MB = 1024 * 1024
_UMASK = os.umask(0)
os.umask(_UMASK)


def _publish(tmp: str, target: Path) -> None:
    """Rename a finished temp file into place with normal permissions (mkstemp makes 0600)."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, target)


@stage_config
class StorageConfig:
    """S3 settings. ``None`` means boto3's standard resolution (env vars, profiles, config files)."""

    endpoint_url: str | None = None  # e.g. http://minio:9000; AWS_ENDPOINT_URL also works
    region: str | None = None  # default: boto3's resolution
    profile: str | None = None  # an AWS profile name
    multipart_threshold_mb: int = 64  # files above this go up in multipart uploads
    multipart_chunk_mb: int = 16  # multipart part size
    connect_timeout_s: float = 5.0  # S3 connect timeout
    max_attempts: int = 3  # S3 request attempts (boto3 standard retries)


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


def check_key(key: str) -> str:
    """Return ``key`` normalised, or raise if it is empty, absolute, or climbs with ``..``."""
    if not key or "\x00" in key:
        raise UnsafeKeyError(f"object key {key!r} is empty or contains NUL")
    if key.startswith(("/", "\\")) or (len(key) > 1 and key[1] == ":"):
        raise UnsafeKeyError(f"object key {key!r} is an absolute path")
    parts = key.replace("\\", "/").split("/")
    if any(p == ".." for p in parts):
        raise UnsafeKeyError(f"object key {key!r} contains '..'")
    return "/".join(p for p in parts if p not in ("", "."))


def safe_join(root: Path, key: str) -> Path:
    """``root/key``, guaranteed to stay inside ``root`` (symlinks resolved)."""
    root = root.resolve()
    target = (root / check_key(key)).resolve()
    if target != root and not target.is_relative_to(root):
        raise UnsafeKeyError(f"object key {key!r} resolves outside {root}")
    return target


def sha256_file(path: str | Path, chunk: int = 4 * MB) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class Store:
    """Objects under one root URI, addressed by relative keys."""

    uri: str

    def put_file(self, key: str, local_path: str | Path) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def open(self, key: str, start: int = 0) -> BinaryIO: ...
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...
    def exists(self, key: str) -> bool: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def children(self, prefix: str) -> list[str]: ...  # names of the immediate sub-folders of prefix

    def url(self, key: str = "") -> str:
        key = check_key(key) if key else ""
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri

    def get_file(self, key: str, dest: str | Path) -> Path:
        """Download ``key`` to ``dest`` atomically (temp file + rename)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".lmpipe-tmp-")
        try:
            with os.fdopen(fd, "wb") as out, self.open(key) as src:
                shutil.copyfileobj(src, out, 4 * MB)
            _publish(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return dest

    def download_prefix(self, prefix: str, dest_dir: str | Path) -> list[Path]:
        """Copy every object under ``prefix`` into ``dest_dir``; refuse keys that would escape it."""
        dest_dir = Path(dest_dir)
        prefix = check_key(prefix) + "/" if prefix else ""
        plan = []
        for obj in self.list(prefix):
            plan.append((obj.key, safe_join(dest_dir, obj.key[len(prefix) :])))
        return [self.get_file(key, target) for key, target in plan]

    def sha256(self, key: str) -> str:
        h = hashlib.sha256()
        with self.open(key) as f:
            while block := f.read(4 * MB):
                h.update(block)
        return h.hexdigest()


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def path(self, key: str) -> Path:
        return safe_join(self.root, key)

    def put_file(self, key: str, local_path: str | Path) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".lmpipe-tmp-")
        os.close(fd)
        try:
            shutil.copyfile(local_path, tmp)
            _publish(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".lmpipe-tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            _publish(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def open(self, key: str, start: int = 0) -> BinaryIO:
        try:
            f = open(self.path(key), "rb")
        except (FileNotFoundError, IsADirectoryError):
            raise StorageError(f"no object {self.url(key)}") from None
        if start:
            f.seek(start)
        return f

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self.path(prefix) if prefix else self.root
        if base.is_file():
            return [ObjectInfo(check_key(prefix), base.stat().st_size)]
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".lmpipe-tmp-"):
                    continue
                p = Path(dirpath) / name
                out.append(ObjectInfo(p.relative_to(self.root).as_posix(), p.stat().st_size))
        return sorted(out, key=lambda o: o.key)

    def children(self, prefix: str) -> list[str]:
        base = self.path(prefix) if prefix else self.root
        return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []

    def delete_prefix(self, prefix: str) -> int:
        target = self.path(prefix) if prefix else self.root
        if target.is_file():
            target.unlink()
            return 1
        if not target.exists():
            return 0
        n = sum(len(files) for _d, _s, files in os.walk(target))
        shutil.rmtree(target)
        return n


def open_store(uri: str | Path, cfg: StorageConfig | None = None) -> Store:
    """A store rooted at ``uri``: a local path, ``file://`` URI, or ``s3://bucket/prefix``."""
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        from lmpipe.s3 import S3Store

        return S3Store(parsed.netloc, parsed.path.lstrip("/"), cfg)
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme in ("", ) or (len(parsed.scheme) == 1 and os.name == "nt"):
        return LocalStore(uri)
    raise StorageError(f"unsupported storage URI {uri!r}: use a local path, file:// or s3://bucket/prefix")


def copy(src: Store, key: str, dst: Store, dst_key: str | None = None) -> None:
    """Copy one object between stores: a server-side copy within one S3 endpoint, a hard link
    (or copy) between local folders, a download and upload otherwise."""
    dst_key = dst_key or key
    if is_s3(src.uri) and is_s3(dst.uri) and src.cfg == dst.cfg:
        dst.copy_within(src, key, dst_key)
        return
    if isinstance(src, LocalStore) and isinstance(dst, LocalStore):
        source, target = src.path(key), dst.path(dst_key)
        if not source.is_file():
            raise StorageError(f"no object {src.url(key)}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".lmpipe-tmp-{os.getpid()}-{target.name}")
        try:
            os.link(source, tmp)  # shards are immutable once published: sharing the inode is safe
        except OSError:
            shutil.copyfile(source, tmp)
        _publish(str(tmp), target)
        return
    with tempfile.TemporaryDirectory(prefix="lmpipe-copy-") as d:
        dst.put_file(dst_key, src.get_file(key, Path(d) / "obj"))


def split_uri(uri: str | Path) -> tuple[str, str]:
    """``s3://b/a/c.txt`` -> (``s3://b/a``, ``c.txt``): the parent URI and the last name."""
    uri = str(uri).rstrip("/")
    parent, _, name = uri.rpartition("/")
    if not name or parent in ("s3:/", "s3:", ""):
        return uri, ""
    return parent, name


def join(uri: str, *parts: str) -> str:
    out = str(uri).rstrip("/")
    for p in parts:
        out = f"{out}/{check_key(p)}"
    return out


URI_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-/:=+@,%")


def check_uri(uri: str, what: str) -> str:
    """A corpus or output URI from an untrusted source (a DAG param): ``s3://``, ``file://`` or a
    path, in letters, digits and ``._-/:=+@,%`` only, with no ``..`` segment. Such a value cannot
    become shell syntax on any node, whatever quotes a launcher does or does not add."""
    from lmpipe.errors import ConfigError

    bad = sorted(set(uri) - URI_CHARS)
    if bad:
        raise ConfigError(f"{what} {uri!r} has characters a URI here may not hold: {''.join(bad)!r} "
                          "(allowed: letters, digits and ._-/:=+@,%)")
    scheme = urlparse(uri).scheme
    if scheme not in ("", "s3", "file"):
        raise ConfigError(f"{what} {uri!r}: the scheme must be s3:// or file://, or none for a path")
    if ".." in PurePosixPath(urlparse(uri).path).parts:
        raise ConfigError(f"{what} {uri!r} has a '..' segment")
    return uri


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def relative(key: str, prefix: str) -> str:
    return str(PurePosixPath(key).relative_to(prefix)) if prefix else key
