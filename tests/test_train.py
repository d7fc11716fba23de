"""DeepSpeed training on CPU ranks over gloo: real launcher, real ranks, real checkpoints."""

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import checkpoint as ckpt


BASE = ["--nproc", "2", "micro_batch_size=4", "log_every=2", "optim.warmup_steps=2", "prefetch=2"]


def train_cmd(shards, out, *args):
    return [sys.executable, "-m", "lmpipe.cli", "train", "--shards", str(shards), "--out", str(out), *BASE, *args]


def train(shards, out, *args, timeout=600):
    r = subprocess.run(train_cmd(shards, out, *args), capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def tags(out: Path) -> list[str]:
    return sorted(p.parent.name for p in (out / "checkpoints").glob("step-*/COMMITTED.json"))


def trained_fp32(out: Path, tag: str) -> dict:
    """The weights in a checkpoint, consolidated by DeepSpeed's own zero_to_fp32 (an independent path)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=tag)


def assert_export_equals(out: Path, tag: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "export")
    ref = trained_fp32(out, tag)
    got = model.state_dict()
    assert ref and all(torch.equal(got[k], v) for k, v in ref.items()), "exported weights differ from the trained ones"
    tok = AutoTokenizer.from_pretrained(out / "export")
    assert tok.eos_token_id == model.config.eos_token_id
    assert not (out / "checkpoints" / "latest").exists()  # lmpipe never relies on DeepSpeed's latest


@pytest.mark.slow
def test_zero2_two_ranks_loss_falls_and_export(real_shards, tmp_path):
    out = tmp_path / "run"
    rc, log = train(real_shards, out, "--zero-stage", "2", "max_steps=80", "save_every=40", "optim.lr=0.005",
                    "micro_batch_size=8", "log_every=1", "optim.warmup_steps=5")
    assert rc == 0, log
    m = metrics(out)
    assert len(m) == 80
    assert m[0]["loss"] - m[-1]["loss"] > 1.0, [x["loss"] for x in m]  # clearly learning: ~6.0 -> ~4.7
    assert "2 ranks (CPU/gloo), ZeRO-2, fp32" in log and "tokens per step" in log and "ZeRO-3" in log
    assert tags(out) == ["step-00000040", "step-00000080"]
    assert_export_equals(out, "step-00000080")
    # the export's tokenizer carries the chat template /v1/chat/completions renders with
    config = json.loads((out / "export" / "tokenizer_config.json").read_text())
    template = config.get("chat_template") or (out / "export" / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template and "add_generation_prompt" in template

    # warm start from that export: the first step starts where the first run ended, not from scratch
    warm = tmp_path / "warm"
    # a stale DeepSpeed CPU allreduce buffer on our port (left by a killed run) must not be mapped
    port = _free_port()
    stale = [Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{r}") for r in (0, 1)]
    for p in stale:
        p.write_bytes(b"stale")
    rc, log = train(real_shards, warm, "max_steps=2", "log_every=1", f"init_from={out / 'export'}",
                    f"launch.master_port={port}", timeout=300)
    assert rc == 0 and "warm start" in log, log
    assert not any(p.exists() for p in stale)  # removed before launch, and the run's own removed after
    assert metrics(warm)[0]["loss"] < m[0]["loss"] - 0.8, (metrics(warm)[0], m[0])
    rc, log = train(real_shards, tmp_path / "warm2", "model.num_layers=1", f"init_from={out / 'export'}")
    assert rc == 2 and "model shape differs from recipe 'tiny' at num_layers" in log, log


@pytest.mark.slow
def test_zero3_two_ranks_from_and_to_s3_and_a_retry_restores_from_s3(real_shards, tmp_path, bucket, storage_cfg):
    """ZeRO-3 with optimizer and parameter offload and activation checkpointing; partitions are
    gathered for export; shards are read from S3 (cached, verified) and the run (checkpoints with
    their markers, export, metrics) is uploaded to the run's S3 prefix."""
    from lmpipe.storage import open_store

    src = open_store(f"s3://{bucket}/shards", storage_cfg)
    for p in real_shards.rglob("*"):
        if p.is_file() and "_checks" not in p.parts:
            src.put_file(p.relative_to(real_shards).as_posix(), p)
    stage = tmp_path / "staging"
    args = [f"s3://{bucket}/shards", f"s3://{bucket}/runs/r1", "--zero-stage", "3", "max_steps=4", "save_every=2",
            f"storage.endpoint_url={storage_cfg.endpoint_url}", "deepspeed.offload_optimizer=true",
            "deepspeed.offload_params=true", "deepspeed.activation_checkpointing=true"]
    rc, log = train(*args, f"work_dir={stage}")
    assert rc == 0, log
    assert "ZeRO-3" in log and "uploaded to s3://" in log
    ds = json.loads((stage / "ds_config.json").read_text())["zero_optimization"]
    assert ds["offload_optimizer"]["device"] == ds["offload_param"]["device"] == "cpu"
    assert_export_equals(stage, "step-00000004")
    assert len(list((stage / "cache" / "shards").glob("*.npy"))) > 1  # cached after the sha256 check
    run = open_store(f"s3://{bucket}/runs/r1", storage_cfg)
    for key in ("checkpoints/step-00000004/COMMITTED.json", "checkpoints/step-00000002/COMMITTED.json",
                "export/model.safetensors", "export/config.json", "metrics.jsonl", "train_config.json",
                "model_version.json", "mlflow_run.json"):
        assert run.exists(key), key  # what a retry and the later stages read from the run prefix

    # The task retried elsewhere, on an empty staging folder: it restores the run from S3 and
    # registers no second version. (A retry after killed ranks resumes from S3 and ends with an
    # uninterrupted run's weights: tests/test_stack.py, and locally the SIGKILL test below.)
    version = json.loads(run.get_bytes("model_version.json"))["version"]
    rc, log = train(*args, f"work_dir={tmp_path / 'retry'}")
    assert rc == 0 and "restored train_config.json" in log and "is this run's version already" in log, log
    assert json.loads(run.get_bytes("model_version.json"))["version"] == version  # one run, one version


def test_launch_command_uses_the_deepspeed_launcher_and_hostfile():
    from lmpipe import config
    from training.config import TrainConfig
    from training.launcher import launch_command

    cfg = config.build(TrainConfig, {"launch": {"nproc": 8, "hostfile": "/etc/hosts.ds", "num_nodes": 4,
                                                "master_port": 29600}})
    cmd = launch_command(cfg, Path("/runs/x"))
    assert cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    assert cmd[3:] == ["--num_gpus", "8", "--master_port", "29600", "--hostfile", "/etc/hosts.ds", "--num_nodes", "4",
                       "--module", "training.trainer", "--run-dir", "/runs/x"]


def batches(out: Path) -> dict[int, list]:
    seen = {}
    for line in (out / "batches.jsonl").read_text().splitlines():
        e = json.loads(line)
        seen[e["position"]] = e["ids"]  # a re-run position (after a kill) keeps its last record
    return seen


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(real_shards, tmp_path):
    args = ["--zero-stage", "2", "max_steps=12", "save_every=4", "debug.log_batches=true"]
    ref = tmp_path / "ref"
    rc, log = train(real_shards, ref, *args)
    assert rc == 0, log

    out = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(real_shards, out, *args, "debug.step_delay_s=0.5"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "checkpoints" / "step-00000004" / "COMMITTED.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), "no committed checkpoint appeared"
    time.sleep(1.2)  # let it get past the checkpoint, mid-way to the next
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "export").exists()

    rc, log = train(real_shards, out, *args)
    assert rc == 0, log
    resumed = [x for x in log.splitlines() if "resumed from" in x]
    assert resumed and "at step 4 " in resumed[0], resumed
    assert batches(out) == batches(ref)
    a, b = load_file(ref / "export" / "model.safetensors"), load_file(out / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"


@pytest.mark.slow
def test_missing_marker_stale_latest_and_corrupt_checkpoint(real_shards, tmp_path):
    out = tmp_path / "run"
    rc, log = train(real_shards, out, "--zero-stage", "2", "max_steps=6", "save_every=2")
    assert rc == 0, log
    (out / "checkpoints" / "step-00000006" / "COMMITTED.json").unlink()  # as if killed mid-save
    (out / "checkpoints" / "latest").write_text("step-00000002")  # a stale DeepSpeed 'latest'
    rc, log = train(real_shards, out, "--zero-stage", "2", "max_steps=8", "save_every=2")
    assert rc == 0, log
    assert "step-00000006 has no COMMITTED.json" in log
    assert "resumed from" in log and "step-00000004 at step 4" in log

    victim = next(p for p in sorted((out / "checkpoints" / "step-00000008").rglob("*.pt")))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    rc, log = train(real_shards, out, "--zero-stage", "2", "max_steps=10", "save_every=2")
    assert rc != 0
    assert "is corrupt" in log and victim.name in log
    assert "ranks (CPU/gloo)" not in log, "refused by the launcher, before any rank started"
    assert tags(out)[-1] == "step-00000008"  # nothing newer was written

    # Someone with write access to the run plants a pickle that would run code when DeepSpeed loads
    # it, and rewrites the marker's digests to match; without the trainers' key it cannot sign it.
    sentinel = tmp_path / "pwned"
    victim.write_bytes(pickle.dumps(Planted(str(sentinel))))
    marker_path = out / "checkpoints" / "step-00000008" / "COMMITTED.json"
    marker = json.loads(marker_path.read_text())
    marker["files"][victim.relative_to(marker_path.parent).as_posix()] = hashlib.sha256(victim.read_bytes()).hexdigest()
    del marker["signature"]
    marker_path.write_text(json.dumps(marker))
    rc, log = train(real_shards, out, "--zero-stage", "2", "max_steps=10", "save_every=2")
    assert rc != 0 and "COMMITTED.json is unsigned" in log, log[-3000:]
    assert "ranks (CPU/gloo)" not in log
    assert not sentinel.exists(), "the planted checkpoint file was unpickled"
    assert Planted.runs_on_load(sentinel)  # the oracle: loading that file does run its code


class Planted:
    """A pickle that creates a file when it is loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path(self.path).touch, ())

    @staticmethod
    def runs_on_load(sentinel: Path) -> bool:
        other = sentinel.with_name("oracle")
        pickle.loads(pickle.dumps(Planted(str(other))))
        return other.exists()


@pytest.mark.slow
def test_nan_loss_is_skipped_then_aborts(real_shards, tmp_path):
    """The NaNs are on rank 1 only: rank 0 (which logs) learns of them only through the all-reduce,
    and every rank must skip the same micro-batch or their collectives would no longer pair up.
    One lone NaN is skipped and training goes on; three in a row abort the run."""
    out = tmp_path / "run"
    rc, log = train(real_shards, out, "max_steps=10", "save_every=2", "nan_abort_after=3",
                    "debug.inject_nan_steps=[1,4,5,6,7,8,9]", "debug.inject_nan_ranks=[1]", timeout=240)
    assert rc == 3, log
    assert "non-finite loss at step 1 (data position 1): micro-batch skipped (1 in a row)" in log
    # a skipped micro-batch is no step, and the next finite loss resets the count
    assert "non-finite loss at step 3 (data position 4): micro-batch skipped (1 in a row)" in log
    assert "non-finite loss at step 3 (data position 6): micro-batch skipped (3 in a row)" in log
    assert "aborting: 3 consecutive non-finite losses" in log
    assert tags(out) == ["step-00000002"] and not (out / "export").exists()


def test_a_resume_with_another_rank_count_is_refused_naming_both(real_shards, tmp_path):
    """The data order and the global batch depend on the rank count: a resume keeps it."""
    from lmpipe.cli import build_parser
    from training import launcher

    out = tmp_path / "run"
    args = build_parser().parse_args(["train", "--shards", str(real_shards), "--out", str(out), *BASE])
    launcher.prepare(launcher.config_from_args(args))  # the run folder a 2-rank run starts with, no ranks
    step = out / "checkpoints" / "step-00000002"  # and a checkpoint those 2 ranks committed (hand-built)
    step.mkdir(parents=True)
    ckpt.commit(out / "checkpoints", step.name, {"step": 2, "world_size": 2})  # signed with this machine's key
    rc, log = train(real_shards, out, "--nproc", "1")
    assert rc == 2 and "step-00000002" in log and "written by 2 ranks" in log and "would start 1" in log, log


def test_ranks_build_deepspeed_ops_with_this_environments_ninja(real_shards, tmp_path, monkeypatch):
    """Whatever PATH the launcher was started with (a shell, pytest, an Airflow worker), the ranks
    find this environment's ninja first: ninja 1.11 and 1.12+ hash build commands differently,
    so ranks alternating between two would rebuild DeepSpeed's CPU ops at every switch."""
    import shutil

    from lmpipe.cli import build_parser
    from training import launcher

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    args = build_parser().parse_args(["train", "--shards", str(real_shards), "--out", str(tmp_path / "run"), *BASE])
    env = launcher._launch_env(launcher.config_from_args(args), None)
    own = Path(sys.executable).parent / "ninja"
    assert own.is_file() and shutil.which("ninja", path="/usr/bin:/bin") != str(own)
    assert shutil.which("ninja", path=env["PATH"]) == str(own)
    assert env["PATH"].endswith("/usr/bin:/bin")  # the rest of PATH is kept


def test_a_resume_with_another_zero_stage_is_refused_naming_both(real_shards, tmp_path):
    """ZeRO partitions optimizer state by stage: a resume keeps the stage of the run."""
    from lmpipe.cli import build_parser
    from lmpipe.errors import LmpipeError
    from training import launcher

    out = tmp_path / "run"
    args = build_parser().parse_args(["train", "--shards", str(real_shards), "--out", str(out), *BASE])
    launcher.prepare(launcher.config_from_args(args))
    args = build_parser().parse_args(["train", "--shards", str(real_shards), "--out", str(out), *BASE,
                                      "--zero-stage", "3"])
    with pytest.raises(LmpipeError, match=r"deepspeed\.zero_stage: 2 in the run, 3 now"):
        launcher.prepare(launcher.config_from_args(args))


def test_refusals_before_launch(real_shards, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's")
    rc, log = train(real_shards, foreign)
    assert rc == 1 and "pass --fresh" in log
    rc, log = train(tmp_path / "no-shards", tmp_path / "o")
    assert rc == 1 and "no manifest.json" in log
    rc, log = train(real_shards, tmp_path / "o", "model.hidden=3")
    assert rc == 2 and "unknown config key 'model.hidden'" in log
    rc, log = train(real_shards, tmp_path / "o", "--recipe", "huge")
    assert rc == 2 and "unknown recipe 'huge'" in log


def test_a_stale_extension_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """A rank killed mid-build leaves torch's build lock behind; every later launch would wait on
    it forever. Old locks go before a launch; a build in progress (a fresh lock) is left alone."""
    import os
    import time

    from training.launcher import clear_stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # torch's own setting for its build root
    stale, fresh = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock", tmp_path / "py311_cpu" / "cpu_adam" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir(parents=True)
        lock.write_text("")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert clear_stale_build_locks() == [stale]
    assert not stale.exists() and fresh.exists()


def test_multi_node_ranks_get_s3_settings_and_secrets_from_a_600_file_never_the_pdsh_command(tmp_path, monkeypatch):
    """DeepSpeed's own runner builds the pdsh command from the launcher's environment."""
    import stat

    import deepspeed.launcher.runner as ds_runner

    from lmpipe import config
    from training import launcher
    from training.config import TrainConfig

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    cfg = config.build(TrainConfig, {"launch": {"nproc": 2, "hostfile": str(hostfile), "num_nodes": 2,
                                                "master_port": 29600}})
    run = tmp_path / "run"
    run.mkdir()
    secrets = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE000001", "AWS_SECRET_ACCESS_KEY": "s3-secret-000001",
               "LMPIPE_CHECKPOINT_KEY": "ckpt-key-000001", "MLFLOW_TRACKING_TOKEN": "mlflow-token-000001"}
    env = {"PATH": "/usr/bin", "AWS_ENDPOINT_URL": "http://minio:9000", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
           **secrets}
    runner_env = launcher.rank_env(cfg, dict(env), run)
    saved = run / launcher.RANK_ENV
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text()) == {k: v for k, v in env.items() if k != "PATH" and k != "MLFLOW_TRACKING_URI"}

    started, real_popen = [], subprocess.Popen
    monkeypatch.setattr(ds_runner.PDSHRunner, "backend_exists", lambda self: True)
    monkeypatch.setattr(ds_runner.subprocess, "Popen",
                        lambda cmd, env=None: started.append(cmd) or real_popen(["true"]))
    monkeypatch.setattr(ds_runner.os, "environ", dict(runner_env))
    monkeypatch.chdir(tmp_path)
    args = launcher.launch_command(cfg, run, 29600)[3:]
    try:
        ds_runner.main([*args[:-4], "--no_ssh_check", "--master_addr", "10.0.0.1", *args[-4:]])
    except SystemExit:
        pass
    cmd = " ".join(started[0])
    assert started[0][0] == "pdsh" and "node-a,node-b" in cmd and "http://mlflow:5000" in cmd
    assert not any(v in cmd for v in secrets.values()), cmd

    monkeypatch.setattr(launcher.os, "environ", {})
    launcher.load_rank_env(run)  # what each rank does first
    assert {k: launcher.os.environ[k] for k in secrets} == secrets
