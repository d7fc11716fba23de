"""lm_pipeline end to end under ``airflow dags test``: real Airflow (SQLite metadata DB), real
spark-submit on local[2], real DeepSpeed ranks, real MLflow registry.

The end-to-end run on the stages' defaults is the one ``make demo`` makes (the shared ``demo``
fixture); the refusals, the corrupt shard and the rollout run in an Airflow home of their own."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
INJECT = "$(touch {canary}); rm -rf ~"


def airflow(env: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "airflow"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=env["HOME"])


def conf(corpus, output: str, **kw) -> str:
    # The corpus keeps its text under "content": the form reaches the reader through tokenize_overrides.
    return json.dumps({"corpus": str(corpus), "output": output, "vocab_size": 400, "seq_len": 64, "max_steps": 6,
                       "nproc": 2, "warm_start": False, "tokenize_overrides": ["reader.text_field=content"],
                       "train_overrides": ["micro_batch_size=4", "log_every=2"], **kw})


def cli_json(r: subprocess.CompletedProcess):
    """The JSON document an ``airflow ... -o json`` command printed (after any log lines)."""
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(next(x for x in reversed(r.stdout.splitlines()) if x.startswith(("[", "{"))))


def runs(env: dict) -> list[dict]:
    return sorted(cli_json(airflow(env, "dags", "list-runs", "lm_pipeline", "-o", "json")),
                  key=lambda x: x["start_date"] or "")


def task_states(env: dict, run_id: str) -> dict:
    r = airflow(env, "tasks", "states-for-dag-run", "lm_pipeline", run_id, "-o", "json")
    return {t["task_id"]: t["state"] for t in cli_json(r)}


def champion(env: dict) -> str | None:
    r = subprocess.run([sys.executable, "-m", "lmpipe.cli", "models"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for line in r.stdout.splitlines():
        if "champion" in line and line.split()[0].isdigit():
            return line.split()[0]
    return None


@pytest.fixture(scope="module")
def af(tmp_path_factory, demo_corpus_dir):
    """An Airflow home with a migrated SQLite DB, the project's DAGs, and a HOME with a sentinel."""
    root = tmp_path_factory.mktemp("af")
    home = root / "home"
    home.mkdir()
    (home / "sentinel").write_text("rm -rf ~ must never reach this")
    lines = next(Path(demo_corpus_dir).glob("*.jsonl")).read_text().splitlines()[:500]
    docs = [{"id": d["id"], "content": d["text"]} for d in map(json.loads, lines)]
    corpus = write_jsonl(root / "corpus" / "date=2026-11-20" / "part-0.jsonl", docs).parent.parent
    env = {**os.environ, "HOME": str(home), "AIRFLOW_HOME": str(root / "airflow"),
           "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[2]"}),
           "LMPIPE_HOME": str(root / "lmpipe"), "PYTHONPATH": str(REPO)}
    r = airflow(env, "db", "migrate")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return {"env": env, "root": root, "corpus": corpus}


@pytest.fixture(scope="module")
def first_run(demo):
    """The demo's ``airflow dags test`` run of lm_pipeline on the stages' defaults (read only)."""
    from lmpipe_airflow.demo import airflow_env

    env = {**airflow_env(demo["home"]), "HOME": str(demo["shell_home"])}
    return {"log": demo["log"], "output": env["LMPIPE_OUTPUT"], "run": runs(env)[0], "env": env,
            "home": demo["home"]}


def test_dags_test_runs_end_to_end_and_leaves_a_champion(first_run):
    run, log = first_run["run"], first_run["log"]
    assert run["state"] == "success", log[-6000:]
    assert set(task_states(first_run["env"], run["run_id"]).values()) == {"success"}
    assert champion(first_run["env"]) is not None
    out = Path(first_run["output"]) / "runs" / run["run_id"].replace(":", "_").replace("+", "_")
    assert json.loads((out / "COMPLETED.json").read_text())["decision"] == "promoted"
    assert (out / "shards" / "manifest.json").is_file() and (out / "train" / "export" / "model.safetensors").is_file()
    # each task's log ends with links to what it produced
    for what in ("data docs: file://", "shard manifest: file://", "mlflow run: http", "model version: http",
                 "report: file://"):
        assert f"lmpipe:   {what}" in log, what
    assert "promotion promoted" in log


