"""The Data Docs scripts no PyPI package carries, fetched once at install time from the npm
registry, pinned by version and verified by the registry's sha512 integrity hash.

GX 1.x's Data Docs index builds its Validation Results table with bootstrap-table (and its
filter-control extension, whose date filter uses bootstrap-datepicker), loaded from CDNs at
view time. Offline, the table stays empty. ``make venv`` (and every image that runs the
checks) calls ``python -m data_checks.assets fetch``; :mod:`data_checks.offline_docs` copies
the files into each site.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import sys
import tarfile
from pathlib import Path

from lmpipe import settings
from lmpipe.errors import LmpipeError
from lmpipe.log import log

# package -> (version, npm integrity, {file in the tarball: name in the vendor folder})
PACKAGES = {
    "bootstrap-table": ("1.19.1", "sha512-WvV+l1AI/C+zThaKmfHmi/IuayVNB0qdFyEhFx1jyZhO0oLtNJNANkCR3rvJf6Dkh72dsLElxpE/bzK9seEQLA==", {
        "package/dist/bootstrap-table.min.js": "bootstrap-table.min.js",
        "package/dist/bootstrap-table.min.css": "bootstrap-table.min.css",
        "package/dist/extensions/filter-control/bootstrap-table-filter-control.min.js":
            "bootstrap-table-filter-control.min.js",
        "package/dist/extensions/filter-control/bootstrap-table-filter-control.min.css":
            "bootstrap-table-filter-control.min.css",
    }),
    "bootstrap-datepicker": ("1.9.0", "sha512-9rYYbaVOheGYxjOr/+bJCmRPihfy+LkLSg4fIFMT9Od8WwWB/MB50w0JO1eBgKUMbb7PFHQD5uAfI3ArAxZRXA==", {
        "package/dist/js/bootstrap-datepicker.min.js": "bootstrap-datepicker.min.js",
        "package/dist/css/bootstrap-datepicker.min.css": "bootstrap-datepicker.min.css",
    }),
}


def folder() -> Path:
    """Where the fetched files live: beside the installed packages, in this environment."""
    return Path(sys.prefix) / "share" / "lmpipe" / "data-docs"


def files() -> dict[str, Path]:
    """Vendor name -> fetched file; a clear error naming the fix when they were never fetched."""
    out = {name: folder() / name for _, _, wanted in PACKAGES.values() for name in wanted.values()}
    missing = sorted(n for n, p in out.items() if not p.is_file())
    if missing:
        raise LmpipeError(f"Data Docs scripts missing from {folder()} ({', '.join(missing)}): run "
                          f"`{sys.executable} -m data_checks.assets fetch` once (make venv does)")
    return out


def verify(data: bytes, integrity: str) -> None:
    algo, _, expected = integrity.partition("-")
    got = base64.b64encode(hashlib.new(algo, data).digest()).decode()
    if got != expected:
        raise LmpipeError(f"downloaded tarball does not match its pinned {algo} integrity hash")


def fetch(dest: Path | None = None) -> Path:
    """Download each pinned tarball, check its integrity hash, and extract the named files."""
    import httpx

    dest = dest or folder()
    dest.mkdir(parents=True, exist_ok=True)
    registry = settings.get("LMPIPE_NPM_REGISTRY").rstrip("/")
    for name, (version, integrity, wanted) in PACKAGES.items():
        if all((dest / v).is_file() for v in wanted.values()):
            continue
        url = f"{registry}/{name}/-/{name}-{version}.tgz"
        r = httpx.get(url, timeout=60, follow_redirects=True)
        r.raise_for_status()
        verify(r.content, integrity)
        with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
            for member, local in wanted.items():
                (dest / local).write_bytes(tar.extractfile(member).read())
        log(f"Data Docs assets: {name} {version} from {url}")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_checks.assets", description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["fetch"])
    ap.parse_args(argv)
    fetch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
