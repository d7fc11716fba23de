"""Make a GX Data Docs site render without network access.

GX 1.x pages load Bootstrap, jQuery and Font Awesome from CDNs. On an air-gapped cluster
(or this project's CI) the pages then render unstyled and the pass/fail status icons
(Font Awesome glyphs) are invisible, so a user cannot see which expectations failed.
We copy the same libraries from pinned PyPI packages (fontawesomefree 6.6.0 is GX's exact
version; XStatic-Bootstrap 4.5 and XStatic-jQuery 3.7.1) into ``static/vendor`` and point
the pages at them. The index's Validation Results table needs bootstrap-table, its
filter-control extension and bootstrap-datepicker, which no PyPI package carries: they come
from the npm registry at install time (:mod:`data_checks.assets`). The remaining CDN extras
(vega charts, a dark theme, a second Popper) are dropped.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


def _assets() -> dict[str, Path]:
    import fontawesomefree
    import xstatic.pkg.bootstrap as bootstrap
    import xstatic.pkg.jquery as jquery

    from data_checks import assets

    fa = Path(fontawesomefree.__file__).parent / "static" / "fontawesomefree"
    return {
        **assets.files(),
        "bootstrap.min.css": Path(bootstrap.BASE_DIR) / "css" / "bootstrap.min.css",
        "bootstrap.bundle.min.js": Path(bootstrap.BASE_DIR) / "js" / "bootstrap.bundle.min.js",
        "jquery.min.js": Path(jquery.BASE_DIR) / "jquery.min.js",
        "fontawesome/css/all.min.css": fa / "css" / "all.min.css",
        "fontawesome/webfonts": fa / "webfonts",
    }


# CDN URL pattern -> vendored file (None: drop the tag)
_REWRITES = [
    (r"https://maxcdn\.bootstrapcdn\.com/bootstrap/[^\"']+/bootstrap\.min\.css", "bootstrap.min.css"),
    (r"https://stackpath\.bootstrapcdn\.com/bootstrap/[^\"']+/bootstrap\.min\.js", "bootstrap.bundle.min.js"),
    (r"https://code\.jquery\.com/jquery-[^\"']+\.min\.js", "jquery.min.js"),
    (r"https://cdnjs\.cloudflare\.com/ajax/libs/font-awesome/[^\"']+/all\.min\.css", "fontawesome/css/all.min.css"),
    (r"https://unpkg\.com/bootstrap-table@[^/\"']+/dist/bootstrap-table\.min\.(js|css)", r"bootstrap-table.min.\1"),
    (r"https://unpkg\.com/bootstrap-table@[^/\"']+/dist/extensions/filter-control/bootstrap-table-filter-control"
     r"(?:\.min)?\.(js|css)", r"bootstrap-table-filter-control.min.\1"),
    (r"https://cdnjs\.cloudflare\.com/ajax/libs/bootstrap-datepicker/[^/\"']+/(?:js|css)/bootstrap-datepicker"
     r"\.min\.(js|css)", r"bootstrap-datepicker.min.\1"),
]
_DROP_TAG = re.compile(r"<(script|link)\b[^>]*(?:src|href)=\"https://(?:unpkg\.com|cdnjs\.cloudflare\.com|cdn\.jsdelivr\.net)"
                       r"[^\"]*\"[^>]*>(?:\s*</script>)?")
_LOGO = re.compile(r"https://great-expectations-web-assets\.s3[^\"']*/logo-long\.png[^\"']*")


def localize(site: Path) -> int:
    """Rewrite every page under ``site``; return how many pages were changed."""
    vendor = site / "static" / "vendor"
    for name, src in _assets().items():
        dst = vendor / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copyfile(src, dst)
    changed = 0
    for page in site.rglob("*.html"):
        html = original = page.read_text(encoding="utf-8")
        rel = os.path.relpath(site / "static", page.parent)
        for pattern, local in _REWRITES:
            html = re.sub(pattern, f"{rel}/vendor/{local}", html)
        html = _DROP_TAG.sub("", html)
        html = _LOGO.sub(f"{rel}/images/logo-long.png", html)
        if html != original:
            page.write_text(html, encoding="utf-8")
            changed += 1
    return changed
