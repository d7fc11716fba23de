"""``make demo``: the whole product on the bundled demo data, through Airflow.

Builds the demo corpus, starts the serving job, runs ``lm_pipeline`` end to end with
``airflow dags test`` (SQLite metadata DB under ``$LMPIPE_HOME/airflow``), runs the
``lm_serving_rollout`` DAG against the serving job, prints a completion from the new
champion, and says where to look: the Airflow UI (with its admin password), the MLflow UI,
the Data Docs and the report.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

from lmpipe import tracking
from lmpipe.log import log

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def airflow_env(home: Path) -> dict[str, str]:
    """The settings every Airflow command of the demo (and `make airflow-ui`) shares."""
    af = home / "airflow"
    return {
        **os.environ, "AIRFLOW_HOME": str(af), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(af / "passwords.json"),
        "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[*]"}),
        "LMPIPE_HOME": str(home), "LMPIPE_CORPUS": str(home / "demo" / "corpus"),
        "LMPIPE_OUTPUT": str(home / "demo" / "pipeline"), "PYTHONPATH": str(REPO),
    }


def admin_password(home: Path) -> str:
    f = home / "airflow" / "passwords.json"
    if not f.is_file():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps({"admin": secrets.token_urlsafe(12)}))
        f.chmod(0o600)
    return json.loads(f.read_text())["admin"]


def _run(cmd: list[str], env: dict[str, str]) -> None:
    log("$ " + " ".join(cmd))
    rc = subprocess.run(cmd, env=env, cwd=REPO).returncode
    if rc != 0:
        raise SystemExit(f"demo: {' '.join(cmd[:4])} ... failed with exit code {rc}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    import httpx

    t0 = time.monotonic()
    home = tracking.home()
    env = airflow_env(home)
    password = admin_password(home)
    _run([str(BIN / "airflow"), "db", "migrate"], env)

    corpus = Path(env["LMPIPE_CORPUS"])
    part = corpus / f"date={dt.date.today().isoformat()}"
    if not any(corpus.glob("date=*/*")):
        _run([str(BIN / "lmpipe"), "demo-corpus", "--out", str(part), "--max-mb", os.environ.get("DEMO_MB", "8")], env)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = home / "demo" / "serve.log"
    server_log.parent.mkdir(parents=True, exist_ok=True)
    log(f"starting the serving job on {url} (log: {server_log})")
    with open(server_log, "ab") as out:
        server = subprocess.Popen([str(BIN / "lmpipe"), "serve", "--port", str(port), "watch_interval_s=0"],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        conf = {"corpus": str(corpus), "output": env["LMPIPE_OUTPUT"], "recipe": "tiny", "vocab_size": 4096,
                "seq_len": 256, "nproc": 2, "max_steps": int(os.environ.get("DEMO_STEPS", "150")),
                "overrides": ["save_every=50", "log_every=10", "micro_batch_size=8"]}
        _run([str(BIN / "airflow"), "dags", "test", "lm_pipeline", "-c", json.dumps(conf)], env)
        _run([str(BIN / "airflow"), "dags", "test", "lm_serving_rollout"], {**env, "LMPIPE_SERVE_URL": url})
        r = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "lmpipe", "prompt": "def parse_args(", "max_tokens": 32, "temperature": 0})
        r.raise_for_status()
        body = r.json()
        print(f"\ncompletion from {body['system_fingerprint']} via {url}/v1/completions:")
        print(f"  def parse_args({body['choices'][0]['text']}\n")
    finally:
        server.terminate()
        server.wait(timeout=30)

    runs = sorted((Path(env["LMPIPE_OUTPUT"]) / "runs").glob("*/COMPLETED.json"), key=lambda p: p.stat().st_mtime)
    run = runs[-1].parent
    af = env["AIRFLOW_HOME"]
    print(f"""lm_pipeline run:   {run}
  decision:        {json.loads(runs[-1].read_text())['decision']}
  corpus checks:   {run}/checks/corpus/data_docs/index.html
  shard manifest:  {run}/shards/manifest.json
  shard checks:    {run}/shards/_checks/pipeline/data_docs/index.html
  report:          {run}/train/report/index.html
Airflow UI:        make airflow-ui   (airflow standalone on http://127.0.0.1:8080, AIRFLOW_HOME={af})
  login:           admin / {password}
MLflow UI:         {BIN}/mlflow ui --backend-store-uri sqlite:///{home}/mlflow.db   (http://127.0.0.1:5000)
Serve it:          {BIN}/lmpipe serve   (OpenAI API on http://127.0.0.1:8000/v1)
demo took {time.monotonic() - t0:.0f}s""")
    return 0


def airflow_ui() -> int:
    """`make airflow-ui`: Airflow standalone on the demo's metadata DB, login admin + the demo's password."""
    home = tracking.home()
    env = airflow_env(home)
    print(f"Airflow UI on http://127.0.0.1:8080  login: admin / {admin_password(home)}  (Ctrl-C stops it)", flush=True)
    os.execve(str(BIN / "airflow"), [str(BIN / "airflow"), "standalone"], env)


if __name__ == "__main__":
    sys.exit(airflow_ui() if sys.argv[1:] == ["ui"] else main())
