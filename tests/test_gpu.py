"""The CUDA path, on one GPU: NCCL, bf16, ZeRO-2 and ZeRO-3, resume and export.

Marked ``gpu``: the default run (``-m 'not gpu'``) and CI skip them; ``bench/gpu.sh`` runs
them on a machine with an NVIDIA GPU, with the MFU benchmark. The shards are synthetic
(``bench/bench_train.py``'s, in the real format), so no Spark or Java is needed there.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import torch

    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (run them with bench/gpu.sh on a GPU machine)")
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "bench" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.synthetic_shards(tmp_path_factory.mktemp("gpu") / "shards", 4096, 256, 2048)


def train(shards: Path, out: Path, *args: str) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "lmpipe.cli", "train", "--shards", str(shards), "--out", str(out), "--nproc", "1",
           "--recipe", "tiny", "micro_batch_size=8", "log_every=5", "deepspeed.precision=bf16", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=420, check=False)
    return r.returncode, r.stdout + r.stderr


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def exported(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "export" / "model.safetensors")


def test_one_gpu_zero2_bf16_trains_reports_mfu_and_exports(shards, tmp_path):
    import torch

    out = tmp_path / "z2"
    rc, log = train(shards, out, "--zero-stage", "2", "max_steps=30")
    assert rc == 0, log[-4000:]
    assert "GPU/nccl" in log and "ZeRO-2" in log and "bf16" in log
    m = metrics(out)
    assert m[-1]["loss"] < m[0]["loss"] and 0 < m[-1]["mfu"] < 1 and m[-1]["max_mem_gib"] > 0
    weights = exported(out)
    assert weights and all(bool(torch.isfinite(v.float()).all()) for v in weights.values())


def test_one_gpu_zero3_bf16_resumes_where_it_stopped_and_exports(shards, tmp_path):
    out = tmp_path / "z3"
    args = ("--zero-stage", "3", "max_steps=20", "save_every=10")
    rc, log = train(shards, out, *args, "debug.exit_after_steps=10")
    assert rc == 0, log[-4000:]
    assert not (out / "export").exists()
    rc, log = train(shards, out, *args)
    assert rc == 0, log[-4000:]
    assert "resumed from" in log and "at step 10 " in log, log[-4000:]
    steps = [x["step"] for x in metrics(out)]
    assert steps == sorted(steps) and steps[-1] == 20
    straight = tmp_path / "z3-straight"
    rc, log = train(shards, straight, *args)
    assert rc == 0, log[-4000:]
    a, b = metrics(out)[-1]["loss"], metrics(straight)[-1]["loss"]
    assert abs(a - b) / b < 0.02, (a, b)  # bf16 on a GPU: close, not bit-equal
    assert exported(out).keys() == exported(straight).keys()
