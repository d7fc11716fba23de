"""Container healthcheck without curl: exit 0 when a URL answers 2xx, or a tcp://host:port accepts.

    python healthcheck.py http://localhost:8080/api/v2/monitor/health
    python healthcheck.py tcp://127.0.0.1:2222
"""

import socket
import sys
import urllib.request
from urllib.parse import urlparse


def main(url: str) -> int:
    u = urlparse(url)
    try:
        if u.scheme == "tcp":
            socket.create_connection((u.hostname, u.port), timeout=5).close()
        else:
            with urllib.request.urlopen(url, timeout=5) as r:  # raises on 4xx/5xx
                r.read(1)
    except OSError as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
