"""A real Airflow 3 on loopback for tests: api-server, scheduler and dag-processor as subprocesses.

    with airflow_live(tmp_path / "airflow", dags_folder, dag_ids=["my_dag"]) as af:
        af.unpause("my_dag")
        run = af.trigger("my_dag", conf={...})
        assert af.wait_run("my_dag", run["dag_run_id"], timeout=120) == "success"
        af.task_states("my_dag", run["dag_run_id"])    # {"task_id": "success", ...}
        af.api("GET", "/dags")                           # any /api/v2 call, with a bearer token
        page.goto(af.url); ... af.username, af.password  # the UI's login form takes these

On a failure, `af.log_tail()` has the end of each component's log (AIRFLOW_HOME/logs-live/).

Everything the components share goes through one environment (AIRFLOW__* variables), so the
processes agree on the SQLite DB, the secrets and the URLs without an airflow.cfg to edit. Each
component gets its own process group, and leaving the block kills every group, test failed or not.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import psutil

# Every component is started with these arguments; the scheduler serves no task logs over HTTP
# (its log server binds all interfaces, and the api-server reads the same local log folder anyway).
COMPONENTS = {"api-server": [], "scheduler": ["--skip-serve-logs"], "dag-processor": []}
TERMINAL = {"success", "failed"}
AIRFLOW = str(Path(sys.executable).with_name("airflow"))  # the CLI of the venv running the tests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def airflow_env(home: Path, dags_folder: Path, port: int, password_file: Path) -> dict[str, str]:
    """The AIRFLOW__* settings every component shares (see the module docstring)."""
    from cryptography.fernet import Fernet

    url = f"http://127.0.0.1:{port}"
    settings = {
        "core": {
            "dags_folder": str(dags_folder), "load_examples": "False", "executor": "LocalExecutor",
            # LocalExecutor forks `parallelism` workers up front: keep it small on a 2-core machine.
            "parallelism": "4",
            "auth_manager": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "simple_auth_manager_users": "admin:admin", "simple_auth_manager_passwords_file": str(password_file),
            "fernet_key": Fernet.generate_key().decode(),
            # Task processes reach the Execution API here (the default would be localhost:8080).
            "execution_api_server_url": f"{url}/execution/",
        },
        "database": {"sql_alchemy_conn": f"sqlite:///{home / 'airflow.db'}"},
        "api": {"host": "127.0.0.1", "port": str(port), "base_url": url, "workers": "1",
                "secret_key": secrets.token_hex(32), "expose_config": "False"},
        # The api-server signs UI/REST tokens and the scheduler signs task tokens: one shared secret.
        "api_auth": {"jwt_secret": secrets.token_hex(32)},
        # Look for new or changed DAG files every couple of seconds instead of minutes.
        "dag_processor": {"refresh_interval": "2", "min_file_process_interval": "2",
                          "bundle_refresh_check_interval": "1", "parsing_processes": "1",
                          "print_stats_interval": "600"},
        "scheduler": {"scheduler_heartbeat_sec": "1", "job_heartbeat_sec": "1", "scheduler_idle_sleep_time": "0.2"},
        "logging": {"colored_console_log": "False", "base_log_folder": str(home / "logs")},
    }
    env = {f"AIRFLOW__{s.upper()}__{k.upper()}": v for s, kv in settings.items() for k, v in kv.items()}
    return env | {"AIRFLOW_HOME": str(home), "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


class LiveAirflow:
    """Handles on a running Airflow: URL, login, REST calls and its component logs."""

    def __init__(self, home: Path, url: str, env: dict[str, str], username: str, password: str) -> None:
        self.home, self.url, self.env = home, url, env
        self.username, self.password = username, password
        self.procs: dict[str, subprocess.Popen] = {}
        self._token: str | None = None
        self._client = httpx.Client(base_url=f"{url}/api/v2", timeout=30, trust_env=False)

    @property
    def log_dir(self) -> Path:
        return self.home / "logs-live"

    def token(self) -> str:
        """A JWT for the REST API, fetched once with the same user and password as the login form."""
        if self._token is None:
            r = httpx.post(f"{self.url}/auth/token", json={"username": self.username, "password": self.password},
                           timeout=30, trust_env=False)
            r.raise_for_status()
            self._token = r.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """A call to /api/v2{path} with the bearer token; the caller checks the status."""
        headers = {"Authorization": f"Bearer {self.token()}", **kw.pop("headers", {})}
        return self._client.request(method, path, headers=headers, **kw)

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """`airflow ARGS` against this instance (same environment), output captured as text."""
        return subprocess.run([AIRFLOW, *args], env=self.env, cwd=self.home, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def login(self, page) -> None:
        """Sign a Playwright page in through the UI's login form."""
        page.goto(self.url + "/")
        page.get_by_label("Username").fill(self.username)
        page.get_by_label("Password").fill(self.password)
        page.get_by_role("button", name="Sign in").click()

    def unpause(self, dag_id: str) -> None:
        self.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False}).raise_for_status()

    def trigger(self, dag_id: str, conf: dict | None = None, **body: Any) -> dict:
        """POST a manual run (logical_date null, as the UI does); returns the DAG run JSON."""
        r = self.api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}, **body})
        if r.status_code >= 400:
            raise AssertionError(f"trigger {dag_id} -> {r.status_code}: {r.text}")
        return r.json()

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 180) -> str:
        """Poll until the run reaches success/failed; returns that state (raises with logs on timeout)."""
        deadline, state = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            r = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
            r.raise_for_status()
            if (state := r.json()["state"]) in TERMINAL:
                return state
            self._check_alive()
            time.sleep(1)
        raise TimeoutError(f"{dag_id}/{run_id} still {state} after {timeout:.0f}s; tasks "
                           f"{self.task_states(dag_id, run_id)}\n{self.log_tail()}")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """task_id -> state (mapped instances as task_id[i])."""
        r = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
        r.raise_for_status()
        return {(ti["task_id"] if ti["map_index"] < 0 else f"{ti['task_id']}[{ti['map_index']}]"): ti["state"]
                for ti in r.json()["task_instances"]}

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of every component's log, for assertion messages."""
        out = []
        for log in sorted(self.log_dir.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"----- {log.name} (last {len(tail)} lines) -----\n" + "\n".join(tail))
        return "\n".join(out)

    def _check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise RuntimeError(f"airflow components exited: {dead}\n{self.log_tail()}")

    def _wait_ready(self, dag_ids: Iterable[str], timeout: float) -> None:
        """Until the health endpoint says all is healthy and the DAGs are parsed (or fail to import)."""
        deadline, want, why = time.monotonic() + timeout, set(dag_ids), "no answer yet"
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                health = self._client.get("/monitor/health").json()
                sick = [k for k in ("metadatabase", "scheduler", "dag_processor")
                        if (health.get(k) or {}).get("status") != "healthy"]
                if sick:
                    why = f"unhealthy: {sick}"
                else:
                    errors = self.api("GET", "/importErrors").json()["import_errors"]
                    if errors:
                        raise RuntimeError("DAG import errors:\n" + "\n".join(e["stack_trace"] for e in errors))
                    have = {d["dag_id"] for d in self.api("GET", "/dags", params={"limit": 100}).json()["dags"]}
                    if want <= have and (want or have):
                        # The api-server builds its Execution API app on the first request (3-6 s
                        # here), longer than a task's first call waits: warm it before any task.
                        self._client.get(f"{self.url}/execution/health", timeout=60).raise_for_status()
                        return
                    why = f"DAGs parsed so far: {sorted(have)}"
            except httpx.TransportError as e:
                why = repr(e)
            time.sleep(0.5)
        raise TimeoutError(f"airflow not ready after {timeout:.0f}s ({why})\n{self.log_tail()}")

    def stop(self, grace: float = 15) -> None:
        """SIGTERM every component's process group, then SIGKILL whatever is left after `grace` s."""
        self._client.close()
        # Task runners may sit in process groups of their own: note the whole tree while it is intact.
        tree = [c for p in self.procs.values() if p.poll() is None for c in _children(p.pid)]
        for p in self.procs.values():
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # The group may still hold task or worker children even when the leader has exited.
            _signal_group(p, signal.SIGKILL)
            p.wait()
        for child in tree:
            with suppress(psutil.Error):
                child.kill()


