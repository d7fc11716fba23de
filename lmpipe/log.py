"""The one way lmpipe reports progress: timestamped lines on stderr, flushed at once.

stdout is kept for results (a URI, a table, a task's links), so a command's output can be
piped while its progress stays readable in a terminal and in Airflow task logs.
"""

from __future__ import annotations

import sys
import time


def log(msg: str, *, level: str = "info") -> None:
    """``[lmpipe HH:MM:SS] msg``; ``level="warning"`` or ``"error"`` marks the line."""
    mark = "" if level == "info" else f"{level.upper()}: "
    print(f"[lmpipe {time.strftime('%H:%M:%S')}] {mark}{msg}", file=sys.stderr, flush=True)
