"""``make demo``: the whole product on the bundled demo data, through Airflow.

Builds the demo corpus, starts the serving job, runs ``lm_pipeline`` end to end with
``airflow dags test`` (SQLite metadata DB under ``$LMPIPE_HOME/airflow``) on the stages' own
defaults, runs ``lm_serving_rollout`` against the serving job, shows a sampled completion
from the new champion and its held-out perplexity, and prints commands to look further:
each works as printed, from any shell, without activating the venv.

    python -m lmpipe_airflow.demo        # the demo
    python -m lmpipe_airflow.demo ui     # make airflow-ui: Airflow standalone on the demo's DB
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from lmpipe import settings
from lmpipe.log import log

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PROMPT = "def parse_args("


def airflow_env(home: Path) -> dict[str, str]:
    """The settings every Airflow command of the demo (and `make airflow-ui`) shares."""
    af = home / "airflow"
    return {
        **os.environ, "AIRFLOW_HOME": str(af), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(af / "passwords.json"),
        "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[*]"}),
        "LMPIPE_HOME": str(home), "LMPIPE_CORPUS": str(home / "demo" / "corpus"),
        "LMPIPE_OUTPUT": str(home / "demo" / "pipeline"), "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "dags")]),
        # `airflow standalone` starts its components as `airflow ...` by name: the venv's first on PATH
        "PATH": os.pathsep.join([str(BIN), settings.get("PATH") or ""]),
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


def commands(home: Path) -> dict[str, str]:
    """What the demo prints to look further, each a complete shell command."""
    lmpipe = f"LMPIPE_HOME={shlex.quote(str(home))} {shlex.quote(str(BIN / 'lmpipe'))}"
    return {
        "Airflow UI": f"make -C {shlex.quote(str(REPO))} airflow-ui LMPIPE_HOME={shlex.quote(str(home))}",
        "MLflow UI": f"{shlex.quote(str(BIN / 'mlflow'))} ui --backend-store-uri sqlite:///{home}/mlflow.db",
        "models": f"{lmpipe} models",
        "serve": f"{lmpipe} serve",
    }


def main() -> int:
    t0 = time.monotonic()
    home = settings.home()
    env = airflow_env(home)
    password = admin_password(home)
    _run([str(BIN / "airflow"), "db", "migrate"], env)

    corpus = Path(env["LMPIPE_CORPUS"])
    if not any(corpus.glob("date=*/*")):
        part = corpus / f"date={dt.date.today().isoformat()}"
        _run([str(BIN / "lmpipe"), "demo-corpus", "--out", str(part), "--max-mb", settings.get("DEMO_MB")], env)

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = home / "demo" / "serve.log"
    server_log.parent.mkdir(parents=True, exist_ok=True)
    log(f"starting the serving job on {url} (log: {server_log})")
    with open(server_log, "ab") as out:
        server = subprocess.Popen([str(BIN / "lmpipe"), "serve", "--port", str(port), "watch_interval_s=0"],
                                  env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        # the stages' own defaults: the tiny recipe on 2 CPU ranks (DEMO_STEPS shortens it)
        conf = {"max_steps": int(settings.get("DEMO_STEPS"))} if settings.get("DEMO_STEPS") else {}
        _run([str(BIN / "airflow"), "dags", "test", "lm_pipeline", "-c", json.dumps(conf)], env)
        _run([str(BIN / "airflow"), "dags", "test", "lm_serving_rollout"], {**env, "LMPIPE_SERVE_URL": url})
        completion = _sample(url)
    finally:
        server.terminate()
        server.wait(timeout=30)
    _summary(home, env, password, completion, time.monotonic() - t0)
    return 0


def _sample(url: str) -> dict:
    """A sampled completion (temperature 0.8): a tiny model decoded greedily only repeats itself."""
    import httpx

    r = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": "lmpipe", "prompt": PROMPT, "max_tokens": 48, "temperature": 0.8, "top_p": 0.95, "seed": 0})
    r.raise_for_status()
    return r.json()


def _summary(home: Path, env: dict[str, str], password: str, completion: dict, seconds: float) -> None:
    runs = sorted((Path(env["LMPIPE_OUTPUT"]) / "runs").glob("*/COMPLETED.json"), key=lambda p: p.stat().st_mtime)
    run = runs[-1].parent
    done = json.loads(runs[-1].read_text())
    metrics = json.loads((run / "train" / "eval" / "metrics.json").read_text())
    champion = metrics["candidate"] if done["decision"] == "promoted" else metrics.get("champion") or {}
    ppl = f"{champion['perplexity']:.2f}" if champion.get("comparable") else "not comparable"
    cmd = commands(home)
    print(f"""
The champion, {completion['system_fingerprint']}, completes {PROMPT!r} (sampled at temperature 0.8):

{PROMPT}{completion['choices'][0]['text']}

Its held-out perplexity: {ppl} on {metrics['shards']}/validation
(this run's candidate v{metrics['candidate']['version']} was {done['decision']})

lm_pipeline run:   {run}
  corpus checks:   {run}/checks/corpus/data_docs/index.html
  shard manifest:  {run}/shards/manifest.json
  shard checks:    {run}/checks/shards/data_docs/index.html
  report:          {run}/train/report/index.html
  run config:      {run}/run_config.yaml
Airflow UI:        {cmd['Airflow UI']}
                   http://127.0.0.1:8080, login admin / {password}
MLflow UI:         {cmd['MLflow UI']}
                   http://127.0.0.1:5000
Models:            {cmd['models']}
Serve it:          {cmd['serve']}
                   OpenAI API on http://127.0.0.1:8000/v1
demo took {seconds:.0f}s""")


def airflow_ui() -> int:
    """`make airflow-ui`: Airflow standalone on the demo's metadata DB, login admin + the demo's password."""
    home = settings.home()
    env = airflow_env(home)
    print(f"Airflow UI on http://127.0.0.1:8080  login: admin / {admin_password(home)}  (Ctrl-C stops it)", flush=True)
    os.execve(str(BIN / "airflow"), [str(BIN / "airflow"), "standalone"], env)


if __name__ == "__main__":
    sys.exit(airflow_ui() if sys.argv[1:] == ["ui"] else main())
