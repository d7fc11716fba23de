"""Airflow on the stack: PostgreSQL metadata DB, CeleryExecutor with Redis, and the components
Airflow's own production compose runs (api-server, scheduler, dag-processor, triggerer, workers).

Every component gets the same ``AIRFLOW__*`` environment, so they agree on the DB, the broker,
the secrets and the URLs with no airflow.cfg to edit. The S3 credentials live only in the
``aws_default`` connection in the metadata DB (encrypted with the Fernet key); no component's
environment has them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx

from lmpipe import settings
from lmpipe.stack.procs import Proc, StackError, State, start, tail, wait
from lmpipe.stack.services import BIN, clean_env, lb_admin, pg_url, port, spark_url, url

REPO = Path(__file__).resolve().parents[2]
WORKERS = 2
# api-server, scheduler and dag-processor first: the workers and the triggerer need the API.
COMPONENTS = {"airflow-api-server": ["api-server"], "airflow-scheduler": ["scheduler", "--skip-serve-logs"],
              "airflow-dag-processor": ["dag-processor"], "airflow-triggerer": ["triggerer", "--skip-serve-logs"]}


def airflow_env(root: Path, sec: dict) -> dict[str, str]:
    """The environment of every Airflow component (and so of every task)."""
    api = url("AIRFLOW_PORT")
    cfg = {
        "core": {"executor": "CeleryExecutor", "dags_folder": str(REPO / "dags"), "load_examples": "False",
                 "dags_are_paused_at_creation": "True", "fernet_key": sec["AIRFLOW_FERNET_KEY"],
                 "auth_manager": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
                 "simple_auth_manager_users": f"{settings.stack('AIRFLOW_ADMIN_USER')}:admin",
                 "simple_auth_manager_passwords_file": str(root / "airflow" / "passwords.json"),
                 "execution_api_server_url": f"{api}/execution/", "parallelism": "8",
                 # the extra-link buttons (Data Docs, manifest, report, MLflow run, model version)
                 "plugins_folder": str(REPO / "dags" / "lmpipe_airflow" / "plugins")},
        "database": {"sql_alchemy_conn": pg_url(sec, "airflow")},
        "celery": {"broker_url": f"redis://127.0.0.1:{port('REDIS_PORT')}/0",
                   "result_backend": "db+" + pg_url(sec, "airflow"), "worker_concurrency": "2"},
        "api": {"host": "127.0.0.1", "port": str(port("AIRFLOW_PORT")), "base_url": api, "workers": "1",
                "secret_key": sec["AIRFLOW_API_SECRET_KEY"], "expose_config": "False"},
        "api_auth": {"jwt_secret": sec["AIRFLOW_JWT_SECRET"]},
        "dag_processor": {"refresh_interval": "10", "min_file_process_interval": "30", "parsing_processes": "1"},
        "scheduler": {"scheduler_heartbeat_sec": "2"},
        "logging": {"base_log_folder": str(root / "airflow" / "logs"), "colored_console_log": "False"},
    }
    env = {f"AIRFLOW__{s.upper()}__{k.upper()}": v for s, kv in cfg.items() for k, v in kv.items()}
    lmpipe = {"LMPIPE_HOME": str(settings.home()), "LMPIPE_CORPUS": settings.stack("LMPIPE_CORPUS"),
              "LMPIPE_OUTPUT": settings.stack("LMPIPE_OUTPUT"), "MLFLOW_TRACKING_URI": url("MLFLOW_PORT"),
              "LMPIPE_MLFLOW_UI": url("MLFLOW_PORT"), "LMPIPE_SERVE_URL": url("SERVING_PORT"),
              "LMPIPE_LB_ADMIN": str(lb_admin(root)),
              "LMPIPE_API_KEY": sec["LMPIPE_API_KEY"], "SPARK_LOCAL_IP": "127.0.0.1",
              # A task whose MLflow server is away fails within a minute, and Airflow's retry takes over.
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
    return clean_env(AIRFLOW_HOME=str(root / "airflow"), **env, **lmpipe)


def connections(sec: dict) -> dict:
    """``aws_default`` (the S3 endpoint and its keys), ``spark_default`` (the standalone master) and
    ``lmpipe_checkpoint`` (the checkpoint signing key)."""
    aws = {"conn_type": "aws", "login": sec["AWS_ACCESS_KEY_ID"], "password": sec["AWS_SECRET_ACCESS_KEY"],
           "extra": {"region_name": settings.stack("AWS_DEFAULT_REGION"), "endpoint_url": url("MINIO_PORT")}}
    spark = {"conn_type": "spark", "host": spark_url().rsplit(":", 1)[0], "port": port("SPARK_MASTER_PORT"),
             "extra": {"deploy-mode": "client"}}
    out = {settings.get("LMPIPE_AWS_CONN_ID"): aws, settings.get("LMPIPE_SPARK_CONN_ID"): spark}
    if key := sec.get("LMPIPE_CHECKPOINT_KEY"):  # signs checkpoint markers; handed to the train task only
        out[settings.get("LMPIPE_CHECKPOINT_CONN_ID")] = {"conn_type": "generic", "password": key}
    return out


def cli(state: State, env: dict, *args: str, name: str) -> None:
    """One ``airflow`` command to completion, its output in ``logs/<name>.log``."""
    import subprocess

    state.logs.mkdir(parents=True, exist_ok=True)
    with open(state.logs / f"{name}.log", "ab") as out:
        rc = subprocess.run([str(BIN / "airflow"), *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, check=False).returncode
    if rc:
        raise StackError(f"airflow {' '.join(args)} failed ({rc}); the end of its log:\n{tail(state, name)}")


def init(state: State, sec: dict, env: dict) -> None:
    """Migrate the metadata DB and write the connections and the admin login (idempotent)."""
    home = state.root / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    pw = home / "passwords.json"
    pw.write_text(json.dumps({settings.stack("AIRFLOW_ADMIN_USER"): sec["AIRFLOW_ADMIN_PASSWORD"]}))
    pw.chmod(0o600)
    cli(state, env, "db", "migrate", name="airflow-db-migrate")
    conns = home / "connections.json"
    fd = os.open(conns, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(connections(sec), f)
    try:
        cli(state, env, "connections", "import", "--overwrite", str(conns), name="airflow-connections")
    finally:
        conns.unlink()


def healthy() -> bool | str:
    health = httpx.get(url("AIRFLOW_PORT") + "/api/v2/monitor/health", timeout=10, trust_env=False).json()
    sick = [k for k in ("metadatabase", "scheduler", "dag_processor", "triggerer")
            if (health.get(k) or {}).get("status") != "healthy"]
    return not sick or f"unhealthy: {', '.join(sick)}"


def worker_ready(state: State, name: str) -> bool | str:
    log = state.logs / f"{name}.log"
    this_start = log.read_text(errors="replace").rsplit("\n---- ", 1)[-1] if log.exists() else ""
    return " ready." in this_start or "celery worker not ready"


def airflow(state: State, sec: dict) -> None:
    env = airflow_env(state.root, sec)
    if not all(state.running(n) for n in COMPONENTS):
        init(state, sec, env)
    for name, args in COMPONENTS.items():
        start(state, Proc(name, [str(BIN / "airflow"), *args], env=env, cwd=state.root / "airflow",
                          port=port("AIRFLOW_PORT") if name == "airflow-api-server" else None))
    wait(state, "airflow-api-server", healthy, timeout=300)
    # The api-server builds its Execution API app on the first request: warm it before any task.
    httpx.get(url("AIRFLOW_PORT") + "/execution/health", timeout=60, trust_env=False)
    for i in range(1, WORKERS + 1):
        name = f"airflow-worker-{i}"
        start(state, Proc(name, [str(BIN / "airflow"), "celery", "worker", "--celery-hostname", f"worker{i}@%h",
                                 "--concurrency", "2", "--skip-serve-logs"], env=env, cwd=state.root / "airflow"))
    for i in range(1, WORKERS + 1):
        wait(state, f"airflow-worker-{i}", lambda n=f"airflow-worker-{i}": worker_ready(state, n), timeout=180)
