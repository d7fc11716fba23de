"""The services of the production topology, in start order, each with its health check.

Ports, logins and locations are the ``stack`` settings of :mod:`lmpipe.settings`, the same
names and defaults ``docker/compose.yaml`` uses. Secrets are generated once into
``secrets.json`` (mode 0600) under the stack folder, by the names of ``docker/.env.example``.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from lmpipe import settings
from lmpipe.log import log
from lmpipe.stack.procs import Proc, StackError, State, start, wait

BIN = Path(sys.executable).parent  # the venv's programs: airflow, mlflow, moto_server, spark-class
SECRETS = ("POSTGRES_PASSWORD", "AIRFLOW_DB_PASSWORD", "MLFLOW_DB_PASSWORD", "AIRFLOW_JWT_SECRET",
           "AIRFLOW_API_SECRET_KEY", "AIRFLOW_ADMIN_PASSWORD", "LMPIPE_API_KEY", "AWS_SECRET_ACCESS_KEY",
           "LMPIPE_CHECKPOINT_KEY")


# Each process that listens, with the settings that hold its ports (the names compose publishes).
PORTS = {"postgres": ("POSTGRES_PORT",), "redis": ("REDIS_PORT",), "s3": ("MINIO_PORT",),
         "spark-master": ("SPARK_MASTER_PORT", "SPARK_UI_PORT"), "mlflow": ("MLFLOW_PORT",),
         "airflow-api-server": ("AIRFLOW_PORT",), "serving-lb": ("SERVING_PORT",),
         "serving-replica-1": ("SERVING_REPLICA_PORT",)}


def check_ports(state: State) -> None:
    """Before anything starts: every port of a service not running yet is free, else an error naming it."""
    from lmpipe.stack.procs import port_free

    wanted = [(name, s, port(s)) for name, names in PORTS.items() if not state.running(name) for s in names]
    wanted += [(f"serving-replica-{i + 1}", "SERVING_REPLICA_PORT", port("SERVING_REPLICA_PORT") + i)
               for i in range(1, len(replicas())) if not state.running(f"serving-replica-{i + 1}")]
    taken = [f"{name} needs 127.0.0.1:{p} ({s})" for name, s, p in wanted if not port_free(p)]
    if taken:
        raise StackError("ports already in use, so nothing was started: " + "; ".join(taken) +
                         ". Stop what holds them or set those settings to free ports.")


def port(name: str) -> int:
    return int(settings.stack(name))


def url(name: str) -> str:
    return f"http://127.0.0.1:{port(name)}"


def load_secrets(root: Path) -> dict[str, str]:
    """The stack's secrets, made on first start (letters and digits: some go into URLs)."""
    path = root / "secrets.json"
    if path.exists():
        return json.loads(path.read_text())
    from cryptography.fernet import Fernet

    made = {k: secrets.token_hex(16) for k in SECRETS}
    made |= {"AWS_ACCESS_KEY_ID": "key" + secrets.token_hex(8), "AIRFLOW_FERNET_KEY": Fernet.generate_key().decode()}
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(made, f, indent=1)
    return made


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without credentials or other Airflow/MLflow settings, plus ``extra``:
    a service gets exactly the settings the stack gives it."""
    drop = ("AWS_", "AIRFLOW_", "AIRFLOW__", "MLFLOW_", "SPARK_", "PYSPARK_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return env | {"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "NO_PROXY": "127.0.0.1,localhost"} | extra


def http_ok(address: str) -> bool | str:
    r = httpx.get(address, timeout=5, trust_env=False)
    return r.status_code < 400 or f"{address} answered {r.status_code}"


# ---------------------------------------------------------------- PostgreSQL


def pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise StackError("postgres: Debian's postgresql package is not installed (apt-get install -y postgresql)")
    return Path(found[-1]).parent


def pg_connect(sec: dict, dbname: str = "postgres"):
    import psycopg2

    return psycopg2.connect(host="127.0.0.1", port=port("POSTGRES_PORT"), user="postgres", dbname=dbname,
                            password=sec["POSTGRES_PASSWORD"], connect_timeout=3)


def pg_init(data: Path, user: str | None, sec: dict) -> None:
    """``initdb`` a fresh cluster: password logins over TCP only."""
    data.mkdir(parents=True, exist_ok=True)
    data.chmod(0o700)
    if user:  # root: PostgreSQL runs as its own user, who must reach and own the folder
        shutil.chown(data, user, user)
        if subprocess.run(["test", "-w", str(data)], user=user, check=False).returncode:
            raise StackError(f"postgres: the {user!r} user cannot reach {data}; make its parent folders "
                             f"traversable (chmod o+x) or set LMPIPE_HOME elsewhere")
    pwfile = data.parent / "postgres.pw"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(sec["POSTGRES_PASSWORD"] + "\n")
    if user:
        shutil.chown(pwfile, user, user)
    try:
        r = subprocess.run([str(pg_bin() / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
                            "--auth-local=peer", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"],
                           user=user, group=user, capture_output=True, text=True, check=False)
    finally:
        pwfile.unlink()
    if r.returncode:
        raise StackError(f"postgres: initdb failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")


def postgres(state: State, sec: dict) -> None:
    data = state.root / "postgres"
    user = "postgres" if os.geteuid() == 0 else None
    if not (data / "PG_VERSION").exists():
        pg_init(data, user, sec)
    start(state, Proc("postgres", [str(pg_bin() / "postgres"), "-D", str(data), "-p", str(port("POSTGRES_PORT")),
                                   "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="],
                      env=clean_env(), user=user, stop_signal=signal.SIGINT, port=port("POSTGRES_PORT")))
    wait(state, "postgres", lambda: pg_connect(sec).close() is None)
    conn = pg_connect(sec)
    conn.autocommit = True
    with conn.cursor() as cur:
        for db in ("airflow", "mlflow"):  # one role and one database each, as docker/postgres does
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (db,))
            if not cur.fetchone():
                cur.execute(f"CREATE ROLE {db} LOGIN PASSWORD %s", (sec[f"{db.upper()}_DB_PASSWORD"],))
                cur.execute(f"CREATE DATABASE {db} OWNER {db}")
    conn.close()


def pg_url(sec: dict, db: str, driver: str = "postgresql+psycopg2") -> str:
    return f"{driver}://{db}:{sec[f'{db.upper()}_DB_PASSWORD']}@127.0.0.1:{port('POSTGRES_PORT')}/{db}"


# ---------------------------------------------------------------- Redis, S3, Spark


def redis(state: State, sec: dict) -> None:
    import redis as redis_client

    folder = state.root / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    start(state, Proc("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(port("REDIS_PORT")),
                                "--save", "", "--appendonly", "no", "--dir", str(folder)],
                      env=clean_env(), port=port("REDIS_PORT")))
    wait(state, "redis", lambda: redis_client.Redis(port=port("REDIS_PORT"), socket_timeout=3).ping())


def s3_client(sec: dict):
    import boto3

    return boto3.client("s3", endpoint_url=url("MINIO_PORT"), aws_access_key_id=sec["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=sec["AWS_SECRET_ACCESS_KEY"],
                        region_name=settings.stack("AWS_DEFAULT_REGION"))


def s3(state: State, sec: dict) -> None:
    """moto's S3 server on loopback (MinIO's place in compose), its buckets and the demo corpus."""
    start(state, Proc("s3", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port("MINIO_PORT"))],
                      env=clean_env(), port=port("MINIO_PORT")))
    wait(state, "s3", lambda: http_ok(url("MINIO_PORT") + "/moto-api/"))
    client = s3_client(sec)
    have = {b["Name"] for b in client.list_buckets()["Buckets"]}
    for uri in (settings.stack("LMPIPE_CORPUS"), settings.stack("LMPIPE_OUTPUT"),
                settings.stack("MLFLOW_ARTIFACTS_DESTINATION")):
        if uri.startswith("s3://") and (bucket := uri[5:].split("/")[0]) not in have:
            client.create_bucket(Bucket=bucket)
            have.add(bucket)
    corpus, mb = settings.stack("LMPIPE_CORPUS"), int(settings.stack("DEMO_CORPUS_MB"))
    bucket, _, prefix = corpus[5:].partition("/")
    if mb > 0 and corpus.startswith("s3://") and not client.list_objects_v2(Bucket=bucket, Prefix=prefix,
                                                                             MaxKeys=1).get("KeyCount"):
        log(f"writing a {mb} MB demo corpus to {corpus}")
        subprocess.run([sys.executable, "-m", "lmpipe.cli", "demo-corpus", "--out", corpus, "--max-mb", str(mb)],
                       env=clean_env(**aws(state, sec)), check=True, stdout=subprocess.DEVNULL)


def aws(state: State, sec: dict) -> dict[str, str]:
    """S3 access for the services that keep their own (MLflow's artifact proxy, the demo corpus): an
    AWS config and credentials file in a HOME of their own, so no process has keys in its environment."""
    home = state.root / "aws-home"
    (home / ".aws").mkdir(parents=True, exist_ok=True)
    profile = f"[default]\nregion = {settings.stack('AWS_DEFAULT_REGION')}\nendpoint_url = {url('MINIO_PORT')}\n"
    creds = (f"[default]\naws_access_key_id = {sec['AWS_ACCESS_KEY_ID']}\n"
             f"aws_secret_access_key = {sec['AWS_SECRET_ACCESS_KEY']}\n")
    for name, text in (("config", profile), ("credentials", creds)):
        fd = os.open(home / ".aws" / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return {"HOME": str(home), "MLFLOW_S3_ENDPOINT_URL": url("MINIO_PORT")}


def spark_url() -> str:
    return f"spark://127.0.0.1:{port('SPARK_MASTER_PORT')}"


def spark(state: State, sec: dict, workers: int = 2) -> None:
    """A standalone master and ``workers`` workers, from pyspark's own ``spark-class``."""
    folder = state.root / "spark"
    env = clean_env(SPARK_LOCAL_IP="127.0.0.1", SPARK_LOG_DIR=str(folder / "logs"), PYSPARK_PYTHON=sys.executable)
    cls = str(BIN / "spark-class")
    start(state, Proc("spark-master", [cls, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                       "--port", str(port("SPARK_MASTER_PORT")), "--webui-port",
                                       str(port("SPARK_UI_PORT"))], env=env, port=port("SPARK_MASTER_PORT")))
    wait(state, "spark-master", lambda: http_ok(url("SPARK_UI_PORT") + "/json/"))
    for i in range(1, workers + 1):
        work = folder / f"worker-{i}"
        work.mkdir(parents=True, exist_ok=True)
        start(state, Proc(f"spark-worker-{i}", [
            cls, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1", "--cores",
            settings.stack("SPARK_WORKER_CORES"), "--memory", settings.stack("SPARK_WORKER_MEMORY"),
            "--webui-port", "0", "--work-dir", str(work), spark_url()], env=env))

    def all_alive() -> bool | str:
        alive = httpx.get(url("SPARK_UI_PORT") + "/json/", timeout=5, trust_env=False).json().get("aliveworkers", 0)
        return alive >= workers or f"{alive} of {workers} workers registered"
    wait(state, "spark-master", all_alive)


# ---------------------------------------------------------------- MLflow, serving


def mlflow(state: State, sec: dict) -> None:
    """MLflow's tracking server on PostgreSQL, proxying artifacts to the S3 bucket."""
    start(state, Proc("mlflow", [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port("MLFLOW_PORT")),
        "--backend-store-uri", pg_url(sec, "mlflow"), "--serve-artifacts", "--workers", "1",
        "--artifacts-destination", settings.stack("MLFLOW_ARTIFACTS_DESTINATION")],
        env=clean_env(**aws(state, sec)), port=port("MLFLOW_PORT")))
    wait(state, "mlflow", lambda: http_ok(url("MLFLOW_PORT") + "/health"), timeout=300)


