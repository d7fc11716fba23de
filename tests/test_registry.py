"""Evaluation, MLflow tracking and the promotion gate, on models trained by real DeepSpeed runs."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from browser import dom, screenshot
from data_checks import check_data
from lmpipe import config
from registry import promote, tracking
from training import evaluate

pytestmark = pytest.mark.slow

TRAIN = ["--nproc", "2", "micro_batch_size=8", "log_every=5", "optim.warmup_steps=2", "save_every=1000"]


def lmpipe(*args, timeout=600):
    r = subprocess.run([sys.executable, "-m", "lmpipe.cli", *args], capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


@pytest.fixture(scope="module")
def registry(real_shards, tmp_path_factory):
    """Three registered versions: v1 barely trained, v2 trained longer, v3 on shards whose checks failed."""
    root = tmp_path_factory.mktemp("registry")
    good = root / "shards"
    shutil.copytree(real_shards, good, ignore=shutil.ignore_patterns("_checks"))
    assert check_data.run(config.build(check_data.CheckConfig, {"shards": str(good), "run_id": "ok"}))["success"]
    bad = root / "shards-failed-checks"
    shutil.copytree(good, bad, ignore=shutil.ignore_patterns("_checks"))
    strict = config.build(check_data.CheckConfig, {"shards": str(bad), "run_id": "strict", "min_validation_sequences": 10**9})
    assert not check_data.run(strict)["success"]
    runs = {}
    for name, shards, steps in (("v1", good, 3), ("v2", good, 60), ("v3", bad, 3)):
        rc, log = lmpipe("train", "--shards", str(shards), "--out", str(root / name), *TRAIN, f"max_steps={steps}")
        assert rc == 0, log
        runs[name] = root / name
    return {"root": root, "good": good, "bad": bad, "runs": runs}


def version(run: Path) -> str:
    return str(json.loads((run / "model_version.json").read_text())["version"])


def test_training_run_is_tracked_with_lineage(registry):
    c = tracking.client(tracking.TrackingConfig())
    run = registry["runs"]["v2"]
    v = c.get_model_version("lmpipe", version(run))
    t = v.tags
    r = c.get_run(v.run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params["recipe"] == "tiny" and r.data.params["max_steps"] == "60"
    assert len(c.get_metric_history(v.run_id, "loss")) == 12  # streamed from rank 0 every 5 steps
    # lineage tags resolve to existing objects
    manifest = Path(t["lmpipe.shards_manifest"])
    assert manifest.is_file()
    import hashlib

    assert hashlib.sha256(manifest.read_bytes()).hexdigest() == t["lmpipe.shards_manifest_sha256"]
    assert json.loads(manifest.read_text())["tokenizer"]["sha256"] == t["lmpipe.tokenizer_sha256"]
    assert Path(t["lmpipe.data_checks"]).is_file() and t["lmpipe.data_checks_success"] == "true"
    assert (Path(t["lmpipe.checkpoint"]) / "COMMITTED.json").is_file() and t["lmpipe.checkpoint_step"] == "60"
    assert len(t["lmpipe.git_commit"]) == 40
    assert {a.path for a in c.list_artifacts(v.run_id, "data")} == {"data/manifest.json", "data/data_checks.json"}


def test_evaluation_is_deterministic_and_compares_other_tokenizers_by_bits_per_byte(registry, tmp_path):
    cfg = {"model": str(registry["runs"]["v1"] / "export"), "shards": str(registry["good"]), "compare_champion": False,
           "max_sequences": 64}
    a = evaluate.run(config.build(evaluate.EvalConfig, {**cfg, "out": str(tmp_path / "a")}))
    b = evaluate.run(config.build(evaluate.EvalConfig, {**cfg, "out": str(tmp_path / "b")}))
    assert a["candidate"]["perplexity"] == b["candidate"]["perplexity"]
    assert a["candidate"]["samples"] == b["candidate"]["samples"]
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["candidate"]["mean_loss"] == a["candidate"]["mean_loss"]
    other = tmp_path / "other-tokenizer"
    shutil.copytree(registry["runs"]["v1"] / "export", other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<|other|>"
    (other / "tokenizer.json").write_text(json.dumps(tok))
    r = evaluate.run(config.build(evaluate.EvalConfig, {**cfg, "model": str(other), "out": str(tmp_path / "c")}))
    same, retok = a["candidate"], r["candidate"]
    assert same["same_tokenizer"] and not retok["same_tokenizer"]
    # Bits per byte: the summed loss in bits over the bytes the predicted tokens stand for. The
    # byte count's oracle is the tokenizers library decoding each sequence's targets.
    from tokenizers import Tokenizer

    from training.data import ShardSet

    tok = Tokenizer.from_file(str(registry["good"] / "tokenizer.json"))
    rows = ShardSet(str(registry["good"]), tmp_path / "cache", split="validation").rows(np.arange(64))
    nbytes = sum(len(tok.decode(row[1:].tolist(), skip_special_tokens=True).encode("utf-8")) for row in rows)
    assert abs(same["bytes"] - nbytes) / nbytes < 0.01, (same["bytes"], nbytes)
    assert same["bits_per_byte"] == pytest.approx(same["mean_loss"] * same["tokens"] / math.log(2) / same["bytes"])
    # The same weights behind a tokenizer that differs only in name: re-encoding the same text gives
    # (nearly) the same tokens, so bits per byte agree although the tokenizers are not the same file.
    assert retok["bits_per_byte"] == pytest.approx(same["bits_per_byte"], rel=0.03)


def test_promotion_gate_and_rollback(registry):
    runs, shards = registry["runs"], str(registry["good"])
    v1, v2, v3 = version(runs["v1"]), version(runs["v2"]), version(runs["v3"])
    for v in (v1, v2, v3):
        rc, log = lmpipe("evaluate", "--model", f"models:/lmpipe/{v}", "--shards", shards, "max_sequences=200")
        assert rc == 0, log
    c = tracking.client(tracking.TrackingConfig())
    assert str(tracking.alias_version(c, "lmpipe", "candidate").version) == v3  # the latest that passed evaluation

    rc, log = lmpipe("promote", "--candidate", v1)  # no champion yet
    assert rc == 0 and "promoted v1" in log.replace(f"v{v1}", "v1")
    rc, log = lmpipe("promote", "--candidate", v2)  # clearly better
    assert rc == 0, log
    assert str(tracking.alias_version(c, "lmpipe", "champion").version) == v2

    rc, log = lmpipe("promote", "--candidate", v1)  # worse: refused, champion unchanged
    assert rc == promote.EXIT_REFUSED and "is not better than champion" in log
    assert str(tracking.alias_version(c, "lmpipe", "champion").version) == v2
    d = json.loads(c.get_model_version("lmpipe", v1).tags["lmpipe.promotion.last"])
    assert d["decision"] == "refused" and d["champion_perplexity"] < d["candidate_perplexity"]

    rc, log = lmpipe("promote", "--candidate", v3)  # its data checks failed
    assert rc == promote.EXIT_REFUSED and "data checks of its shards did not pass" in log
    assert str(tracking.alias_version(c, "lmpipe", "champion").version) == v2

    rc, log = lmpipe("promote", "--rollback")
    assert rc == 0 and str(tracking.alias_version(c, "lmpipe", "champion").version) == v1

    rc, table = lmpipe("models")
    assert rc == 0
    lines = table.strip().split("\n\n")[0].splitlines()
    assert lines[0].split()[:4] == ["version", "aliases", "perplexity", "data"]
    assert any(line.split()[0] == v1 and "champion" in line.split()[1] for line in lines[1:]), table
    assert any(line.split()[0] == v2 and "#2" in line for line in lines[1:]), table
    assert "#3" in table and f"v{v1}  rollback from v{v2}" in table


def test_report_renders_with_plot_and_table(registry):
    run = registry["runs"]["v2"]
    rc, log = lmpipe("evaluate", "--model", str(run / "export"), "--shards", str(registry["good"]), "max_sequences=100")
    assert rc == 0, log
    rc, log = lmpipe("report", str(run))
    assert rc == 0, log
    page = run / "report" / "index.html"
    rendered = dom(page.as_uri())
    assert '<img id="loss-plot" src="loss.png"' in rendered and '<table id="comparison">' in rendered
    assert "champion" in rendered and "Open the Data Docs" in rendered and "shards_manifest" in rendered
    png = screenshot(page.as_uri(), "run_report.png", size=(1100, 1800))
    from PIL import Image

    img = Image.open(png).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20)
    blue = sum(n for n, (r, g, b) in colors if abs(r - 9) < 20 and abs(g - 105) < 25 and abs(b - 218) < 25)
    assert blue > 500, "the loss curve is not visible"
    assert (run / "report" / "loss.png").stat().st_size > 5000

