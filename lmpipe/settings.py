"""Every environment variable lmpipe reads, in one place, and the one reader of them.

Code reads the environment only through :func:`get` (a test checks it). Stage settings
proper live in typed config (``key=value`` overrides); the variables here describe the
deployment around the stages, or are set for lmpipe by the programs that start it:

- ``deployment``: set by whoever deploys lmpipe; ``docker/compose.yaml`` and
  ``docker/.env.example`` set them by these names, and a test checks the two agree;
- ``runtime``: set by a launcher or library (DeepSpeed, spark-submit, Airflow) or by lmpipe
  for its own child processes; nobody sets them by hand;
- ``stack``: ports, logins and locations of the production topology, shared by ``make stack``
  (:mod:`lmpipe.stack`) and ``docker/compose.yaml``; a test checks that compose's defaults
  are the ``stack`` values here;
- ``demo``: knobs of ``make demo``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class Setting:
    name: str
    default: str | None
    help: str
    kind: Literal["deployment", "runtime", "stack", "demo"] = "deployment"
    stack: str | None = None  # the value `make stack` and docker/compose.yaml use when unset


SETTINGS = {s.name: s for s in [
    Setting("LMPIPE_HOME", None, "local state: MLflow SQLite store, caches, run staging (default ~/.lmpipe)"),
    Setting("MLFLOW_TRACKING_URI", None, "MLflow tracking server (default: SQLite under LMPIPE_HOME)"),
    Setting("LMPIPE_CORPUS", None, "lm_pipeline's default corpus URI (default: the demo corpus under LMPIPE_HOME)",
            stack="s3://lmpipe/corpus/"),
    Setting("LMPIPE_OUTPUT", None, "lm_pipeline's default output prefix (default: LMPIPE_HOME/pipeline)",
            stack="s3://lmpipe/pipeline"),
    Setting("LMPIPE_NIGHTLY_CRON", "0 2 * * *", "lm_pipeline's schedule (a cron expression; `none`: only triggered runs)"),
    Setting("LMPIPE_RETRY_DELAY_S", "120", "seconds before Airflow retries a failed lm_pipeline task (train, evaluate "
            "and promote retry after at most 30 s)"),
    Setting("LMPIPE_SPARK_CONN_ID", "spark_default", "Airflow connection the tokenize task submits to"),
    Setting("LMPIPE_CHECKPOINT_CONN_ID", "lmpipe_checkpoint", "Airflow connection whose password is the checkpoint "
            "signing key the train task hands its trainers (LMPIPE_CHECKPOINT_KEY)"),
    Setting("LMPIPE_SPARK_K8S_SECRET", None, "Kubernetes secret (keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) a "
            "k8s:// Spark driver and its executors read S3 credentials from"),
    Setting("LMPIPE_AWS_CONN_ID", "aws_default", "Airflow aws connection with the S3/MinIO credentials"),
    Setting("LMPIPE_HOSTFILE", None, "DeepSpeed hostfile: lm_pipeline's train runs the launcher on its first host "
            "over ssh, which starts ranks on `nodes` hosts"),
    Setting("LMPIPE_SERVE_URL", "http://127.0.0.1:8000", "base URL of the serving job, or of the load balancer in "
            "front of its replicas (lm_serving_rollout)"),
    Setting("LMPIPE_LB_ADMIN", None, "HAProxy's runtime API in front of the serving replicas (host:port or a socket "
            "path): lm_serving_rollout rolls its `serving` backend one replica at a time (unset: one serving job "
            "at LMPIPE_SERVE_URL)"),
    Setting("LMPIPE_MLFLOW_UI", "http://127.0.0.1:5000", "MLflow UI address printed in task logs (when the tracking URI is not http)"),
    Setting("LMPIPE_API_KEY", None, "API key the serving job requires, and clients send"),
    Setting("LMPIPE_REDIS_URL", None, "Redis for the serving job's response cache, shared by its replicas "
            "(default: an in-process LRU per replica)"),
    Setting("LMPIPE_CHECKPOINT_KEY", None, "secret that signs and verifies checkpoint markers; every trainer of a run "
            "needs the same one (default: a key made once in LMPIPE_HOME/checkpoint.key)"),
    Setting("LMPIPE_SPARK_LOG_LEVEL", "WARN", "Spark log level in lmpipe's Spark jobs"),
    Setting("LMPIPE_NPM_REGISTRY", "https://registry.npmjs.org", "npm registry the install fetches the Data Docs "
            "scripts from (a mirror works; each tarball is checked against its pinned sha512)", "runtime"),
    Setting("LMPIPE_PROGRESS_S", "5", "seconds between progress lines of long Spark stages"),
    # the production topology: make stack and docker/compose.yaml
    Setting("AIRFLOW_PORT", "8080", "Airflow's UI and REST API (api-server)", "stack"),
    Setting("MLFLOW_PORT", "5000", "MLflow's tracking server, registry and UI", "stack"),
    Setting("SERVING_PORT", "8000", "the serving job's OpenAI-compatible API (its load balancer)", "stack"),
    Setting("SERVING_REPLICAS", "2", "serving replicas behind the load balancer (make stack)", "stack"),
    Setting("SERVING_REPLICA_PORT", "8101", "the first serving replica's port; the others take the next ones "
            "(make stack; compose's replicas are reached on its network only)", "stack"),
    Setting("MINIO_PORT", "9000", "the S3 endpoint (MinIO in compose, moto's server in make stack)", "stack"),
    Setting("SPARK_UI_PORT", "8090", "the Spark standalone master's web UI", "stack"),
    Setting("SPARK_MASTER_PORT", "7077", "the Spark standalone master (spark://)", "stack"),
    Setting("POSTGRES_PORT", "5432", "PostgreSQL: Airflow's metadata DB and MLflow's backend store", "stack"),
    Setting("REDIS_PORT", "6379", "Redis: the Celery broker of Airflow's workers (database 0) and the serving "
            "job's response cache (1)", "stack"),
    Setting("SPARK_WORKER_CORES", "2", "cores each Spark worker offers", "stack"),
    Setting("SPARK_WORKER_MEMORY", "4g", "memory each Spark worker offers", "stack"),
    Setting("AIRFLOW_ADMIN_USER", "admin", "the Airflow UI's admin login", "stack"),
    Setting("AWS_DEFAULT_REGION", "us-east-1", "S3 region of the aws connection and MLflow's artifacts", "stack"),
    Setting("MLFLOW_ARTIFACTS_DESTINATION", "s3://mlflow/artifacts", "where the MLflow server keeps artifacts", "stack"),
    Setting("DEMO_CORPUS_MB", "8", "demo corpus written to LMPIPE_CORPUS on first start when it is empty (0: none)", "stack"),
    # set by launchers and libraries
    Setting("RANK", None, "the global rank of a training process (DeepSpeed's launcher)", "runtime"),
    Setting("LOCAL_RANK", "0", "the rank on its node, which picks the GPU (DeepSpeed's launcher)", "runtime"),
    Setting("AIRFLOW_CTX_DAG_RUN_ID", None, "the Airflow run a stage runs for (Airflow); a lineage tag", "runtime"),
    Setting("SPARK_SUBMIT_OPTS", None, "set by spark-submit: tells a submitted job from a local session", "runtime"),
    Setting("SPARK_ENV_LOADED", None, "set by spark-submit: tells a submitted job from a local session", "runtime"),
    Setting("PYSPARK_PYTHON", None, "the executors' Python; a local session uses lmpipe's own interpreter", "runtime"),
    Setting("PYSPARK_DRIVER_PYTHON", None, "the driver's Python; a local session uses lmpipe's own", "runtime"),
    Setting("SPARK_LOCAL_IP", None, "Spark's bind address; a local session stays on 127.0.0.1", "runtime"),
    Setting("GX_ANALYTICS_ENABLED", None, "Great Expectations' usage analytics; lmpipe turns them off", "runtime"),
    Setting("MLFLOW_S3_ENDPOINT_URL", None, "MLflow's S3 endpoint; lmpipe passes storage.endpoint_url on", "runtime"),
    Setting("AWS_ACCESS_KEY_ID", None, "S3 key for a stage process; lm_pipeline's tasks set it from the aws connection", "runtime"),
    Setting("AWS_SECRET_ACCESS_KEY", None, "S3 secret, set like AWS_ACCESS_KEY_ID", "runtime"),
    Setting("AWS_SESSION_TOKEN", None, "S3 session token, set like AWS_ACCESS_KEY_ID", "runtime"),
    Setting("AWS_ENDPOINT_URL", None, "S3 endpoint, set like AWS_ACCESS_KEY_ID; a Spark job passes these on to its executors", "runtime"),
    Setting("TORCH_EXTENSIONS_DIR", None, "torch's folder for JIT-built ops (DeepSpeed's CPU ops); the train "
            "launcher removes build locks there that a killed rank left", "runtime"),
    Setting("PATH", None, "the OS's; the DAG adds pyspark's spark-submit to it when no Spark is installed", "runtime"),
    # make demo
    Setting("DEMO_MB", "8", "size of the demo corpus in MB", "demo"),
    Setting("DEMO_STEPS", None, "training steps of the demo run (default: the recipe's)", "demo"),
]}


def get(name: str) -> str | None:
    """The value of a known setting (its default when unset or empty)."""
    return os.environ.get(name) or SETTINGS[name].default


def explicit(name: str) -> str | None:
    """The value of a known setting only when it is set (its default otherwise counts as unset)."""
    assert name in SETTINGS, name
    return os.environ.get(name) or None


def stack(name: str) -> str:
    """The value of a setting in the production topology: as set, else its ``stack`` value."""
    s = SETTINGS[name]
    return os.environ.get(name) or s.stack or s.default or ""


def home() -> Path:
    """``LMPIPE_HOME``: where lmpipe keeps local state (default ``~/.lmpipe``)."""
    return Path(get("LMPIPE_HOME") or Path.home() / ".lmpipe").expanduser().resolve()
