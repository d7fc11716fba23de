"""Checkpoint markers: signed with the trainers' key; anything unsigned, re-signed or signed
with another key is refused before a checkpoint file is read. No training here: the tag
folders are built by hand, and the oracle for a good signature is hmac/hashlib directly."""

import hashlib
import hmac
import json
import os
import stat

import pytest

from lmpipe.errors import LmpipeError
from training import checkpoint as ckpt

KEY, OTHER = b"k" * 32, b"o" * 32


def make_tag(root, key=KEY):
    folder = root / "step-00000002"
    (folder / "global_step2").mkdir(parents=True)
    (folder / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(b"model bytes")
    ckpt.commit(root, "step-00000002", {"step": 2, "position": 4, "world_size": 2}, key=key)
    return folder


def marker(folder):
    return json.loads((folder / ckpt.MARKER).read_text())


def test_a_committed_marker_carries_an_hmac_of_its_content_and_verifies(tmp_path):
    folder = make_tag(tmp_path)
    m = marker(folder)
    body = json.dumps({k: v for k, v in m.items() if k != "signature"}, sort_keys=True, separators=(",", ":"))
    assert m["signature"]["value"] == hmac.new(KEY, body.encode(), hashlib.sha256).hexdigest()
    assert m["files"]["global_step2/mp_rank_00_model_states.pt"] == hashlib.sha256(b"model bytes").hexdigest()
    assert ckpt.verify(tmp_path, "step-00000002", key=KEY)["step"] == 2


def test_an_unsigned_marker_is_refused(tmp_path):
    folder = make_tag(tmp_path)
    m = marker(folder)
    del m["signature"]
    (folder / ckpt.MARKER).write_text(json.dumps(m))
    with pytest.raises(LmpipeError, match="is unsigned"):
        ckpt.verify(tmp_path, "step-00000002", key=KEY)


def test_a_marker_changed_after_signing_is_refused_before_any_file_is_read(tmp_path, monkeypatch):
    folder = make_tag(tmp_path)
    planted = folder / "global_step2" / "mp_rank_00_model_states.pt"
    planted.write_bytes(b"a planted pickle")
    m = marker(folder)
    m["files"]["global_step2/mp_rank_00_model_states.pt"] = hashlib.sha256(b"a planted pickle").hexdigest()
    (folder / ckpt.MARKER).write_text(json.dumps(m))
    read = []
    monkeypatch.setattr(ckpt, "sha256_file", lambda p: read.append(p) or "")
    with pytest.raises(LmpipeError, match="does not match its signature"):
        ckpt.verify(tmp_path, "step-00000002", key=KEY)
    assert read == []  # not even hashed


def test_a_marker_signed_with_another_key_is_refused_naming_both_key_ids(tmp_path):
    make_tag(tmp_path, key=OTHER)
    with pytest.raises(LmpipeError, match=rf"signed with checkpoint key '{ckpt.key_id(OTHER)}'.*'{ckpt.key_id(KEY)}'"):
        ckpt.verify(tmp_path, "step-00000002", key=KEY)


def test_the_key_comes_from_the_setting_else_one_file_made_once_with_mode_600(tmp_path, monkeypatch):
    monkeypatch.setenv("LMPIPE_HOME", str(tmp_path))
    monkeypatch.delenv("LMPIPE_CHECKPOINT_KEY", raising=False)
    first = ckpt.signing_key()
    path = tmp_path / ckpt.KEY_FILE
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(first) == 64
    assert ckpt.signing_key() == first
    monkeypatch.setenv("LMPIPE_CHECKPOINT_KEY", "from-the-setting")
    assert ckpt.signing_key() == b"from-the-setting"
