"""Headless Chromium (Debian's package) for tests that look at pages the way a person does."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

ARTIFACTS = Path(os.environ.get("LMPIPE_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / ".lmpipe" / "test-artifacts"))


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        raise RuntimeError("chromium is not installed: `make test` installs it (apt-get install chromium)")
    return exe


def _run(url: str, *extra: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *extra, url],
                              capture_output=True, text=True, timeout=120)


def screenshot(url: str, name: str, size=(1400, 2000)) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out = ARTIFACTS / name
    _run(url, f"--window-size={size[0]},{size[1]}", f"--screenshot={out}", "--hide-scrollbars")
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot of {url}")
    return out


def dom(url: str) -> str:
    """The DOM after the page's scripts ran."""
    return _run(url, "--virtual-time-budget=3000", "--dump-dom").stdout
