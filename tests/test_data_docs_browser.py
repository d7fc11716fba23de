"""The Data Docs a user opens render in a real browser, offline, and show what failed."""

import re
import shutil

import numpy as np
from PIL import Image

from browser import dom, screenshot
from data_checks import check_data
from lmpipe import config



def test_failed_expectations_are_visible_in_chromium(real_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(real_shards, shards, ignore=shutil.ignore_patterns("_checks"))
    rel = sorted((shards / "train").glob("*.parquet"))[0]
    data = bytearray(rel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rel.write_bytes(bytes(data))
    result = check_data.run(config.build(check_data.CheckConfig, {"shards": str(shards)}))
    assert not result["success"]
    page = next((shards / "_checks").glob("*/data_docs/validations/lmpipe_shards_shards/**/*.html"))
    html = page.read_text()
    assert not re.search(r'(src|href)="https?://(?!greatexpectations\.io/newsletter)', html), "page loads from the network"

    rendered = dom(page.as_uri())
    assert "Status:" in rendered and "Failed" in rendered
    assert f"train/{rel.name}" in rendered  # the offending shard is named on the page
    assert "Every shard's sha256 matches the manifest" in rendered

    png = screenshot(page.as_uri(), "data_docs_failed_shard.png", size=(1400, 5000))
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    # Bootstrap's text-danger red (#dc3545) marks failures: present only if the vendored CSS loaded.
    red = (abs(pixels[..., 0] - 220) < 25) & (abs(pixels[..., 1] - 53) < 30) & (abs(pixels[..., 2] - 69) < 30)
    green = (abs(pixels[..., 0] - 40) < 25) & (abs(pixels[..., 1] - 167) < 30) & (abs(pixels[..., 2] - 69) < 30)
    assert red.sum() > 200, "no failure marks visible"
    assert green.sum() > 50, "no success marks visible"

    # The index the task links to: bootstrap-table must build its Validation Results rows (the
    # table stays empty without it), and the failed run's row leads to the failed expectation.
    index_page = page.parents[4] / "index.html"
    assert not re.search(r'<script[^>]+src="https?://', index_page.read_text()), "the index loads scripts from the network"
    index = dom(index_page.as_uri())
    rows = re.findall(r'<tr[^>]*class="clickable-row"[^>]*data-href="(validations/[^"]+)"[^>]*>(.*?)</tr>', index, re.S)
    assert len(rows) == 4, f"{len(rows)} validation rows rendered"  # dataset, splits, shards, curation
    (failed,) = [href for href, cells in rows if "ge-failed-icon" in cells]
    assert failed.startswith("validations/lmpipe_shards_shards/")
    target = dom((index_page.parent / failed).as_uri())  # where a click on that row goes
    assert "Every shard's sha256 matches the manifest" in target and f"train/{rel.name}" in target
