"""HAProxy in front of the serving replicas: its configuration, and its runtime API.

One backend, ``serving``, holds the replicas. HAProxy health-checks ``/readyz`` on each, routes
only to the ones that answer 200, and retries a request on another replica when its replica
refused the connection, closed it before answering, or answered 503 (a request cut off mid-stream
cannot be retried: streamed responses go through once). ``lm_serving_rollout`` drains and puts
back one replica at a time through the runtime API (``stats socket ... level admin``).

The runtime API is a line protocol on a socket: one command per connection, the answer until
the server closes it. It is spoken here directly (a few lines) rather than through a client
package: the ones on PyPI speak only UNIX sockets, and compose reaches HAProxy over TCP.
"""

from __future__ import annotations

import csv
import io
import socket
import time
from dataclasses import dataclass

from lmpipe.errors import LmpipeError

BACKEND = "serving"  # the backend of the replicas, in every configuration lmpipe writes


class BalancerError(LmpipeError):
    """HAProxy's runtime API is unreachable, or refused a command."""


def config(replicas: dict[str, str], bind: str, admin: str, tls_pem: str | None = None,
           log: str = "stdout format raw local0", nameserver: str | None = None) -> str:
    """An ``haproxy.cfg`` for ``replicas`` (server name -> host:port), listening on ``bind``
    (``host:port``; HTTPS when ``tls_pem`` names a PEM with the certificate chain and its key),
    with the runtime API on ``admin`` (a socket path, or ``ipv4@host:port``). With a
    ``nameserver`` (host:port), replica names are looked up there again as they change address."""
    socket_line = f"stats socket {admin} level admin" + (" mode 600" if admin.startswith("/") else "")
    servers = "\n".join(f"    server {name} {addr}" for name, addr in replicas.items())
    tls = f" ssl crt {tls_pem}" if tls_pem else ""
    dns = f"\nresolvers dns\n    nameserver dns1 {nameserver}\n    hold valid 5s\n" if nameserver else ""
    return f"""\
# The serving replicas' load balancer (lmpipe/balancer.py writes this file).
global
    {socket_line}
    stats timeout 30s
    log {log}
    maxconn 4096
{dns}
defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 10m
    timeout server 10m
    timeout http-request 30s
    timeout queue 60s
    # a replica busy decoding or loading a model may take a moment to answer its check
    timeout check 5s
    # a request whose replica refused it, died under it or was not ready goes to another one;
    # the whole request is read first, so that it can be sent again
    option http-buffer-request
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response junk-response 503

frontend serving
    bind {bind}{tls}
    default_backend {BACKEND}

backend {BACKEND}
    balance leastconn
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter 1s fall 3 rise 2 init-addr last,libc,none{" resolvers dns" if dns else ""}
{servers}
"""


def compose_config() -> str:
    """``docker/haproxy/haproxy.cfg``: compose's two replicas, found through Docker's DNS, and the
    runtime API on the compose network only (``LMPIPE_SERVE_URL`` and ``LMPIPE_LB_ADMIN`` there)."""
    return config({"serving-1": "serving-1:8000", "serving-2": "serving-2:8000"}, bind=":8000",
                  admin="ipv4@0.0.0.0:9999", nameserver="127.0.0.11:53")


@dataclass(frozen=True)
class Server:
    """One replica as HAProxy sees it (a row of ``show stat``)."""

    name: str
    addr: str  # host:port
    status: str  # UP, DOWN, DRAIN, MAINT, "UP 1/2" while its checks flip...
    sessions: int  # requests in flight on it now
    retries: int  # requests retried on it (wretr) ...
    redispatches: int  # ... and moved from it to another replica (wredis)

    @property
    def up(self) -> bool:
        """Health checks pass (whether or not it takes new requests)."""
        return self.status.split()[0] in ("UP", "DRAIN")

    @property
    def in_rotation(self) -> bool:
        """Healthy and taking new requests."""
        return self.status.split()[0] == "UP"

    @property
    def url(self) -> str:
        return f"http://{self.addr}"


class Runtime:
    """HAProxy's runtime API at ``address``: ``host:port`` or the path of a UNIX socket."""

    def __init__(self, address: str, backend: str = BACKEND, timeout: float = 10):
        host, sep, port = address.rpartition(":")
        if not address.startswith("/") and not (sep and port.isdigit() and 0 < int(port) < 65536):
            raise BalancerError(f"HAProxy's runtime API address {address!r} is neither a socket path (/...) "
                                f"nor host:port")
        self.address, self.backend, self.timeout = address, backend, timeout

    def command(self, line: str) -> str:
        if self.address.startswith("/"):
            family, target = socket.AF_UNIX, self.address
        else:
            host, _, port = self.address.rpartition(":")
            family, target = socket.AF_INET, (host.strip("[]") or "127.0.0.1", int(port))
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                s.connect(target)
                s.sendall(line.encode() + b"\n")
                chunks = []
                while chunk := s.recv(65536):
                    chunks.append(chunk)
        except OSError as exc:
            raise BalancerError(f"HAProxy's runtime API at {self.address} is unreachable: {exc}") from None
        return b"".join(chunks).decode(errors="replace")

    def servers(self) -> list[Server]:
        """The replicas of the backend, in configuration order."""
        text = self.command("show stat")
        rows = list(csv.DictReader(io.StringIO(text.lstrip("# "))))
        out = [Server(r["svname"], r["addr"], r["status"], int(r["scur"] or 0), int(r["wretr"] or 0),
                      int(r["wredis"] or 0))
               for r in rows if r.get("pxname") == self.backend and r["svname"] not in ("FRONTEND", "BACKEND")]
        if not out:
            raise BalancerError(f"HAProxy at {self.address} has no backend {self.backend!r} with servers")
        return out

    def server(self, name: str) -> Server:
        for s in self.servers():
            if s.name == name:
                return s
        raise BalancerError(f"HAProxy's backend {self.backend!r} has no server {name!r}")

    def set_state(self, name: str, state: str) -> None:
        """``ready``, ``drain`` (no new requests; those in flight finish) or ``maint``."""
        answer = self.command(f"set server {self.backend}/{name} state {state}").strip()
        if answer:
            raise BalancerError(f"HAProxy refused to set {self.backend}/{name} to {state}: {answer}")

    def wait(self, name: str, done, what: str, timeout: float = 300, poll: float = 0.25) -> Server:
        """Until ``done(server)``; a :class:`BalancerError` naming ``what`` after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.server(name)
            if done(s):
                return s
            if time.monotonic() > deadline:
                raise BalancerError(f"{self.backend}/{name} not {what} after {timeout:.0f} s (status {s.status}, "
                                    f"{s.sessions} requests in flight)")
            time.sleep(poll)


if __name__ == "__main__":  # python -m lmpipe.balancer > docker/haproxy/haproxy.cfg
    print(compose_config(), end="")
