"""``make demo``, the README's first command, and each command it prints, run as printed in a
fresh shell that has not activated the venv (only /usr/bin:/bin on PATH)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def fresh_shell(command: str, home: Path, **kw) -> subprocess.Popen:
    """``command`` in bash with a clean environment: no venv on PATH, no lmpipe variables."""
    return subprocess.Popen(["env", "-i", f"HOME={home}", "PATH=/usr/bin:/bin", "bash", "-c", command], cwd=home,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@contextmanager
def server(command: str, home: Path, url: str, timeout: float = 300):
    """Start a printed server command, wait until ``url`` answers 200, and stop its process group."""
    proc = fresh_shell(command, home)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{command!r} exited with {proc.returncode}: {proc.stdout.read()[-3000:]}"
            try:
                if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f}s after {command!r}")
        yield
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def champion_perplexity(home: Path) -> float:
    from registry import tracking

    c = tracking.client(tracking.TrackingConfig(uri=f"sqlite:///{home / 'mlflow.db'}"))
    try:
        return float(tracking.alias_version(c, "lmpipe", "champion").tags["lmpipe.eval.perplexity"])
    finally:
        import mlflow

        mlflow.set_tracking_uri(None)


def test_the_demo_ends_with_a_sampled_completion_and_the_champions_perplexity(demo):
    out = demo["out"]
    assert "sampled at temperature 0.8" in out
    m = re.search(r"Its held-out perplexity: ([0-9.]+) on ", out)
    assert m, out[-2000:]
    assert float(m.group(1)) == pytest.approx(champion_perplexity(demo["home"]), abs=0.01)  # the registry's record
    completion = out.split("sampled at temperature 0.8):", 1)[1].split("Its held-out perplexity", 1)[0].strip()
    assert completion.startswith("def parse_args(") and len(completion) > len("def parse_args(")


def test_printed_models_command_finds_the_demos_registry(demo):
    proc = fresh_shell(demo["commands"]["Models:"], demo["shell_home"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert re.search(r"^1\s+\S*champion", out, re.M), out  # version 1 holds the champion alias


def test_printed_serve_command_serves_the_demos_champion(demo):
    with server(demo["commands"]["Serve it:"], demo["shell_home"], "http://127.0.0.1:8000/readyz"):
        models = httpx.get("http://127.0.0.1:8000/v1/models", timeout=10, trust_env=False).json()["data"]
        assert models[0]["id"] == "lmpipe" and models[0]["version"] == "1"


def test_printed_mlflow_ui_command_shows_the_demos_runs(demo):
    with server(demo["commands"]["MLflow UI:"], demo["shell_home"], "http://127.0.0.1:5000/health"):
        r = httpx.get("http://127.0.0.1:5000/api/2.0/mlflow/registered-models/get", params={"name": "lmpipe"},
                      timeout=30, trust_env=False)
        assert r.status_code == 200 and r.json()["registered_model"]["name"] == "lmpipe"


def test_printed_airflow_ui_command_shows_the_demos_run(demo):
    password = re.search(r"login admin / (\S+)", demo["out"]).group(1)
    with server(demo["commands"]["Airflow UI:"], demo["shell_home"], "http://127.0.0.1:8080/api/v2/monitor/health"):
        token = httpx.post("http://127.0.0.1:8080/auth/token", json={"username": "admin", "password": password},
                           timeout=30, trust_env=False).json()["access_token"]
        runs = httpx.get("http://127.0.0.1:8080/api/v2/dags/lm_pipeline/dagRuns", timeout=30, trust_env=False,
                         headers={"Authorization": f"Bearer {token}"}).json()["dag_runs"]
        assert [r["state"] for r in runs] == ["success"], json.dumps(runs)[:2000]
