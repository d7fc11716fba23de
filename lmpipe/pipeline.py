"""What ``dags/lm_pipeline.py``'s tasks do, kept here so the DAG file stays thin.

Each stage runs as ``python -m lmpipe.cli ...`` with an argument list, never a shell
string, so no param is ever interpreted by a shell. Every task writes only under
``<output>/runs/<run_id>/``; clearing and re-running a task is safe, and ``train``
resumes from its newest committed checkpoint. Importing this module is cheap: no
torch, pyspark or deepspeed, and no Airflow import until a task calls for one.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from lmpipe import settings
from lmpipe.storage import is_s3, join, open_store

EXIT_CONFIG, EXIT_REFUSED = 2, 4
COMPLETED = "COMPLETED.json"  # written by the last task: this run's shards may seed the next nightly run


def run_root(output: str, run_id: str) -> str:
    """``<output>/runs/<run_id>`` with the run id made safe as one path segment."""
    return join(output, "runs", safe_run_id(run_id))


def safe_run_id(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]", "_", run_id)


def default_corpus() -> str:
    from lmpipe.tracking import home

    return settings.get("LMPIPE_CORPUS") or str(home() / "demo" / "corpus")


def default_output() -> str:
    from lmpipe.tracking import home

    return settings.get("LMPIPE_OUTPUT") or str(home() / "pipeline")


def needs_s3(*uris: str) -> bool:
    return any(is_s3(u) for u in uris)


def s3_env(conn_id: str, *uris: str) -> dict[str, str]:
    """:func:`aws_env` when any of ``uris`` is on S3, else nothing (no connection lookup)."""
    return aws_env(conn_id) if needs_s3(*uris) else {}


def aws_env(conn_id: str) -> dict[str, str]:
    """S3 credentials from the Airflow aws connection, as environment for a stage process.

    They are registered with Airflow's secrets masker, go to child processes only through
    their environment, and are never returned to XCom. A missing connection means boto3's
    own resolution (instance profile, env vars)."""
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    from airflow.sdk.log import mask_secret

    hook = AwsBaseHook(aws_conn_id=conn_id, client_type="s3")
    conn = hook.conn_config
    if conn.conn_id is None:  # the hook found no such connection
        print(f"lmpipe: no Airflow connection {conn_id!r}: boto3 resolves S3 credentials itself", flush=True)
        return {}
    creds = hook.get_credentials()
    env = {"AWS_ACCESS_KEY_ID": creds.access_key, "AWS_SECRET_ACCESS_KEY": creds.secret_key}
    if creds.token:
        env["AWS_SESSION_TOKEN"] = creds.token
    for value in env.values():
        mask_secret(value)
    if endpoint := conn.get_service_endpoint_url("s3"):
        env["AWS_ENDPOINT_URL"] = endpoint
        env["MLFLOW_S3_ENDPOINT_URL"] = endpoint
    if conn.region_name:
        env["AWS_DEFAULT_REGION"] = conn.region_name
    return env


def stage_command(args: list[str], host: str | None = None) -> list[str]:
    if host:
        return ["ssh", "-tt", "-o", "BatchMode=yes", host, shlex.join(["python", "-m", "lmpipe.cli", *args])]
    return [sys.executable, "-m", "lmpipe.cli", *args]


def stage(args: list[str], env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,),
          host: str | None = None) -> int:
    """Run one lmpipe stage; its output streams into the task log. Bad input (a config error,
    a failed data check) fails the task without retries: running it again cannot help.

    With ``host`` the stage runs there over ssh: the remote shell gets every argument quoted
    (``shlex.join``), so a param still cannot become shell syntax, and ``-tt`` makes a kill of
    the task (a hang-up) reach the remote launcher and its ranks."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    cmd = stage_command(args, host)
    print("lmpipe: running " + " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, env={**os.environ, **(env or {})}).returncode
    if rc in ok:
        return rc
    what = f"lmpipe {args[0]} exited with code {rc}"
    if rc == EXIT_CONFIG or args[0] == "check-data":
        raise AirflowFailException(what + " (bad input: not retried)")
    raise AirflowException(what)


def base_shards(output: str, run_id: str, corpus: str, seq_len: int) -> str | None:
    """The shard set of the newest completed run under ``output`` that tokenized the same corpus at
    the same seq_len: the base of an incremental run. Completion is a file the last task writes, so
    this works the same for scheduled, manual and ``airflow dags test`` runs."""
    store = open_store(join(output, "runs"))
    best = None
    for name in store.children(""):
        if name == safe_run_id(run_id) or not store.exists(f"{name}/{COMPLETED}"):
            continue
        done = json.loads(store.get_bytes(f"{name}/{COMPLETED}"))
        if done.get("corpus", "").rstrip("/") != corpus.rstrip("/") or done.get("seq_len") != seq_len:
            continue
        if best is None or done["completed_at"] > best[1]["completed_at"]:
            best = (name, done)
    if best is None:
        print("lmpipe: no completed earlier run of this corpus: tokenizing all of it", flush=True)
        return None
    return join(output, "runs", best[0], "shards")


def champion_exists() -> bool:
    from lmpipe import tracking

    cfg = tracking.TrackingConfig()
    try:
        return tracking.alias_version(tracking.client(cfg), cfg.model_name, tracking.CHAMPION) is not None
    except Exception as exc:  # no registry yet, or no such model: from scratch
        print(f"lmpipe: no champion to warm-start from ({type(exc).__name__}: {exc})", flush=True)
        return False


def head_node(hostfile: str) -> str:
    """The first host of a DeepSpeed hostfile (``host slots=N`` lines)."""
    for line in Path(hostfile).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            return line.split()[0]
    raise ValueError(f"hostfile {hostfile} lists no host")


def train_args(root: str, params: dict) -> tuple[list[str], str | None]:
    """``lmpipe train`` arguments, and the host to run it on: with ``LMPIPE_HOSTFILE`` set, the
    launcher runs on the hostfile's first node (so precision and devices are the GPU nodes'),
    which starts the ranks on every node; without it, here."""
    args = ["train", "--shards", join(root, "shards"), "--out", join(root, "train"), "--recipe", params["recipe"],
            "--zero-stage", str(params["zero_stage"]), "--nproc", str(params["nproc"]),
            f"launch.num_nodes={params['nodes']}", f"max_steps={params['max_steps']}"]
    hostfile, host = settings.get("LMPIPE_HOSTFILE"), None
    if hostfile:
        args += ["--hostfile", hostfile]
        host = head_node(hostfile)
    elif params["nodes"] > 1:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException("nodes > 1 needs a DeepSpeed hostfile: set LMPIPE_HOSTFILE on the workers")
    if params["warm_start"] and champion_exists():
        from lmpipe import tracking

        args.append(f"init_from=models:/{tracking.TrackingConfig().model_name}@{tracking.CHAMPION}")
    return [*args, *params["overrides"]], host


def read_json(uri: str, name: str) -> dict:
    return json.loads(open_store(uri).get_bytes(name))


def link(uri: str) -> str:
    """A clickable form of a storage URI for the task log."""
    if is_s3(uri):
        return uri
    return Path(open_store(uri).root).as_uri()


def mlflow_ui() -> str:
    if os.environ.get("LMPIPE_MLFLOW_UI"):  # the address a browser reaches, which the workers' may not be
        return os.environ["LMPIPE_MLFLOW_UI"].rstrip("/")
    uri = settings.get("MLFLOW_TRACKING_URI") or ""
    return uri.rstrip("/") if uri.startswith("http") else settings.get("LMPIPE_MLFLOW_UI")


def links(**named: str | None) -> None:
    """The task log's last lines: where to look at what this task produced."""
    print("lmpipe: outputs of this task:", flush=True)
    for name, url in named.items():
        if url:
            print(f"lmpipe:   {name.replace('_', ' ')}: {url}", flush=True)


def train_links(train: str) -> dict[str, str]:
    """The registered version of a finished training run, and where to look at it."""
    version, run = read_json(train, "model_version.json"), read_json(train, "mlflow_run.json")
    ui = mlflow_ui()
    try:
        from mlflow import MlflowClient

        exp = MlflowClient(run["tracking_uri"]).get_run(run["run_id"]).info.experiment_id
        run_url = f"{ui}/#/experiments/{exp}/runs/{run['run_id']}"
    except Exception:  # the links are a convenience; the run itself succeeded
        run_url = f"{ui} (run {run['run_id']})"
    out = {"version": str(version["version"]), "model_url": f"{ui}/#/models/{version['name']}/versions/{version['version']}",
           "mlflow_url": run_url}
    links(mlflow_run=out["mlflow_url"], model_version=out["model_url"], run_folder=link(train))
    return out


def report(train: str, env: dict[str, str]) -> str | None:
    """``lmpipe report`` for a local run folder; its HTML page's address."""
    if is_s3(train):
        print(f"lmpipe: the HTML report is written by `lmpipe report` on a local copy of {train}", flush=True)
        return None
    stage(["report", str(open_store(train).root)], env)
    return link(join(train, "report", "index.html"))


def complete(root: str, params: dict, info: dict) -> None:
    """Mark the run complete: its shard set may now seed the next nightly run."""
    import datetime as dt

    done = {**info, "corpus": params["corpus"], "seq_len": params["seq_len"],
            "completed_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    open_store(root).put_bytes(COMPLETED, json.dumps(done).encode())
