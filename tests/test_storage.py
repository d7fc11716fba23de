import hashlib
import os
import socket

import boto3
import pytest

from lmpipe.errors import StorageError, UnsafeKeyError
from lmpipe.storage import StorageConfig, check_key, copy, open_store


def _stores(tmp_path, bucket, storage_cfg):
    return {"local": open_store(tmp_path / "root"), "file": open_store(f"file://{tmp_path}/root2"),
            "s3": open_store(f"s3://{bucket}/some/prefix", storage_cfg)}


@pytest.mark.parametrize("kind", ["local", "file", "s3"])
def test_put_get_list_exists_delete(tmp_path, bucket, storage_cfg, kind):
    store = _stores(tmp_path, bucket, storage_cfg)[kind]
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)
    store.put_file("a/one.bin", src)
    store.put_bytes("a/b/two.txt", b"hello")
    store.put_bytes("c.txt", b"top")
    assert [o.key for o in store.list()] == ["a/b/two.txt", "a/one.bin", "c.txt"]
    assert [(o.key, o.size) for o in store.list("a")] == [("a/b/two.txt", 5), ("a/one.bin", 1000)]
    assert store.exists("a/b/two.txt") and not store.exists("a/b/nope.txt")
    assert store.get_bytes("a/b/two.txt") == b"hello"
    assert store.get_file("a/one.bin", tmp_path / "dl" / "one.bin").read_bytes() == b"x" * 1000
    assert store.sha256("c.txt") == hashlib.sha256(b"top").hexdigest()
    assert store.children("") == ["a"] and store.children("a") == ["b"] and store.children("nope") == []
    other = _stores(tmp_path, bucket, storage_cfg)["s3" if kind != "s3" else "local"]
    copy(store, "a/b/two.txt", other, "copied/two.txt")  # across kinds: download and upload
    copy(store, "a/one.bin", store, "same/one.bin")  # within a kind: server-side copy or hard link
    assert other.get_bytes("copied/two.txt") == b"hello" and store.get_bytes("same/one.bin") == b"x" * 1000
    store.delete_prefix("same")
    assert store.delete_prefix("a") == 2
    assert [o.key for o in store.list()] == ["c.txt"]
    with pytest.raises(StorageError, match="no object"):
        store.get_bytes("a/b/two.txt")


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a/..", "", "C:/x", "..\\x"])
def test_unsafe_keys_are_rejected(tmp_path, bucket, storage_cfg, key):
    with pytest.raises(UnsafeKeyError):
        check_key(key)
    for store in _stores(tmp_path, bucket, storage_cfg).values():
        with pytest.raises(UnsafeKeyError):
            store.put_bytes(key, b"evil")
    assert not (tmp_path / "x").exists()


def test_download_never_writes_outside_its_target(tmp_path, s3_endpoint, bucket, storage_cfg):
    raw = boto3.client("s3", endpoint_url=s3_endpoint)
    raw.put_object(Bucket=bucket, Key="pre/ok.txt", Body=b"fine")
    raw.put_object(Bucket=bucket, Key="pre/../../escape.txt", Body=b"evil")
    store = open_store(f"s3://{bucket}", storage_cfg)
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeKeyError):
        store.download_prefix("pre", dest)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path.parent / "escape.txt").exists()
    # a symlink inside the target cannot be used to climb out either
    local = open_store(tmp_path / "src")
    local.put_bytes("pre/link/f.txt", b"x")
    dest2 = tmp_path / "dest2"
    dest2.mkdir()
    os.symlink(tmp_path, dest2 / "link")
    with pytest.raises(UnsafeKeyError):
        local.download_prefix("pre", dest2)


def test_large_files_go_up_in_multipart_with_checksums(tmp_path, s3_endpoint, bucket, storage_cfg):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 * 1024 * 1024))
    store = open_store(f"s3://{bucket}/p", storage_cfg)  # threshold and parts of 5 MB
    store.put_file("big.bin", big)
    head = boto3.client("s3", endpoint_url=s3_endpoint).head_object(Bucket=bucket, Key="p/big.bin", ChecksumMode="ENABLED")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    assert "ChecksumSHA256" in head
    assert store.sha256("big.bin") == hashlib.sha256(big.read_bytes()).hexdigest()


def test_unreachable_endpoint_names_bucket_and_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    cfg = StorageConfig(endpoint_url=f"http://127.0.0.1:{port}", connect_timeout_s=1, max_attempts=1)
    with pytest.raises(StorageError, match=rf"cannot reach S3.*'my-bucket'.*127\.0\.0\.1:{port}"):
        open_store("s3://my-bucket/x", cfg).list()


def test_missing_bucket_and_wrong_credentials(s3_endpoint, storage_cfg, monkeypatch):
    with pytest.raises(StorageError, match=rf"'no-such-bucket' at endpoint {s3_endpoint}.*does not exist"):
        open_store("s3://no-such-bucket/x", storage_cfg).list()
    import requests

    previous = requests.post(f"{s3_endpoint}/moto-api/reset-auth", data=b"0").json()["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        cfg = StorageConfig(endpoint_url=s3_endpoint, region="eu-west-1")  # a new client picks up the new keys
        with pytest.raises(StorageError, match=rf"refused the credentials for bucket 'some-bucket' at endpoint {s3_endpoint}"):
            open_store("s3://some-bucket/x", cfg).list()
    finally:
        requests.post(f"{s3_endpoint}/moto-api/reset-auth", data=str(previous).encode())


def test_unsupported_scheme():
    with pytest.raises(StorageError, match="unsupported storage URI"):
        open_store("gs://bucket/x")


def test_s3_objects_carry_the_content_type_a_browser_needs(tmp_path, bucket, storage_cfg, s3_endpoint):
    """An HTML report or a JSON manifest opened from a presigned link is shown, not downloaded."""
    import boto3

    store = _stores(tmp_path, bucket, storage_cfg)["s3"]
    page = tmp_path / "index.html"
    page.write_text("<html></html>")
    store.put_file("report/index.html", page)
    store.put_bytes("shards/manifest.json", b"{}")
    store.put_bytes("shards/train/part-0.parquet", b"PAR1")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    types = {k: s3.head_object(Bucket=bucket, Key=f"some/prefix/{k}")["ContentType"] for k in
             ("report/index.html", "shards/manifest.json", "shards/train/part-0.parquet")}
    assert types == {"report/index.html": "text/html", "shards/manifest.json": "application/json",
                     "shards/train/part-0.parquet": "application/octet-stream"}


@pytest.mark.parametrize("uri", ["s3://b/corpus/date=2026-01-01/", "/data/out", "file:///data/x", "rel/out,v2"])
def test_check_uri_accepts_plain_uris(uri):
    from lmpipe.storage import check_uri

    assert check_uri(uri, "param") == uri


@pytest.mark.parametrize("uri, why", [("/x/$(touch y)", "may not hold"), ("/x/a'b", "may not hold"),
                                      ("/x/a b", "may not hold"), ("s3://b/../c", "'..' segment"),
                                      ("http://h/x", "scheme"), ("/x/`id`", "may not hold")])
def test_check_uri_refuses_shell_syntax_and_escapes(uri, why):
    from lmpipe.errors import ConfigError
    from lmpipe.storage import check_uri

    with pytest.raises(ConfigError, match=why):
        check_uri(uri, "param 'output'")
