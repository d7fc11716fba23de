"""Every environment variable lmpipe reads, in one place.

Code reads them through :func:`get`, deployment files (``docker/compose.yaml``,
``docker/.env.example``) set them by these names, and a test checks the two agree.
Stage settings proper live in typed config (``key=value`` overrides); these are the
few that describe the deployment around it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    name: str
    default: str | None
    help: str


SETTINGS = {s.name: s for s in [
    Setting("LMPIPE_HOME", None, "local state: MLflow SQLite store, caches, run staging (default ~/.lmpipe)"),
    Setting("MLFLOW_TRACKING_URI", None, "MLflow tracking server (default: SQLite under LMPIPE_HOME)"),
    Setting("LMPIPE_CORPUS", None, "lm_pipeline's default corpus URI (default: the demo corpus under LMPIPE_HOME)"),
    Setting("LMPIPE_OUTPUT", None, "lm_pipeline's default output prefix (default: LMPIPE_HOME/pipeline)"),
    Setting("LMPIPE_NIGHTLY_CRON", "0 2 * * *", "lm_pipeline's schedule"),
    Setting("LMPIPE_SPARK_CONN_ID", "spark_default", "Airflow connection the tokenize task submits to"),
    Setting("LMPIPE_AWS_CONN_ID", "aws_default", "Airflow aws connection with the S3/MinIO credentials"),
    Setting("LMPIPE_HOSTFILE", None, "DeepSpeed hostfile: lm_pipeline's train runs the launcher on its first host "
            "over ssh, which starts ranks on `nodes` hosts"),
    Setting("LMPIPE_SERVE_URL", "http://127.0.0.1:8000", "base URL of the serving job (lm_serving_rollout)"),
    Setting("LMPIPE_MLFLOW_UI", "http://127.0.0.1:5000", "MLflow UI address printed in task logs (when the tracking URI is not http)"),
    Setting("LMPIPE_API_KEY", None, "API key the serving job requires, and clients send"),
    Setting("LMPIPE_SPARK_LOG_LEVEL", "WARN", "Spark log level in lmpipe's Spark jobs"),
    Setting("LMPIPE_PROGRESS_S", "5", "seconds between progress lines of long Spark stages"),
]}


def get(name: str) -> str | None:
    """The value of a known setting (its default when unset or empty)."""
    return os.environ.get(name) or SETTINGS[name].default
