"""Progress and status lines: timestamped, flushed, on stderr (stdout stays for results)."""

from __future__ import annotations

import sys
import time


def log(msg: str) -> None:
    print(f"[lmpipe {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    log(f"WARNING: {msg}")
