"""The one resolver of model references: registry versions downloaded once behind a completion
marker, S3 prefixes fetched afresh, local folders checked, a missing alias named."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from lmpipe.errors import LmpipeError
from lmpipe.settings import home
from lmpipe.storage import open_store
from registry import resolve, tracking


@pytest.fixture
def registry(tmp_path):
    import mlflow

    prior = os.environ.get("MLFLOW_TRACKING_URI")
    cfg = tracking.TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", model_name=f"resolve-{tmp_path.name}",
                                  artifact_location=(tmp_path / "artifacts").as_uri())
    yield cfg
    mlflow.set_tracking_uri(prior)  # tracking.client exports the URI to this process's environment


def model_folder(path, text: str):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "text": text}))
    (path / "model.safetensors").write_bytes(text.encode() * 100)
    return path


def register(folder, cfg) -> str:
    c = tracking.client(cfg)
    run = c.create_run(tracking.experiment_id(c, cfg))
    c.log_artifacts(run.info.run_id, str(folder), "model")
    tracking.ensure_model(c, cfg.model_name)
    return str(c.create_model_version(cfg.model_name, source=f"{run.info.artifact_uri}/model",
                                      run_id=run.info.run_id).version)


def test_registry_versions_download_once_behind_a_completion_marker(registry, tmp_path):
    name = registry.model_name
    with pytest.raises(resolve.NoSuchVersion, match=f"no version of {name} has alias 'champion'"):
        resolve.lookup(f"models:/{name}@champion", registry)
    v = register(model_folder(tmp_path / "v1", "first"), registry)
    tracking.client(registry).set_registered_model_alias(name, "champion", v)
    path, ref = resolve.resolve(f"models:/{name}@champion", registry)
    assert (ref.name, ref.version, ref.source) == (name, v, f"models:/{name}/{v}")
    assert path.parent == home() / "models" / name and (path / resolve.COMPLETE).is_file()
    assert (path / "model.safetensors").read_bytes() == (tmp_path / "v1" / "model.safetensors").read_bytes()
    (path / "kept").write_text("a second resolve must not download again")
    assert resolve.resolve(f"models:/{name}/{v}", registry)[0] == path and (path / "kept").is_file()


def test_a_download_cut_short_is_never_taken_for_a_model(registry, tmp_path):
    v = register(model_folder(tmp_path / "v", "whole"), registry)
    dest, _ = resolve.resolve(f"models:/{registry.model_name}/{v}", registry)
    shutil.rmtree(dest)
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{")  # what a killed download leaves: files, no marker
    path, _ = resolve.resolve(f"models:/{registry.model_name}/{v}", registry)
    assert json.loads((path / "config.json").read_text())["text"] == "whole" and (path / resolve.COMPLETE).is_file()
    assert not list(dest.parent.glob(".*tmp*"))  # no temporary folder left behind


def test_two_registries_with_the_same_name_and_version_never_share_a_download(registry, tmp_path):
    other = tracking.TrackingConfig(uri=f"sqlite:///{tmp_path / 'other.db'}", model_name=registry.model_name,
                                    artifact_location=(tmp_path / "other-artifacts").as_uri())
    va = register(model_folder(tmp_path / "a", "from the first registry"), registry)
    vb = register(model_folder(tmp_path / "b", "from the second registry"), other)
    assert va == vb == "1"
    a, _ = resolve.resolve(f"models:/{registry.model_name}/1", registry)
    b, _ = resolve.resolve(f"models:/{registry.model_name}/1", other)
    assert a != b
    assert json.loads((a / "config.json").read_text())["text"] == "from the first registry"
    assert json.loads((b / "config.json").read_text())["text"] == "from the second registry"


def test_s3_prefixes_are_fetched_afresh_and_folders_checked(tmp_path, bucket, storage_cfg):
    store = open_store(f"s3://{bucket}/export", storage_cfg)
    for name in ("config.json", "model.safetensors"):
        store.put_bytes(name, b"{}" if name == "config.json" else b"one")
    path = resolve.fetch(resolve.lookup(f"s3://{bucket}/export", tracking.TrackingConfig(), storage_cfg), storage_cfg)
    assert (path / "model.safetensors").read_bytes() == b"one"
    store.put_bytes("model.safetensors", b"two")  # the prefix was rewritten: a new export
    path = resolve.fetch(resolve.lookup(f"s3://{bucket}/export", tracking.TrackingConfig(), storage_cfg), storage_cfg)
    assert (path / "model.safetensors").read_bytes() == b"two"
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(LmpipeError, match="is not a model folder"):
        resolve.resolve(str(tmp_path / "not-a-model"), tracking.TrackingConfig())
    with pytest.raises(LmpipeError, match="is not models:/NAME@ALIAS or models:/NAME/VERSION"):
        resolve.lookup("models:/x", tracking.TrackingConfig())
