"""Serving replicas as real ``lmpipe serve`` processes, Debian's HAProxy in front of them, and a
bounded load generator; everything on loopback, and stopped by pid."""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from serving_helpers import free_port


@contextlib.contextmanager
def replicas(n: int, model: str, folder: Path, env: dict | None = None, extra: tuple[str, ...] = ()):
    """``n`` ``lmpipe serve`` processes on ``model``; yields {name: (host:port, Popen)} once each
    answers /healthz. The response cache is off: every request decodes."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LMPIPE_HOME": str(folder / "home"), **(env or {})}
    env.pop("LMPIPE_REDIS_URL", None)
    procs = {}
    try:
        for i in range(n):
            port = free_port()
            log = open(folder / f"replica-{i + 1}.log", "wb")
            procs[f"replica-{i + 1}"] = (f"127.0.0.1:{port}", subprocess.Popen(
                [sys.executable, "-m", "lmpipe.cli", "serve", "--model", model, "--host", "127.0.0.1", "--port",
                 str(port), "cache_entries=0", "watch_interval_s=0", *extra],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        for name, (addr, proc) in procs.items():
            wait_http(f"http://{addr}/healthz", proc, folder / f"{name}.log")
        yield procs
    finally:
        for _, proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for _, proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: its process exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def haproxy(servers: dict[str, str], folder: Path, tls_pem: Path | None = None, ready: bool = True):
    """Debian's HAProxy on a free loopback port in front of ``servers`` (name -> host:port);
    yields (its URL, its runtime API) once every server is up (``ready``) or listed."""
    from lmpipe import balancer

    folder.mkdir(parents=True, exist_ok=True)
    port, admin = free_port(), folder / "admin.sock"
    cfg = folder / "haproxy.cfg"
    cfg.write_text(balancer.config(servers, f"127.0.0.1:{port}", str(admin), tls_pem=str(tls_pem) if tls_pem else None))
    log = open(folder / "haproxy.log", "wb")
    proc = subprocess.Popen([shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    rt = balancer.Runtime(str(admin))
    try:
        deadline = time.monotonic() + 60
        if ready:  # HAProxy counts a server up until its checks say otherwise: ask the replicas first
            for addr in servers.values():
                wait_http(f"http://{addr}/readyz", proc, folder / "haproxy.log", timeout=120)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"haproxy exited {proc.returncode}:\n{(folder / 'haproxy.log').read_text()}")
            with contextlib.suppress(balancer.BalancerError):
                if all(s.status == "UP" or not ready for s in rt.servers()):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"haproxy's servers never all came up:\n{(folder / 'haproxy.log').read_text()}")
            time.sleep(0.2)
        yield f"{'https' if tls_pem else 'http'}://127.0.0.1:{port}", rt
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Load:
    """``clients`` threads sending non-streamed completions to ``url`` until stopped, at most
    ``max_s`` seconds and ``max_requests`` requests in all; every answer's status is counted and
    every failure kept (status and body, or the exception)."""

    def __init__(self, url: str, model: str, clients: int = 6, max_s: float = 300, max_requests: int = 20000,
                 headers: dict | None = None) -> None:
        self.url, self.model, self.headers = url, model, headers or {}
        self.clients, self.max_s, self.max_requests = clients, max_s, max_requests
        self.counts: collections.Counter = collections.Counter()
        self.failures: list[str] = []
        self.versions: collections.Counter = collections.Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def __enter__(self) -> Load:
        self.t0 = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def _client(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60, trust_env=False, headers=self.headers) as c:
            n = 0
            while not self._stop.is_set() and time.monotonic() - self.t0 < self.max_s and self.total < self.max_requests:
                n += 1
                body = {"model": self.model, "prompt": f"def f{i}_{n}(", "max_tokens": 12 + (n % 3) * 8,
                        "temperature": 0.8, "seed": i * 100000 + n}
                try:
                    r = c.post("/v1/completions", json=body)
                    outcome = r.status_code
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code} {r.text[:300]}")
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                with self._lock:
                    self.counts[outcome] += 1

    def wait_for(self, requests: int, timeout: float = 60) -> None:
        """Until ``requests`` more answers have come back."""
        target, deadline = self.total + requests, time.monotonic() + timeout
        while self.total < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the load made {self.total} requests, not {target}, in {timeout:.0f}s")
            time.sleep(0.05)


class StateLog:
    """Polls HAProxy's runtime API in a thread and keeps each server's statuses in order of change."""

    def __init__(self, rt, poll: float = 0.05) -> None:
        self.rt, self.poll = rt, poll
        self.seen: list[dict[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StateLog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                now = {s.name: s.status.split()[0] for s in self.rt.servers()}
                if not self.seen or self.seen[-1] != now:
                    self.seen.append(now)
            time.sleep(self.poll)

    def statuses(self, name: str) -> list[str]:
        out = []
        for snap in self.seen:
            if not out or out[-1] != snap[name]:
                out.append(snap[name])
        return out
