"""``make stack``: the production topology on one machine, as local processes.

PostgreSQL, Redis, an S3 endpoint (moto's server), a Spark standalone cluster, MLflow's tracking
server, Airflow with Celery workers, and the serving replicas behind HAProxy; the same services,
settings names and defaults as ``docker/compose.yaml``. Each starts only once the one before it is healthy.
State, secrets and one log per service live under ``$LMPIPE_HOME/stack``::

    lmpipe stack up       # start what is not running yet, wait for health, print URLs and logins
    lmpipe stack status   # what runs, by pid
    lmpipe stack down     # stop exactly what `up` started, by pid: clients, then the stores
"""

from __future__ import annotations

import time
from pathlib import Path

from lmpipe import settings
from lmpipe.log import log
from lmpipe.stack import airflow, services
from lmpipe.stack.procs import State, stop

# Start order; `down` goes the other way. Each entry starts one or more processes.
ORDER = [("postgres", services.postgres), ("redis", services.redis), ("s3", services.s3),
         ("spark", services.spark), ("mlflow", services.mlflow), ("airflow", airflow.airflow),
         ("serving", services.serving)]


def root() -> Path:
    return settings.home() / "stack"


def up() -> dict[str, str]:
    """Start every service that is not running yet; a second call only prints the URLs."""
    state = State(root())
    for name in [n for n in state.data if not state.running(n)]:
        log(f"stack: {name} is no longer running (pid {state.data.pop(name)['pid']}): starting it again")
    services.check_ports(state)
    sec = services.load_secrets(state.root)
    t0 = time.monotonic()
    for name, begin in ORDER:
        t = time.monotonic()
        begin(state, sec)
        log(f"stack: {name} healthy ({time.monotonic() - t:.1f} s)")
    log(f"stack: up in {time.monotonic() - t0:.1f} s; state and logs in {state.root}")
    info = endpoints(sec)
    for key, value in info.items():
        print(f"{key:>20}  {value}")
    return info


def endpoints(sec: dict) -> dict[str, str]:
    """What a user of the stack needs: every URL and login (the secrets file holds the rest)."""
    u = services.url
    return {
        "Airflow UI/API": f"{u('AIRFLOW_PORT')}  (login {settings.stack('AIRFLOW_ADMIN_USER')} / "
                          f"{sec['AIRFLOW_ADMIN_PASSWORD']})",
        "MLflow": u("MLFLOW_PORT"),
        "serving (OpenAI API)": f"{u('SERVING_PORT')}/v1  (Authorization: Bearer {sec['LMPIPE_API_KEY']})",
        "serving replicas": "  ".join(f"{n} {a}" for n, a in services.replicas().items()) +
                            f"  (HAProxy runtime API: {services.lb_admin(root())})",
        "S3 endpoint": f"{u('MINIO_PORT')}  (key {sec['AWS_ACCESS_KEY_ID']} / {sec['AWS_SECRET_ACCESS_KEY']})",
        "Spark master": f"{services.spark_url()}  (UI {u('SPARK_UI_PORT')})",
        "PostgreSQL": f"postgresql://postgres@127.0.0.1:{services.port('POSTGRES_PORT')}",
        "Redis": f"redis://127.0.0.1:{services.port('REDIS_PORT')}/0",
        "corpus / output": f"{settings.stack('LMPIPE_CORPUS')}  {settings.stack('LMPIPE_OUTPUT')}",
        "secrets": str(root() / "secrets.json"),
    }


def down() -> list[str]:
    """Stop every process ``up`` started: the clients first (serving, Airflow, MLflow, Spark), then
    the stores they write to (S3, Redis, PostgreSQL); returns their names."""
    state = State(root())
    stores = [n for n in ("s3", "redis", "postgres") if n in state.data]
    stopped = stop(state, [n for n in state.data if n not in stores]) + stop(state, stores)
    for name in stopped:
        log(f"stack: stopped {name}")
    if not stopped:
        log("stack: nothing was running")
    return stopped


def status() -> dict[str, int | None]:
    state = State(root())
    return {name: (p.pid if (p := state.process(name)) else None) for name in state.data}


def add_arguments(p) -> None:
    p.add_argument("action", nargs="?", choices=["up", "status", "down"], default="status",
                   help="up: start what is not running and wait for health; down: stop it all; status: list it")


def main(action: str) -> int:
    if action == "up":
        up()
    elif action == "down":
        down()
    else:
        for name, pid in status().items():
            print(f"{name:>24}  {'pid ' + str(pid) if pid else 'not running'}")
    return 0
