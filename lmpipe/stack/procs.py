"""The stack's processes: start one per service in a session of its own, remember it by pid,
wait for its health, and stop exactly what was started.

``state.json`` under the stack folder maps each service to its pid and the process's start
time, so a pid the OS has since given to another program is never signalled.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from lmpipe.errors import LmpipeError


class StackError(LmpipeError):
    """The stack cannot start: a port is taken, a program is missing, a service never got healthy."""


@dataclass
class Proc:
    """One process the stack started and will stop."""

    name: str
    cmd: list[str]
    env: dict[str, str] = field(default_factory=dict)  # the whole environment (services.clean_env)
    cwd: Path | None = None
    user: str | None = None  # run as this user (PostgreSQL refuses to run as root)
    stop_signal: int = signal.SIGTERM
    port: int | None = None  # checked free before the start


class State:
    """``state.json``: name -> {pid, started, log} of every process the stack runs."""

    def __init__(self, root: Path) -> None:
        self.root, self.path = root, root / "state.json"
        self.logs = root / "logs"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)

    def process(self, name: str) -> psutil.Process | None:
        """The live process recorded for ``name``: same pid and the same start time, else None."""
        rec = self.data.get(name)
        if not rec:
            return None
        with suppress(psutil.Error):
            p = psutil.Process(rec["pid"])
            if abs(p.create_time() - rec["started"]) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                return p
        return None

    def running(self, name: str) -> bool:
        return self.process(name) is not None


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def start(state: State, proc: Proc) -> psutil.Process:
    """Start ``proc`` (unless it runs already) with its output in ``logs/<name>.log``."""
    if (p := state.process(proc.name)) is not None:
        return p
    if proc.port is not None and not port_free(proc.port):
        raise StackError(f"{proc.name}: port {proc.port} on 127.0.0.1 is already in use "
                         f"(stop what holds it, or set the {proc.name} port setting; see docs/deploy/local-stack.md)")
    state.logs.mkdir(parents=True, exist_ok=True)
    log_path = state.logs / f"{proc.name}.log"
    with open(log_path, "ab") as out:
        out.write(f"\n---- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(proc.cmd)}\n".encode())
        out.flush()
        try:
            popen = subprocess.Popen(proc.cmd, env=proc.env or dict(os.environ), cwd=proc.cwd, stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                     user=proc.user, group=proc.user, extra_groups=[] if proc.user else None)
        except FileNotFoundError:
            raise StackError(f"{proc.name}: program not found: {proc.cmd[0]}") from None
    p = psutil.Process(popen.pid)
    state.data[proc.name] = {"pid": popen.pid, "started": p.create_time(), "log": str(log_path),
                             "signal": int(proc.stop_signal)}
    state.save()
    return p


def wait(state: State, name: str, healthy: Callable[[], bool | str], timeout: float = 180) -> None:
    """Until ``healthy()`` is true; fails early, with the log's tail, when any started process exits."""
    deadline, why = time.monotonic() + timeout, "no answer yet"
    while time.monotonic() < deadline:
        for other in state.data:
            if not state.running(other):
                raise StackError(f"{other} exited while {name} was starting; the end of its log:\n"
                                 f"{tail(state, other)}")
        try:
            ok = healthy()
            if ok is True:
                return
            why = ok or "not healthy yet"
        except Exception as exc:  # a refused connection, a 503: not up yet
            why = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise StackError(f"{name} not healthy after {timeout:.0f} s ({why}); the end of its log:\n{tail(state, name)}")


def tail(state: State, name: str, lines: int = 30) -> str:
    path = state.logs / f"{name}.log"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def stop(state: State, names: list[str], grace: float = 30) -> list[str]:
    """Stop the recorded processes of ``names`` and their sessions' groups, all at once: each its
    own signal, then SIGKILL after ``grace`` s. Only recorded pids (checked by start time) are
    signalled; returns the names that were running."""
    if not names:
        return []
    procs, trees, recs = {}, [], {}
    for name in names:
        p, rec = state.process(name), state.data.pop(name, None)
        if p is not None and rec is not None:
            procs[name], recs[name] = p, rec
            with suppress(psutil.Error):
                trees += p.children(recursive=True)
    state.save()
    for name, p in procs.items():
        with suppress(ProcessLookupError):
            os.killpg(p.pid, recs[name].get("signal", signal.SIGTERM))
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace)
    for q in [*alive, *trees]:
        with suppress(psutil.Error):
            q.kill()
    for p in procs.values():
        with suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)  # whatever of the group is left
    psutil.wait_procs([*procs.values(), *trees], timeout=5)
    return list(procs)
