"""The production topology on one machine (``make stack``): PostgreSQL, Redis, S3, Spark standalone,
MLflow, Airflow with Celery workers and the serving job, as real processes on loopback.

The end-to-end run triggers ``lm_pipeline`` over the REST API with corpus and output on S3 and the
credentials only in the ``aws_default`` connection; the scheduler runs every task on the Celery
workers, tokenize goes through ``spark-submit`` to the standalone master, and the promotion's asset
event starts ``lm_serving_rollout`` by itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from stack_live import PORTS, family, free_port, process_env, stack_live

REPO = Path(__file__).resolve().parents[1]
CONF = {"vocab_size": 400, "seq_len": 64, "max_steps": 6, "nproc": 2,
        "train_overrides": ["micro_batch_size=4", "log_every=2"]}


# ---------------------------------------------------------------- without services


def compose_text() -> str:
    return "\n".join(line.split(" #")[0] for line in (REPO / "docker" / "compose.yaml").read_text().splitlines())


def test_stack_and_compose_use_the_same_settings_names_and_defaults():
    from lmpipe import settings
    from lmpipe.stack import services

    text = compose_text()
    published = dict(re.findall(r"\$\{BIND_ADDRESS:-127\.0\.0\.1\}:\$\{([A-Z_]+):-(\d+)\}:", text))
    stack_ports = {s for names in services.PORTS.values() for s in names}
    # every port compose publishes for a service the stack also runs is a stack port, same default
    assert set(published) - {"VLLM_PORT", "MINIO_CONSOLE_PORT"} <= stack_ports
    for name, default in published.items():
        if name in stack_ports:
            assert settings.SETTINGS[name].default == default, name
    # every compose ${NAME:-default} of a setting the stack uses has the stack's value as default
    for name, default in re.findall(r"\$\{([A-Z_]+):-([^}]*)\}", text):
        s = settings.SETTINGS.get(name)
        if s is not None and (s.kind == "stack" or s.stack):
            assert default == (s.stack or s.default), (name, default)
    assert {n for n, s in settings.SETTINGS.items() if s.stack} == {"LMPIPE_CORPUS", "LMPIPE_OUTPUT"}


def test_a_port_in_use_names_the_service_and_starts_nothing(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
           **{s: str(free_port()) for s in PORTS}, "LMPIPE_HOME": str(tmp_path)}
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        env["REDIS_PORT"] = str(held.getsockname()[1])
        r = subprocess.run([sys.executable, "-m", "lmpipe.cli", "stack", "up"], env=env, text=True,
                           capture_output=True, timeout=120, check=False)
    assert r.returncode == 1, r.stderr
    assert f"redis needs 127.0.0.1:{env['REDIS_PORT']} (REDIS_PORT)" in r.stderr
    assert "nothing was started" in r.stderr
    assert not (tmp_path / "stack" / "state.json").exists()


def test_a_bad_replica_count_is_refused_naming_it_and_starts_nothing(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
           **{s: str(free_port()) for s in PORTS}, "LMPIPE_HOME": str(tmp_path), "SERVING_REPLICAS": "two"}
    r = subprocess.run([sys.executable, "-m", "lmpipe.cli", "stack", "up"], env=env, text=True,
                       capture_output=True, timeout=120, check=False)
    assert r.returncode == 1, r.stderr
    assert "SERVING_REPLICAS='two'" in r.stderr
    assert not (tmp_path / "stack" / "state.json").exists()


# ---------------------------------------------------------------- on the stack

@pytest.fixture(scope="module")
def stack():
    t0 = time.monotonic()
    with stack_live() as st:
        st.start_s = time.monotonic() - t0
        yield st


def upload_day(st, demo_corpus_dir: Path, day: str, lines: slice) -> None:
    text = next(demo_corpus_dir.glob("*.jsonl")).read_text().splitlines()[lines]
    st.s3.put_object(Bucket="lmpipe", Key=f"corpus/date={day}/part-0.jsonl", Body="\n".join(text).encode() + b"\n")


def watch(st, run_id: str, faults, timeout: float = 1200) -> str | None:
    """Poll a run until it ends, letting ``faults`` act on its task states; its final state."""
    af, deadline, state = st.airflow, time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            state = af.api("GET", f"/dags/lm_pipeline/dagRuns/{run_id}").json()["state"]
            states = af.task_states("lm_pipeline", run_id)
        except httpx.TransportError:
            time.sleep(1)
            continue
        if state in ("success", "failed"):
            return state
        faults.step(states)
        time.sleep(0.3)
    return state


def run_pipeline(st, conf: dict, faults) -> tuple[str, str, dict]:
    """Trigger lm_pipeline over REST and watch it with ``faults``; (run_id, when it was triggered, what the faults saw)."""
    af = st.airflow
    at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    run = af.trigger("lm_pipeline", conf=conf)
    injected = faults(st, run["dag_run_id"])
    state = watch(st, run["dag_run_id"], injected)
    tasks = af.task_states("lm_pipeline", run["dag_run_id"])
    if state != "success":
        logs = {t: af.task_log("lm_pipeline", run["dag_run_id"], t)[-3000:] for t, s in tasks.items() if s != "success"}
        pytest.fail(f"lm_pipeline {state}: {tasks}, faults saw {injected.seen}\n" + "\n".join(f"--- {t}\n{lg}" for t, lg in logs.items()))
    assert set(tasks.values()) == {"success"}, tasks
    return run["dag_run_id"], at, injected.seen


# The first run checkpoints every 2 steps, slowly enough that its ranks can be killed mid-run.
RANK_KILL = ["save_every=2", "debug.step_delay_s=1"]


class RankKill:
    """SIGKILL the train ranks once a checkpoint is committed on S3; while the task waits for its
    retry, its staging folder goes, as on a fresh pod (an ``emptyDir``)."""

    def __init__(self, st, run_id: str) -> None:
        self.st, self.seen = st, {}
        self.train = f"pipeline/runs/{safe_id(run_id)}/train/"

    def ranks(self) -> list[psutil.Process]:
        """The ranks under the stack's Celery workers (by pid, never by name)."""
        workers = [pid for name, pid in self.st.pids().items() if name.startswith("airflow-worker")]
        out = []
        for p in family(workers):
            try:
                if "training.trainer" in p.cmdline():
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def step(self, states: dict) -> None:
        committed = self.train + "checkpoints/step-00000002/COMMITTED.json"
        if "killed" not in self.seen and states.get("train") == "running" and s3_keys(self.st, "lmpipe", committed):
            ranks = self.ranks()
            cmd = ranks[0].cmdline() if ranks else []
            for p in ranks:
                p.kill()
            psutil.wait_procs(ranks, timeout=30)
            self.seen["killed"] = {"pids": [p.pid for p in ranks], "run_dir": cmd[cmd.index("--run-dir") + 1] if cmd else None,
                                   "done_before": bool(s3_keys(self.st, "lmpipe", self.train + "export/"))}
        if "killed" in self.seen and "wiped" not in self.seen and states.get("train") == "up_for_retry":
            shutil.rmtree(self.seen["killed"]["run_dir"])
            self.seen["wiped"] = True


