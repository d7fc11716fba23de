"""MLflow 3 tracking and model registry: one place that knows where they are.

Embedded default: a SQLite backend store at ``$LMPIPE_HOME/mlflow.db`` with artifacts under
``$LMPIPE_HOME/mlflow-artifacts`` (or ``tracking.artifact_location``, e.g. the run's S3
bucket). Production: ``tracking.uri`` (or ``MLFLOW_TRACKING_URI``) names a tracking server.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

from lmpipe import settings
from lmpipe.config import stage_config
from lmpipe.settings import home

CHAMPION, CANDIDATE = "champion", "candidate"
MODEL_NAME = "lmpipe"  # the registered model's default name
# Every change of champion is one registered-model tag of its own, ``lmpipe.champion.event.<ns>-<id>``
# = [version, event, time]: appending never rewrites a growing value, and no value outgrows a tag.
EVENT_PREFIX = "lmpipe.champion.event."
LEGACY_LOG_TAG = "lmpipe.champion_log"  # one JSON list, as older registries hold it; read, never written


@stage_config
class TrackingConfig:
    enabled: bool = True  # track runs and register models in MLflow
    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite under $LMPIPE_HOME
    experiment: str = "lmpipe"  # the MLflow experiment of training runs
    artifact_location: str | None = None  # default: $LMPIPE_HOME/mlflow-artifacts
    model_name: str = MODEL_NAME  # the registered model


def champion_uri(model_name: str = MODEL_NAME) -> str:
    """The URI of the data-aware asset a promotion emits (``lm_serving_rollout`` is scheduled on it)."""
    return f"lmpipe://models/{model_name}/champion"


def tracking_uri(cfg: TrackingConfig) -> str:
    if cfg.uri:
        return cfg.uri
    if settings.get("MLFLOW_TRACKING_URI"):
        return settings.get("MLFLOW_TRACKING_URI")
    home().mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home() / 'mlflow.db'}"


def client(cfg: TrackingConfig):
    import mlflow
    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_id(c, cfg: TrackingConfig) -> str:
    exp = c.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    location = cfg.artifact_location
    if location is None and not tracking_uri(cfg).startswith("http"):
        location = (home() / "mlflow-artifacts").as_uri()  # embedded store; a server keeps its own artifact root
    return c.create_experiment(cfg.experiment, artifact_location=location)


def s3_env(storage) -> None:
    """MLflow's S3 artifact store reads its endpoint from the environment (MinIO, moto)."""
    if storage is not None and storage.endpoint_url and not settings.get("MLFLOW_S3_ENDPOINT_URL"):
        os.environ["MLFLOW_S3_ENDPOINT_URL"] = storage.endpoint_url


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if not isinstance(v, str) else v
    return out


def ensure_model(c, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description="Language models trained by lmpipe")


def alias_version(c, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion_log(c, name: str) -> list[list[str]]:
    """Every change of champion, oldest first: [[version, event, time], ...]."""
    tags = c.get_registered_model(name).tags
    events = [json.loads(v) for k, v in sorted(tags.items()) if k.startswith(EVENT_PREFIX)]
    return json.loads(tags.get(LEGACY_LOG_TAG, "[]")) + events


def champion_history(c, name: str) -> list[str]:
    """The champions a rollback steps back through, oldest first: the log replayed (a promotion
    pushes its version, a rollback pops the current one)."""
    stack: list[str] = []
    for version, event, _at in champion_log(c, name):
        if event == "promoted" and (not stack or stack[-1] != version):
            stack.append(version)
        elif event.startswith("rollback") and stack:
            stack.pop()
    return stack


def log_champion(c, name: str, version: str, event: str, at: str) -> None:
    import secrets
    import time

    key = f"{EVENT_PREFIX}{time.time_ns():020d}-{secrets.token_hex(3)}"
    c.set_registered_model_tag(name, key, json.dumps([str(version), event, at]))