def _children(pid: int) -> list[psutil.Process]:
    with suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the test process dies without cleaning up (Linux)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(p.pid, sig)  # start_new_session=True made pid the group id


@contextmanager
def airflow_live(home: Path, dags_folder: Path, env: dict[str, str] | None = None,
                 dag_ids: Iterable[str] = (), timeout: float = 120) -> Iterator[LiveAirflow]:
    """Migrate a fresh SQLite DB under `home`, start the components, wait until `dag_ids` are parsed.

    `env` is added to (and may override) the generated AIRFLOW__* settings for every component.
    With no `dag_ids`, waits for at least one DAG. DAGs start paused: use `af.unpause()`.
    """
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    port, username, password = _free_port(), "admin", secrets.token_urlsafe(12)
    # SimpleAuthManager only generates passwords for users missing from this file.
    password_file = home / "simple_auth_manager_passwords.json"
    password_file.write_text(json.dumps({username: password}))
    # Inherit the test's environment (credentials, LMPIPE_HOME) but no other Airflow's settings.
    inherited = {k: v for k, v in os.environ.items()
                 if not k.startswith("AIRFLOW__") and k not in ("AIRFLOW_HOME", "AIRFLOW_CONFIG")}
    full_env = inherited | airflow_env(home, Path(dags_folder).resolve(), port, password_file) | (env or {})
    af = LiveAirflow(home, f"http://127.0.0.1:{port}", full_env, username, password)
    af.log_dir.mkdir(exist_ok=True)

    t0 = time.monotonic()
    migrate = af.cli("db", "migrate")
    (af.log_dir / "db-migrate.log").write_text(migrate.stdout + migrate.stderr)
    if migrate.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed:\n{migrate.stdout[-3000:]}{migrate.stderr[-3000:]}")
    t_migrate = time.monotonic() - t0
    try:
        for name, args in COMPONENTS.items():
            with open(af.log_dir / f"{name}.log", "wb") as log:
                af.procs[name] = subprocess.Popen(
                    [AIRFLOW, name, *args], env=full_env, cwd=home, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True,
                    # Thread-safe enough: the child only calls prctl() between fork and exec.
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None)  # noqa: PLW1509
        af._wait_ready(dag_ids, timeout)
        t_start = time.monotonic() - t0 - t_migrate
        print(f"airflow_live: {af.url} up (db migrate {t_migrate:.1f}s, start {t_start:.1f}s)", file=sys.stderr)
        yield af
    finally:
        af.stop()