@pytest.fixture(scope="module")
def first_run(stack, demo_corpus_dir):
    """The first run on the stack; its train ranks are SIGKILLed after the first checkpoint."""
    upload_day(stack, demo_corpus_dir, "2026-11-20", slice(0, 90))
    for dag_id in ("lm_pipeline", "lm_serving_rollout"):
        stack.airflow.unpause(dag_id)
    conf = {**CONF, "train_overrides": CONF["train_overrides"] + RANK_KILL}
    run_id, at, seen = run_pipeline(stack, conf, RankKill)
    return {"run_id": run_id, "at": at, "seen": seen}


def s3_keys(st, bucket: str, prefix: str) -> set[str]:
    pages = st.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


@pytest.mark.slow
def test_a_second_stack_up_is_a_no_op(stack):
    before = stack.pids()
    t0 = time.monotonic()
    r = stack.cli("up", timeout=300)
    assert r.returncode == 0, r.stderr
    assert stack.pids() == before
    assert time.monotonic() - t0 < 60
    for what in ("Airflow UI/API", "MLflow", "serving", "S3 endpoint", "Spark master", stack.secrets["AIRFLOW_ADMIN_PASSWORD"]):
        assert what in r.stdout, what


@pytest.mark.slow
def test_an_s3_run_on_the_stack_promotes_and_the_asset_event_rolls_it_out(stack, first_run):
    from lmpipe_airflow.lm_pipeline import safe_run_id

    run_id = first_run["run_id"]
    root = f"pipeline/runs/{safe_run_id(run_id)}"
    keys = {k[len(root) + 1:] for k in s3_keys(stack, "lmpipe", root)}
    for key in ("run_config.yaml", "checks/corpus/result.json", "shards/manifest.json", "checks/shards/result.json",
                "train/mlflow_run.json", "train/model_version.json", "train/export/model.safetensors",
                "train/eval/metrics.json", "train/report/index.html", "COMPLETED.json"):
        assert key in keys, key

    def read(key):
        return stack.s3.get_object(Bucket="lmpipe", Key=f"{root}/{key}")["Body"].read()

    assert json.loads(read("COMPLETED.json"))["decision"] == "promoted"
    version = str(json.loads(read("train/model_version.json"))["version"])
    assert json.loads(read("train/eval/metrics.json"))["candidate"]["version"] == version
    # MLflow's artifacts (the registered model's files) are in the bucket, behind the tracking server
    assert any(k.endswith("model/model.safetensors") for k in s3_keys(stack, "mlflow", "artifacts/"))
    # tokenize went through spark-submit to the standalone master, whose executors wrote the shards
    apps = httpx.get(stack.url("SPARK_UI_PORT") + "/json/", trust_env=False).json()["completedapps"]
    assert any(a["name"].startswith("lmpipe-tokenize") for a in apps), apps
    tok_log = stack.airflow.task_log("lm_pipeline", run_id, "tokenize_shard")
    assert f"spark://127.0.0.1:{stack.env['SPARK_MASTER_PORT']}" in tok_log
    # the report link in the promote task's log is presigned: it opens with no credentials
    promote_log = stack.airflow.task_log("lm_pipeline", run_id, "promote")
    report = re.search(r"lmpipe:   report: (\S+)", promote_log).group(1)
    page = httpx.get(report.replace("\\u0026", "&"), timeout=30, trust_env=False)
    assert page.status_code == 200 and "lmpipe run report" in page.text

    rollout = stack.wait_rollout(after=first_run["at"])
    assert rollout["state"] == "success" and rollout["run_type"] == "asset_triggered", rollout
    with stack.serving() as c:  # through HAProxy
        assert str(c.get("/v1/models").json()["data"][0]["version"]) == version
        r = c.post("/v1/completions", json={"model": "lmpipe", "prompt": "def ", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"], r.text
    first = int(stack.env["SERVING_REPLICA_PORT"])
    for i in range(2):  # and each replica, directly
        r = httpx.get(f"http://127.0.0.1:{first + i}/v1/models", trust_env=False, timeout=30,
                      headers={"Authorization": f"Bearer {stack.secrets['LMPIPE_API_KEY']}"})
        assert str(r.json()["data"][0]["version"]) == version, r.text


@pytest.mark.slow
def test_fault_train_ranks_killed_the_retry_on_a_fresh_staging_folder_resumes_from_s3(stack, first_run, tmp_path):
    """The ranks die after a checkpoint went up; Airflow retries the task on an empty staging
    folder, which resumes from S3 and ends with the weights of an uninterrupted run."""
    import torch
    from safetensors.torch import load, load_file

    seen = first_run["seen"]
    assert seen.get("killed") and seen["killed"]["pids"] and seen.get("wiped"), seen
    assert not seen["killed"]["done_before"], "the run had finished before its ranks were killed"
    run_id = first_run["run_id"]
    assert "lmpipe train exited with code" in stack.airflow.task_log("lm_pipeline", run_id, "train", attempt=1)
    retry = stack.airflow.task_log("lm_pipeline", run_id, "train", attempt=2)
    assert "restored train_config.json" in retry and "resumed from" in retry and "pass --fresh" not in retry, retry[-3000:]

    train = f"pipeline/runs/{safe_id(run_id)}/train"
    cfg = json.loads(stack.s3.get_object(Bucket="lmpipe", Key=f"{train}/train_config.json")["Body"].read())
    cfg |= {"out": str(tmp_path / "straight"), "work_dir": None, "debug": {}, "init_from": None,
            "tracking": {"enabled": False}}
    (tmp_path / "straight.json").write_text(json.dumps(cfg))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": stack.secrets["AWS_ACCESS_KEY_ID"],
           "AWS_SECRET_ACCESS_KEY": stack.secrets["AWS_SECRET_ACCESS_KEY"], "AWS_ENDPOINT_URL": stack.url("MINIO_PORT")}
    r = subprocess.run([sys.executable, "-m", "lmpipe.cli", "train", "--config", str(tmp_path / "straight.json")],
                       env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout + r.stderr[-5000:]
    assert "resumed from" not in r.stderr
    straight = load_file(tmp_path / "straight" / "export" / "model.safetensors")
    retried = load(stack.s3.get_object(Bucket="lmpipe", Key=f"{train}/export/model.safetensors")["Body"].read())
    assert straight.keys() == retried.keys() and all(torch.equal(straight[k], retried[k]) for k in straight)


@pytest.mark.slow
def test_task_outputs_are_extra_link_buttons_that_open_from_the_browser(stack, first_run):
    """The plugin's buttons: the api-server presigns s3:// outputs when asked, so they open with no keys."""
    from urllib.parse import quote

    from playwright.sync_api import expect, sync_playwright

    from browser import ARTIFACTS

    af, run_id = stack.airflow, first_run["run_id"]

    def links(task_id: str) -> dict:
        r = af.api("GET", f"/dags/lm_pipeline/dagRuns/{run_id}/taskInstances/{task_id}/links")
        assert r.status_code == 200, r.text
        return r.json()["extra_links"]

    shards, promote = links("check_shards"), links("promote")
    manifest = httpx.get(shards["Shard manifest"], timeout=30, trust_env=False)
    assert manifest.status_code == 200 and json.loads(manifest.content)["splits"]["train"]["shards"]
    docs = httpx.get(shards["Data Docs"], timeout=30, trust_env=False)
    assert docs.status_code == 200 and "<html" in docs.text.lower()
    report = httpx.get(promote["Report"], timeout=30, trust_env=False)
    assert report.status_code == 200 and "lmpipe run report" in report.text
    assert promote["MLflow run"].startswith(stack.url("MLFLOW_PORT") + "/#/experiments/")
    assert promote["Model version"].startswith(stack.url("MLFLOW_PORT") + "/#/models/lmpipe/versions/")
    assert not links("train").get("Report")  # a button only where the task made that output

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        try:
            af.login(page)
            page.wait_for_url(re.compile(r"127\.0\.0\.1:\d+/?$"))
            # the task instance's Details tab lists its extra links
            page.goto(f"{af.url}/dags/lm_pipeline/runs/{quote(run_id, safe='')}/tasks/promote/details")
            button = page.get_by_role("link", name="Report", exact=True)
            expect(button).to_be_visible(timeout=30_000)
            href = button.get_attribute("href")
            assert href and "Signature=" in href and href.startswith(stack.url("MINIO_PORT")), href
            for name in ("MLflow run", "Model version"):
                expect(page.get_by_role("link", name=name, exact=True)).to_be_visible()
            page.screenshot(path=ARTIFACTS / "airflow-ui-extra-links.png", full_page=True)
            opened = browser.new_page()
            opened.goto(href)
            assert "lmpipe run report" in opened.content()
        except Exception:
            page.screenshot(path=ARTIFACTS / "airflow-ui-extra-links-failed.png", full_page=True)
            raise
        finally:
            browser.close()


@pytest.mark.slow
def test_no_stack_process_holds_s3_credentials_in_its_environment(stack, first_run):
    procs = family(stack.pids().values())
    assert len(procs) >= len(stack.pids())
    leaks = {}
    for p in procs:
        try:
            keys = [k for k in process_env(p.pid) if k.startswith("AWS_")]
        except (OSError, psutil.Error):
            continue
        if keys:
            leaks[f"{p.pid} {' '.join(p.cmdline()[:3])}"] = keys
    assert leaks == {}


# ---------------------------------------------------------------- a nightly-style run, with faults


class Faults:
    """Injects the faults into a running lm_pipeline run, each at its moment, and notes what it saw."""

    def __init__(self, st, run_id: str) -> None:
        self.st, self.run_id, self.seen = st, run_id, {}
        self.shards = f"pipeline/runs/{safe_id(run_id)}/shards/"

    def pid(self, name: str) -> int:
        return self.st.pids()[name]

    def s3_pause(self) -> None:
        """The S3 endpoint stops answering for 20 s once the first shard file is up, before the manifest."""
        keys = s3_keys(self.st, "lmpipe", self.shards)
        if any(not k.endswith("manifest.json") for k in keys):
            pid = self.pid("s3")
            os.kill(pid, signal.SIGSTOP)
            self.seen["s3"] = {"manifest_before": any(k.endswith("manifest.json") for k in keys), "shards": len(keys)}
            time.sleep(20)
            os.kill(pid, signal.SIGCONT)

    def kill_scheduler(self) -> None:
        """SIGKILL the scheduler mid-train, then `lmpipe stack up` starts it again."""
        old = self.pid("airflow-scheduler")
        os.killpg(old, signal.SIGKILL)  # the scheduler and its children: its session's group
        psutil.wait_procs([psutil.Process(old)], timeout=10) if psutil.pid_exists(old) else None
        r = self.st.cli("up", timeout=300)
        assert r.returncode == 0, r.stderr
        self.seen["scheduler"] = {"old": old, "new": self.pid("airflow-scheduler"), "restarted": "starting it again" in r.stderr}

    def stop_mlflow(self) -> None:
        """The MLflow server dies between evaluate and promote."""
        os.killpg(self.pid("mlflow"), signal.SIGKILL)
        self.seen["mlflow"] = {"killed_at": time.monotonic()}

    def step(self, states: dict) -> None:
        if "s3" not in self.seen and states.get("tokenize_shard") == "running":
            self.s3_pause()
        if "scheduler" not in self.seen and states.get("train") == "running":
            self.kill_scheduler()
        if "mlflow" not in self.seen and states.get("evaluate") == "success":
            self.stop_mlflow()
        if "mlflow" in self.seen and "mlflow_back" not in self.seen and states.get("promote") == "up_for_retry":
            r = self.st.cli("up", timeout=300)
            assert r.returncode == 0, r.stderr
            self.seen["mlflow_back"] = True


def safe_id(run_id: str) -> str:
    from lmpipe_airflow.lm_pipeline import safe_run_id

    return safe_run_id(run_id)


@pytest.fixture(scope="module")
def faulted_run(stack, first_run, demo_corpus_dir):
    """A second run on a new date= partition, with the S3 endpoint paused during the shard upload,
    the scheduler killed mid-train and MLflow down when promote starts."""
    from mlflow import MlflowClient

    upload_day(stack, demo_corpus_dir, "2026-11-21", slice(90, 160))
    af = stack.airflow
    run_id = af.trigger("lm_pipeline", conf={**CONF, "margin": 0})["dag_run_id"]
    faults = Faults(stack, run_id)
    state = watch(stack, run_id, faults)
    tasks = af.task_states("lm_pipeline", run_id)
    from registry import tracking

    client = MlflowClient(stack.url("MLFLOW_PORT"))
    model = client.get_registered_model("lmpipe")
    return {"run_id": run_id, "state": state, "tasks": tasks, "seen": faults.seen,
            "history": tracking.champion_history(client, "lmpipe"), "champion": model.aliases.get("champion")}


@pytest.mark.slow
def test_a_second_run_on_new_data_is_incremental_and_warm_started(stack, first_run, faulted_run):
    run_id = faulted_run["run_id"]
    assert faulted_run["state"] == "success", (faulted_run["tasks"], faulted_run["seen"])
    plan_log = stack.airflow.task_log("lm_pipeline", run_id, "check_corpus")
    first_shards = f"s3://lmpipe/pipeline/runs/{safe_id(first_run['run_id'])}/shards"
    assert f"incremental run on top of {first_shards}" in plan_log
    cfg = yaml.safe_load(stack.s3.get_object(Bucket="lmpipe", Key=f"pipeline/runs/{safe_id(run_id)}/run_config.yaml")
                         ["Body"].read())
    assert cfg["tokenize"]["base"] == first_shards
    assert cfg["train"]["init_from"] == "models:/lmpipe@champion"
    assert "warm start" in stack.airflow.task_log("lm_pipeline", run_id, "train")


@pytest.mark.slow
def test_fault_s3_endpoint_away_20s_during_shard_upload_then_the_run_finishes(stack, faulted_run):
    seen = faulted_run["seen"].get("s3")
    assert seen and not seen["manifest_before"], faulted_run["seen"]  # paused mid-upload, before the manifest
    assert faulted_run["tasks"]["tokenize_shard"] == "success" and faulted_run["tasks"]["check_shards"] == "success"
    keys = s3_keys(stack, "lmpipe", f"pipeline/runs/{safe_id(faulted_run['run_id'])}/shards/")
    assert any(k.endswith("manifest.json") for k in keys)


@pytest.mark.slow
def test_fault_scheduler_killed_mid_run_and_restarted_the_run_completes(stack, faulted_run):
    seen = faulted_run["seen"].get("scheduler")
    assert seen and seen["restarted"] and seen["new"] != seen["old"], faulted_run["seen"]
    assert not psutil.pid_exists(seen["old"]) or psutil.Process(seen["old"]).status() == psutil.STATUS_ZOMBIE
    assert faulted_run["state"] == "success" and set(faulted_run["tasks"].values()) == {"success"}


@pytest.mark.slow
def test_fault_mlflow_down_at_promote_the_retry_promotes_exactly_once(stack, faulted_run):
    assert "mlflow" in faulted_run["seen"] and faulted_run["seen"].get("mlflow_back"), faulted_run["seen"]
    run_id = faulted_run["run_id"]
    first_try = stack.airflow.task_log("lm_pipeline", run_id, "promote", attempt=1)
    assert first_try and "lmpipe promote exited with code" in first_try
    assert faulted_run["tasks"]["promote"] == "success"
    done = json.loads(stack.s3.get_object(Bucket="lmpipe", Key=f"pipeline/runs/{safe_id(run_id)}/COMPLETED.json")
                      ["Body"].read())
    assert done["decision"] == "promoted"
    assert faulted_run["history"].count(str(done["version"])) == 1, faulted_run["history"]
    assert faulted_run["history"][-1] == str(done["version"]) == str(faulted_run["champion"])


def submit_tokenize(st, out: str) -> subprocess.Popen:
    """``lmpipe tokenize`` through spark-submit to the stack's standalone master, as the task runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"AWS_ACCESS_KEY_ID": st.secrets["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": st.secrets["AWS_SECRET_ACCESS_KEY"],
            "AWS_ENDPOINT_URL": st.url("MINIO_PORT"), "AWS_DEFAULT_REGION": "us-east-1",
            "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    master = f"spark://127.0.0.1:{st.env['SPARK_MASTER_PORT']}"
    cmd = [str(Path(sys.executable).with_name("spark-submit")), "--master", master, "--name", "fault-tokenize",
           str(REPO / "spark_jobs" / "tokenize_shard.py"), "--corpus", "s3://lmpipe/corpus/", "--out", out,
           "--vocab-size", "400", "--seq-len", "64", "partition_mb=1", "shard_sequences=256"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def shard_digests(st, prefix: str) -> dict[str, str]:
    """sha256 of every shard file under ``prefix``, read back from S3 (not from the manifest)."""
    import hashlib

    return {k[len(prefix):]: hashlib.sha256(st.s3.get_object(Bucket="lmpipe", Key=k)["Body"].read()).hexdigest()
            for k in s3_keys(st, "lmpipe", prefix) if not k.endswith(".json")}


@pytest.mark.slow
def test_fault_spark_worker_killed_mid_tokenize_spark_reschedules_same_shards(stack, faulted_run):
    calm = submit_tokenize(stack, "s3://lmpipe/faults/calm")
    out = calm.communicate(timeout=600)[0]
    assert calm.returncode == 0, out[-4000:]

    hit = submit_tokenize(stack, "s3://lmpipe/faults/hit")
    killed, deadline = None, time.monotonic() + 300
    while killed is None and hit.poll() is None and time.monotonic() < deadline:
        workers = httpx.get(stack.url("SPARK_UI_PORT") + "/json/", trust_env=False).json()["workers"]
        if len([w for w in workers if w["state"] == "ALIVE" and w["coresused"] > 0]) == 2:
            killed = stack.pids()["spark-worker-1"]
            os.killpg(killed, signal.SIGKILL)  # the worker and its executor, mid-job
        time.sleep(0.2)
    out = hit.communicate(timeout=600)[0]
    assert killed is not None, "no moment with executors on both workers: " + out[-2000:]
    assert hit.returncode == 0, out[-4000:]
    calm_digests = shard_digests(stack, "faults/calm/")
    assert calm_digests and shard_digests(stack, "faults/hit/") == calm_digests
    r = stack.cli("up", timeout=300)  # the stack starts the lost worker again
    assert r.returncode == 0 and "spark-worker-1 is no longer running" in r.stderr, r.stderr


@pytest.mark.slow
def test_stack_down_stops_exactly_what_it_started(stack, first_run):
    procs = family(stack.pids().values())
    outsider = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # not the stack's
    try:
        r = stack.cli("down", timeout=300)
        assert r.returncode == 0, r.stderr
        gone, alive = psutil.wait_procs(procs, timeout=10)
        assert alive == [], alive
        assert outsider.poll() is None
        assert stack.cli("status").stdout.strip() == ""
    finally:
        outsider.kill()
        outsider.wait()