def test_every_stage_writes_its_resolved_config_and_its_outputs_point_at_it(first_run):
    import hashlib

    import yaml

    from lmpipe_airflow.lm_pipeline import safe_run_id
    from registry import tracking
    from spark_jobs.config import TokenizeConfig

    assert first_run["run"]["state"] == "success"
    out = Path(first_run["output"]) / "runs" / safe_run_id(first_run["run"]["run_id"])
    run_config = yaml.safe_load((out / "run_config.yaml").read_text())
    # the stages' own defaults, the one param the demo sets, and the recipe's values
    assert run_config["tokenize"]["seq_len"] == TokenizeConfig().seq_len
    assert run_config["train"]["max_steps"] == 4  # DEMO_STEPS, the one param the demo sets
    m = json.loads((out / "shards" / "manifest.json").read_text())
    assert json.loads((out / "shards" / m["config_file"]).read_text())["seq_len"] == TokenizeConfig().seq_len
    marker_file = sorted((out / "train" / "checkpoints").glob("step-*/COMMITTED.json"))[-1]
    marker = json.loads(marker_file.read_text())
    config = (marker_file.parent / marker["config"]).resolve()
    assert config == out / "train" / "train_config.json"
    assert hashlib.sha256(config.read_bytes()).hexdigest() == marker["config_sha256"]
    train = json.loads(config.read_text())
    assert (train["micro_batch_size"], train["optim"]["lr"], train["max_steps"]) == (8, 3e-3, 4)  # recipe, recipe, param
    version = json.loads((out / "train" / "model_version.json").read_text())["version"]
    prior = os.environ.get("MLFLOW_TRACKING_URI")  # tracking.client exports the URI to this process
    c = tracking.client(tracking.TrackingConfig(uri=f"sqlite:///{first_run['home'] / 'mlflow.db'}"))
    try:
        assert c.get_model_version("lmpipe", str(version)).tags["lmpipe.config"] == str(config)
    finally:
        import mlflow

        mlflow.set_tracking_uri(prior)
    metrics = json.loads((out / "train" / "eval" / "metrics.json").read_text())
    assert json.loads((out / "train" / "eval" / metrics["config_file"]).read_text())["shards"] == str(out / "shards")


def test_hostile_param_value_is_refused_before_anything_runs(af):
    """An output param carrying shell syntax fails the first task at once, naming the param:
    no shell ever sees it (multi-node launchers pass arguments to remote shells)."""
    root, env = af["root"], af["env"]
    output = f"{root}/out2/" + INJECT.format(canary=root / "pwned")
    r = airflow(env, "dags", "test", "lm_pipeline", "-c", conf(af["corpus"], output), timeout=600)
    log = r.stdout + r.stderr
    assert runs(env)[-1]["state"] == "failed", log[-3000:]
    assert "param 'output'" in log and "characters a URI here may not hold" in log, log[-3000:]
    assert not (root / "pwned").exists() and not (root / "out2").exists()
    assert (root / "home" / "sentinel").is_file()


def test_corrupt_shard_and_planted_contamination_fail_check_shards_and_never_train(af):
    """A spark-submit on PATH that runs the real job, then flips bytes in one shard it wrote
    (the job's only argument is the run config, which names the shard set); and the run's
    evaluation texts (the ``decontaminate`` param) hold one of the corpus's documents."""
    env, root = dict(af["env"]), af["root"]
    first = json.loads(next(af["corpus"].rglob("*.jsonl")).read_text().splitlines()[0])
    evals = write_jsonl(root / "evals" / "heldout.jsonl", [{"text": first["content"]}])
    before = champion(env)
    bindir = root / "bin"
    bindir.mkdir()
    wrapper = bindir / "spark-submit"
    wrapper.write_text(f"""#!/bin/sh
"{VENV_BIN / 'spark-submit'}" "$@" || exit $?
while [ "$1" != "--config" ]; do shift; done
out=$("{VENV_BIN / 'python'}" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['tokenize']['out'])" "$2")
shard=$(ls "$out"/train/*.parquet | head -1)
printf 'corrupt' | dd of="$shard" bs=1 seek=100 conv=notrunc 2>/dev/null
""")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    env["PATH"] = f"{bindir}:{env['PATH']}"
    r = airflow(env, "dags", "test", "lm_pipeline", "-c", conf(af["corpus"], f"{root}/out2", decontaminate=str(evals)),
                timeout=900)
    run = runs(env)[-1]
    states = task_states(env, run["run_id"])
    assert run["state"] == "failed", r.stdout[-4000:]
    assert states["tokenize_shard"] == "success" and states["check_shards"] == "failed", states
    assert states["train"] in ("upstream_failed", None), states
    assert not list((root / "out2" / "runs").glob("*/train")), "train must never start on bad shards"
    assert champion(env) == before
    out = next((root / "out2" / "runs").glob("*"))
    result = json.loads((out / "checks" / "shards" / "result.json").read_text())
    failed = {(f["table"], f["kwargs"].get("column")) for f in result["failed"]}
    assert {("shards", "sha256_matches"), ("dataset", "contaminated_documents")} <= failed, failed
    # the text field set in tokenize_overrides reached the corpus gate and the job
    assert json.loads((out / "checks" / "corpus" / "result.json").read_text())["config"]["reader"]["text_field"] == "content"
    m = json.loads((out / "shards" / "manifest.json").read_text())
    assert json.loads((out / "shards" / m["config_file"]).read_text())["reader"]["text_field"] == "content"


