"""The production topology for tests: ``lmpipe stack up`` on free loopback ports in a fresh home.

    with stack_live() as st:
        st.airflow.trigger("lm_pipeline", conf={...})     # the REST API (tests/airflow_live.py)
        st.s3.put_object(...)                              # boto3 on the stack's S3, its own keys
        st.pids()                                          # every process the stack runs

The test talks to S3 with explicit keys from the stack's secrets file. The stack is started
from the test's environment, fake ``AWS_*`` keys included: none of its services may inherit them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

from airflow_live import LiveAirflow
from lmpipe.stack import services

PORTS = sorted({s for names in services.PORTS.values() for s in names})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StackAirflow(LiveAirflow):
    """LiveAirflow's REST helpers on the stack's Airflow; its log tail is the stack's logs."""

    def __init__(self, stack: "LiveStack") -> None:
        super().__init__(stack.root / "airflow", stack.url("AIRFLOW_PORT"), stack.env, "admin",
                         stack.secrets["AIRFLOW_ADMIN_PASSWORD"])
        self.stack = stack

    @property
    def log_dir(self) -> Path:
        return self.stack.root / "logs"

    def task_log(self, dag_id: str, run_id: str, task_id: str, attempt: int | None = None) -> str:
        """A task's log as Airflow's workers wrote it (the newest attempt unless one is given)."""
        folder = self.stack.root / "airflow" / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        logs = sorted(folder.glob("attempt=*.log"), key=lambda p: int(p.stem.split("=")[1]))
        if attempt is not None:
            logs = [p for p in logs if p.stem == f"attempt={attempt}"]
        return logs[-1].read_text(errors="replace") if logs else ""


class LiveStack:
    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home, self.env, self.root = home, env, home / "stack"
        self.secrets = json.loads((self.root / "secrets.json").read_text())
        self.airflow = StackAirflow(self)

    def url(self, setting: str) -> str:
        return f"http://127.0.0.1:{self.env[setting]}"

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lmpipe.cli", "stack", *args], env=self.env, text=True,
                              capture_output=True, timeout=timeout, check=False)

    def state(self) -> dict:
        return json.loads((self.root / "state.json").read_text())

    def pids(self) -> dict[str, int]:
        return {name: rec["pid"] for name, rec in self.state().items()}

    @property
    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url("MINIO_PORT"), region_name="us-east-1",
                            aws_access_key_id=self.secrets["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.secrets["AWS_SECRET_ACCESS_KEY"])

    def serving(self) -> httpx.Client:
        return httpx.Client(base_url=self.url("SERVING_PORT"), timeout=60, trust_env=False,
                            headers={"Authorization": f"Bearer {self.secrets['LMPIPE_API_KEY']}"})

    def wait_rollout(self, after: str, timeout: float = 300) -> dict:
        """The first lm_serving_rollout run the scheduler started after ``after`` (ISO time), once ended."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = self.airflow.api("GET", "/dags/lm_serving_rollout/dagRuns", params={"limit": 50}).json()["dag_runs"]
            runs = [r for r in runs if (r.get("queued_at") or "") > after]
            if runs and runs[0]["state"] in ("success", "failed"):
                return runs[0]
            time.sleep(2)
        raise TimeoutError(f"no lm_serving_rollout run ended within {timeout:.0f}s\n{self.airflow.log_tail()}")


def process_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)


def family(pids) -> list[psutil.Process]:
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            out += [p, *p.children(recursive=True)]
        except psutil.Error:
            pass
    return out


@contextmanager
def stack_live(**settings: str) -> Iterator[LiveStack]:
    """Start the stack in a fresh home on free ports (``settings`` override), stop it afterwards."""
    home = Path(tempfile.mkdtemp(prefix="lmpipe-stack-"))
    home.chmod(0o755)  # as root, PostgreSQL runs as the postgres user, who must reach its data folder
    # The test's own AWS_* keys (conftest) stay in: the stack must keep them from every service.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_"))}
    env |= {s: str(free_port()) for s in PORTS}
    env |= {"LMPIPE_HOME": str(home), "LMPIPE_NIGHTLY_CRON": "none", "LMPIPE_RETRY_DELAY_S": "10",
            "DEMO_CORPUS_MB": "0",
            "SPARK_WORKER_CORES": "1", "SPARK_WORKER_MEMORY": "1g", **settings}
    up = subprocess.run([sys.executable, "-m", "lmpipe.cli", "stack", "up"], env=env, text=True,
                        capture_output=True, timeout=600, check=False)
    try:
        if up.returncode:
            raise RuntimeError(f"lmpipe stack up failed ({up.returncode}):\n{up.stdout}\n{up.stderr[-5000:]}")
        st = LiveStack(home, env)
        st.up_output = up.stdout + up.stderr
        yield st
    finally:
        down = subprocess.run([sys.executable, "-m", "lmpipe.cli", "stack", "down"], env=env, text=True,
                              capture_output=True, timeout=300, check=False)
        print(down.stderr[-2000:], file=sys.stderr)
        shutil.rmtree(home, ignore_errors=True)
