"""The S3 side of :mod:`lmpipe.storage`: a ``Store`` on a bucket prefix, through boto3.

boto3's standard credential chain (``AWS_ACCESS_KEY_ID``..., ``AWS_PROFILE``) and endpoint
settings (``AWS_ENDPOINT_URL``, or ``storage.endpoint_url`` for MinIO) apply. Large files go
up in multipart uploads with SHA-256 checksums, which S3 verifies per part, and every
botocore error becomes one :class:`~lmpipe.errors.StorageError` naming bucket and endpoint.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from lmpipe.errors import StorageError
from lmpipe.storage import MB, ObjectInfo, StorageConfig, Store, check_key

_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def s3_client(cfg: StorageConfig):
    """One boto3 client per (endpoint, region, profile) and process; clients are thread-safe."""
    import boto3
    from botocore.config import Config

    key = (cfg.endpoint_url, cfg.region, cfg.profile, cfg.connect_timeout_s, cfg.max_attempts, os.getpid())
    with _clients_lock:
        if key not in _clients:
            try:
                session = boto3.session.Session(profile_name=cfg.profile, region_name=cfg.region)
            except Exception as exc:  # botocore.exceptions.ProfileNotFound and friends
                raise StorageError(f"cannot set up S3 session: {exc}") from exc
            _clients[key] = session.client(
                "s3",
                endpoint_url=cfg.endpoint_url,
                config=Config(
                    connect_timeout=cfg.connect_timeout_s,
                    retries={"max_attempts": cfg.max_attempts, "mode": "standard"},
                    s3={"addressing_style": "path"} if cfg.endpoint_url else None,
                ),
            )
        return _clients[key]


def content_type(key: str) -> str:
    """The Content-Type a browser needs to show an object (an HTML report, a JSON manifest) rather
    than download it; anything unknown is binary."""
    import mimetypes

    return mimetypes.guess_type(key)[0] or "application/octet-stream"


class S3Store(Store):
    def __init__(self, bucket: str, prefix: str, cfg: StorageConfig | None = None):
        if not bucket:
            raise StorageError("S3 URI has no bucket name")
        self.bucket = bucket
        self.prefix = check_key(prefix) if prefix.strip("/") else ""
        self.cfg = cfg or StorageConfig()
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")

    @functools.cached_property
    def client(self):
        return s3_client(self.cfg)

    def _key(self, key: str) -> str:
        key = check_key(key)
        return f"{self.prefix}/{key}".strip("/") if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, what: str, key: str = "") -> Iterator[None]:
        """Turn botocore's exceptions into one clear message naming bucket and endpoint."""
        from botocore import exceptions as bx

        where = f"bucket {self.bucket!r} at endpoint {self.client.meta.endpoint_url}"
        try:
            yield
        except (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError) as exc:
            raise StorageError(f"cannot reach S3 ({what} {self.url(key)}): {where} is unreachable: {exc}") from exc
        except (bx.NoCredentialsError, bx.PartialCredentialsError) as exc:
            raise StorageError(
                f"no usable AWS credentials for {where}: set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE ({exc})"
            ) from exc
        except bx.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken"):
                raise StorageError(f"S3 refused the credentials for {where} ({what} {self.url(key)}): {code}") from exc
            if code == "NoSuchBucket":
                raise StorageError(f"{where}: the bucket does not exist") from exc
            if code in ("NoSuchKey", "404", "NotFound"):
                raise StorageError(f"no object {self.url(key)} ({where})") from exc
            raise StorageError(f"S3 error on {what} {self.url(key)} ({where}): {exc}") from exc

    def put_file(self, key: str, local_path: str | Path) -> None:
        from boto3.s3.transfer import TransferConfig

        tc = TransferConfig(
            multipart_threshold=self.cfg.multipart_threshold_mb * MB,
            multipart_chunksize=self.cfg.multipart_chunk_mb * MB,
        )
        with self._errors("upload", key):
            self.client.upload_file(str(local_path), self.bucket, self._key(key), Config=tc,
                                    ExtraArgs={"ChecksumAlgorithm": "SHA256", "ContentType": content_type(key)})

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._errors("upload", key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ChecksumAlgorithm="SHA256",
                                   ContentType=content_type(key))

    def open(self, key: str, start: int = 0) -> BinaryIO:
        extra = {"Range": f"bytes={start}-"} if start else {}
        with self._errors("download", key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key), **extra)["Body"]

    def get_bytes(self, key: str) -> bytes:
        with self._errors("download", key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            with self._errors("stat", key):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except StorageError as exc:
            if isinstance(exc.__cause__, ClientError) and "no object" in str(exc):
                return False
            raise

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full = self._key(prefix) if prefix else self.prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        with self._errors("list", prefix):
            # An exact object first: a corpus URI may name one file.
            if full and not full.endswith("/"):
                pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
                for page in pages:
                    for obj in page.get("Contents", []):
                        if obj["Key"] == full:
                            return [ObjectInfo(obj["Key"][strip:], obj["Size"])]
                        if obj["Key"].startswith(full + "/"):
                            out.append(ObjectInfo(obj["Key"][strip:], obj["Size"]))
            else:
                for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                    for obj in page.get("Contents", []):
                        out.append(ObjectInfo(obj["Key"][strip:], obj["Size"]))
        return sorted(out, key=lambda o: o.key)

    def children(self, prefix: str) -> list[str]:
        full = (self._key(prefix) if prefix else self.prefix).strip("/")
        full = full + "/" if full else ""
        out = []
        with self._errors("list", prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full, Delimiter="/")
            for page in pages:
                out += [cp["Prefix"][len(full):].rstrip("/") for cp in page.get("CommonPrefixes", [])]
        return sorted(out)

    def delete_prefix(self, prefix: str) -> int:
        objs = self.list(prefix)
        with self._errors("delete", prefix):
            for i in range(0, len(objs), 1000):
                batch = [{"Key": f"{self.prefix}/{o.key}" if self.prefix else o.key} for o in objs[i : i + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
        return len(objs)

    def presign(self, key: str, expires_s: int = 7 * 24 * 3600) -> str:
        """A URL that reads ``key`` without credentials until it expires (at most 7 days)."""
        with self._errors("presign", key):
            return self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket,
                                                                            "Key": self._key(key)}, ExpiresIn=expires_s)

    def copy_within(self, src: "S3Store", key: str, dst_key: str) -> None:
        """A server-side copy from another store on the same endpoint."""
        with self._errors("copy", dst_key):
            self.client.copy({"Bucket": src.bucket, "Key": src._key(key)}, self.bucket, self._key(dst_key),
                             ExtraArgs={"ChecksumAlgorithm": "SHA256"})
