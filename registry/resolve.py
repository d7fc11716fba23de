"""One resolver for model references, used by evaluation, warm starts and serving.

A reference is ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, an ``s3://`` prefix or a
local folder holding an exported model. :func:`lookup` says what it points at now (cheap: no
download); :func:`fetch` makes it a local folder. Registry versions are immutable, so each is
downloaded once into ``$LMPIPE_HOME/models/NAME/VERSION-REGISTRY`` (REGISTRY, a hash of the
tracking URI, keeps apart registries that each hold a version 1 of one name); an ``s3://`` prefix may be
rewritten, so it is fetched afresh. Either way the download goes to a temporary folder that
is renamed into place with a ``.complete`` marker written last: a download cut short is
never mistaken for a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lmpipe.errors import LmpipeError
from lmpipe.settings import home
from lmpipe.storage import is_s3, open_store, split_uri
from registry import tracking

COMPLETE = ".complete"
MODEL_VERSION, RUN_CONFIG = "model_version.json", "train_config.json"  # in a training run folder


class NoSuchVersion(LmpipeError):
    """A registry alias that points at no version (yet): a fresh registry has no champion."""


@dataclass
class ModelRef:
    ref: str  # as given
    name: str
    version: str | None  # the registry version, when the reference is (or records) one
    source: str  # models:/NAME/VERSION, an s3:// prefix or a local folder
    run_id: str | None = None
    registry: str | None = None  # the tracking URI of a registry version
    run: str | None = None  # the training run folder an export belongs to (its eval/ and report/ go there)
    tags: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.name}:v{self.version}" if self.version else self.name


def parse_registry(ref: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS, None); ``models:/NAME/VERSION`` -> (NAME, None, VERSION)."""
    name, _, version = ref[len("models:/"):].partition("/")
    name, _, alias = name.partition("@")
    if not name or bool(alias) == bool(version):
        raise LmpipeError(f"model reference {ref!r} is not models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, alias or None, version or None


def lookup(ref: str, tracking_cfg: tracking.TrackingConfig, storage=None) -> ModelRef:
    """What ``ref`` points at right now (an alias is resolved to its current version). A
    training run's ``export/`` (local or on S3) carries the version that run registered."""
    if ref.startswith("models:/"):
        name, alias, version = parse_registry(ref)
        c = tracking.client(tracking_cfg)
        v = tracking.alias_version(c, name, alias) if alias else c.get_model_version(name, version)
        if v is None:
            raise NoSuchVersion(f"{ref}: no version of {name} has alias {alias!r}")
        return ModelRef(ref, name, str(v.version), f"models:/{name}/{v.version}", run_id=v.run_id, tags=dict(v.tags),
                        registry=tracking.tracking_uri(tracking_cfg))
    source = ref.rstrip("/") if is_s3(ref) else str(Path(open_store(ref).root))
    parent, folder = split_uri(source)
    run = open_store(parent, storage)
    info = json.loads(run.get_bytes(MODEL_VERSION)) if run.exists(MODEL_VERSION) else {}
    version = str(info["version"]) if info.get("version") is not None else None
    return ModelRef(ref, info.get("name") or folder or "model", version, source, info.get("run_id"),
                    run=run.uri if run.exists(RUN_CONFIG) else None)


def fetch(m: ModelRef, storage=None) -> Path:
    """A local folder holding the model ``m`` points at."""
    if m.source.startswith("models:/"):
        registry = hashlib.sha256(str(m.registry).encode()).hexdigest()[:8]
        dest = home() / "models" / m.name / f"{m.version}-{registry}"
        if not (dest / COMPLETE).is_file():
            import mlflow

            _download(dest, lambda tmp: mlflow.artifacts.download_artifacts(m.source, dst_path=str(tmp)))
        return dest
    if is_s3(m.source):
        dest = home() / "models" / ("s3-" + hashlib.sha256(m.source.encode()).hexdigest()[:16])
        _download(dest, lambda tmp: open_store(m.source, storage).download_prefix("", tmp))
        return dest
    path = Path(m.source)
    if not (path / "config.json").is_file():
        raise LmpipeError(f"{m.ref} is not a model folder (no config.json): pass a run's export/ or "
                          "models:/NAME@ALIAS")
    return path


def resolve(ref: str, tracking_cfg: tracking.TrackingConfig, storage=None) -> tuple[Path, ModelRef]:
    m = lookup(ref, tracking_cfg, storage)
    return fetch(m, storage), m


def _download(dest: Path, download) -> None:
    """``download(tmp)`` into a fresh folder beside ``dest``, marker last, then rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        download(tmp)
        if not (tmp / "config.json").is_file():
            raise LmpipeError(f"{dest.name}: the downloaded model has no config.json")
        (tmp / COMPLETE).write_text("")
        shutil.rmtree(dest, ignore_errors=True)
        try:
            tmp.rename(dest)
        except OSError:
            if not (dest / COMPLETE).is_file():  # another process got there first with the same model
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