def test_rollout_rolls_replicas_one_at_a_time_under_load_and_rolls_back_a_broken_one(af, real_shards, tmp_path):
    """Two replicas behind HAProxy and a bounded load through it for the whole of both rollouts:
    zero failed requests, each replica drained in turn (never both), and the broken version
    leaves every replica on the old one and in rotation."""
    # mlflow.set_tracking_uri (called by tracking.client) exports MLFLOW_TRACKING_URI to this process's
    # environment: point it back where it was, or later tests' subprocesses use this test's registry
    prior = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        _rollout(af, real_shards, tmp_path)
    finally:
        import mlflow

        mlflow.set_tracking_uri(prior)
        assert os.environ.get("MLFLOW_TRACKING_URI") == prior


def _rollout(af, real_shards, tmp_path):
    import shutil

    from lb_helpers import Load, StateLog, haproxy, replicas
    from lmpipe_airflow.lm_serving_rollout import served
    from registry import tracking
    from serving_helpers import make_champion, register, tiny_export

    tcfg = tracking.TrackingConfig(uri=f"sqlite:///{af['root'] / 'lmpipe' / 'mlflow.db'}")
    c = tracking.client(tcfg)
    v1 = register(tiny_export(tmp_path / "v1", real_shards, seed=3), "lmpipe", tcfg)
    make_champion(c, v1)
    with replicas(2, "models:/lmpipe@champion", tmp_path / "replicas", env={"MLFLOW_TRACKING_URI": tcfg.uri}) as reps, \
            haproxy({n: a for n, (a, _) in reps.items()}, tmp_path / "lb") as (url, rt):
        urls = {name: f"http://{addr}" for name, (addr, _) in reps.items()}
        env = {**af["env"], "LMPIPE_SERVE_URL": url, "LMPIPE_LB_ADMIN": rt.address, "MLFLOW_TRACKING_URI": tcfg.uri}
        model = served(url)["id"]
        v2 = register(tiny_export(tmp_path / "v2", real_shards, seed=7), "lmpipe", tcfg)
        make_champion(c, v2)
        with StateLog(rt) as states, Load(url, model, clients=4, max_s=400) as load:
            load.wait_for(10)
            r = airflow(env, "dags", "test", "lm_serving_rollout")
            load.wait_for(10)
        assert "smoke completion" in r.stdout, r.stdout[-4000:]
        assert load.failures == [], load.failures[:5]
        assert {str(served(u)["version"]) for u in urls.values()} == {v2}
        for name in urls:  # each replica left rotation once, and came back
            assert states.statuses(name) == ["UP", "DRAIN", "UP"], states.seen
        assert not any(set(snap.values()) == {"DRAIN"} for snap in states.seen), states.seen

        broken = tmp_path / "broken"
        shutil.copytree(tmp_path / "v2", broken)
        data = (broken / "model.safetensors").read_bytes()
        (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
        v3 = register(broken, "lmpipe", tcfg)
        make_champion(c, v3)
        with Load(url, model, clients=4, max_s=400) as load:
            load.wait_for(10)
            r = airflow(env, "dags", "test", "lm_serving_rollout")
            load.wait_for(10)
        assert f"rolled back to v{v2}" in r.stdout + r.stderr, r.stdout[-4000:]
        assert load.failures == [], load.failures[:5]
        assert str(tracking.alias_version(c, "lmpipe", tracking.CHAMPION).version) == v2
        assert {str(served(u)["version"]) for u in urls.values()} == {v2}
        assert all(s.in_rotation for s in rt.servers()), rt.servers()
    rollout_runs = cli_json(airflow(af["env"], "dags", "list-runs", "lm_serving_rollout", "-o", "json"))
    assert sorted(r["state"] for r in rollout_runs) == ["failed", "success"]