def replicas() -> dict[str, str]:
    """The serving replicas, HAProxy server name -> host:port: ``SERVING_REPLICAS`` of them on
    consecutive ports from ``SERVING_REPLICA_PORT``."""
    first, n = port("SERVING_REPLICA_PORT"), settings.stack("SERVING_REPLICAS")
    if not n.isdigit() or int(n) < 1:
        raise StackError(f"SERVING_REPLICAS={n!r}: the number of serving replicas must be a whole number, 1 or more")
    return {f"replica-{i + 1}": f"127.0.0.1:{first + i}" for i in range(int(n))}


def lb_admin(root: Path) -> Path:
    """HAProxy's runtime API: a UNIX socket only the stack's user can open."""
    return root / "haproxy" / "admin.sock"


def serving(state: State, sec: dict) -> None:
    """The serving replicas on the registry's champion alias, and Debian's HAProxy in front of them
    at ``SERVING_PORT``. No replica moves on its own (``watch_interval_s=0``): ``lm_serving_rollout``
    rolls them one at a time through HAProxy's runtime API. Their response cache is the stack's
    Redis (database 1; Celery's broker is database 0)."""
    from lmpipe import balancer

    program = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(program).exists():
        raise StackError("serving: Debian's haproxy package is not installed (apt-get install -y haproxy)")
    admin = lb_admin(state.root)
    if len(str(admin).encode()) > 100:
        raise StackError(f"serving: {admin} is too long for a UNIX socket; set LMPIPE_HOME to a shorter path")
    env = clean_env(MLFLOW_TRACKING_URI=url("MLFLOW_PORT"), LMPIPE_API_KEY=sec["LMPIPE_API_KEY"],
                    LMPIPE_REDIS_URL=f"redis://127.0.0.1:{port('REDIS_PORT')}/1", LMPIPE_HOME=str(settings.home()))
    for name, addr in replicas().items():
        start(state, Proc(f"serving-{name}", [
            sys.executable, "-m", "lmpipe.cli", "serve", "--model", "models:/lmpipe@champion", "--host", "127.0.0.1",
            "--port", addr.rsplit(":", 1)[1], "watch_interval_s=0"], env=env, port=int(addr.rsplit(":", 1)[1])))
    admin.parent.mkdir(parents=True, exist_ok=True)
    cfg = admin.parent / "haproxy.cfg"
    cfg.write_text(balancer.config(replicas(), f"127.0.0.1:{port('SERVING_PORT')}", str(admin)))
    start(state, Proc("serving-lb", [program, "-db", "-f", str(cfg)], env=clean_env(), port=port("SERVING_PORT")))
    for name, addr in replicas().items():  # /healthz: before the first promotion there is no champion to be ready on
        wait(state, f"serving-{name}", lambda a=addr: http_ok(f"http://{a}/healthz"), timeout=180)
    wait(state, "serving-lb", lambda: len(balancer.Runtime(str(admin)).servers()) == len(replicas()))
