"""The DAG files: they parse cleanly and cheaply, their shape is pinned, their params validate.

Parsing happens in a fresh interpreter, as Airflow's dag-processor does it, with sockets
refused and a metadata DB that cannot be opened: a DAG file that touched either fails.
"""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import json, socket, sys

    def refuse(*a, **k):
        raise AssertionError("network access while parsing DAG files")

    socket.socket.connect = refuse
    socket.create_connection = refuse
    from airflow.dag_processing.dagbag import BundleDagBag
    from airflow.sdk.exceptions import ParamValidationError
    from airflow.serialization.serialized_objects import DagSerialization

    bag = BundleDagBag(dag_folder=sys.argv[1], bundle_path=sys.argv[1], bundle_name="dags-folder")  # as the dag-processor
    heavy = sorted(m for m in ("torch", "pyspark", "deepspeed", "transformers", "mlflow", "great_expectations")
                   if m in sys.modules)
    out = {"errors": {k: str(v) for k, v in bag.import_errors.items()}, "heavy": heavy, "dags": {}}
    for dag_id, dag in bag.dags.items():
        tasks = {t.task_id: {"upstream": sorted(t.upstream_task_ids), "retries": t.retries,
                             "retry_delay": t.retry_delay.total_seconds() if t.retry_delay else None,
                             "timeout": t.execution_timeout.total_seconds() if t.execution_timeout else None,
                             "max_active_tis_per_dag": t.max_active_tis_per_dag, "type": type(t).__name__}
                 for t in dag.tasks}
        verdicts = {}
        served = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))  # as the API server holds it
        for name, conf in json.loads(sys.argv[2]).items():
            params = served.params.deep_merge(conf)  # what creating a run validates (SerializedDAG.create_dagrun)
            try:
                params.validate()
                verdicts[name] = "ok"
            except ParamValidationError as exc:
                verdicts[name] = f"rejected: {exc}"
        out["dags"][dag_id] = {
            "tasks": tasks, "schedule": str(getattr(served.timetable, "summary", None) or getattr(dag.timetable, "_expression", "")),
            "catchup": dag.catchup, "max_active_runs": dag.max_active_runs, "tags": sorted(dag.tags),
            "doc": bool(dag.doc_md), "params": {k: dag.params.get_param(k).schema for k in dag.params},
            "descriptions": {k: dag.params.get_param(k).description for k in dag.params}, "verdicts": verdicts,
            "defaults": {k: dag.params[k] for k in dag.params},
        }
    print("PROBE" + json.dumps(out))
""")

GOOD = {"corpus": "s3://bucket/corpus/", "output": "s3://bucket/lmpipe", "recipe": "gpt2-124m", "zero_stage": 3,
        "nproc": 8, "nodes": 4, "max_steps": 1000, "train_overrides": ["optim.lr=0.001"]}
BAD = {
    "bad_recipe": {"recipe": "gpt5"},
    "vocab_too_small": {"vocab_size": 100},
    "zero_stage_4": {"zero_stage": 4},
    "ranks_zero": {"nproc": 0},
    "steps_string": {"max_steps": "lots"},
    "margin_over_one": {"margin": 1.5},
    "empty_corpus": {"corpus": ""},
    "override_not_key_value": {"train_overrides": ["rm -rf /"]},
    "override_not_list": {"tokenize_overrides": "seq_len=3"},
}


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-home")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "AIRFLOW_HOME": str(home),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "sqlite:////nonexistent/dir/airflow.db",
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "LMPIPE_HOME": str(home / "lmpipe")}
    confs = {"good": GOOD, **BAD}
    r = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "dags"), json.dumps(confs)], env=env,
                       capture_output=True, text=True, timeout=300)
    line = next((x for x in r.stdout.splitlines() if x.startswith("PROBE")), None)
    assert r.returncode == 0 and line, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(line[len("PROBE"):])


def test_dag_files_import_without_errors_heavy_modules_db_or_network(probe):
    assert probe["errors"] == {}
    assert probe["heavy"] == []
    assert set(probe["dags"]) == {"lm_pipeline", "lm_serving_rollout"}


def test_lm_pipeline_shape_is_pinned(probe):
    dag = probe["dags"]["lm_pipeline"]
    up = {t: v["upstream"] for t, v in dag["tasks"].items()}
    assert up == {"check_corpus": [], "tokenize_shard": ["check_corpus"], "check_shards": ["check_corpus", "tokenize_shard"],
                  "train": ["check_shards"], "evaluate": ["train"], "promote": ["evaluate"]}
    assert dag["tasks"]["tokenize_shard"]["type"] == "TokenizeSubmit"  # a SparkSubmitOperator
    assert dag["schedule"] == "0 2 * * *" and dag["catchup"] is False and dag["max_active_runs"] == 1
    assert {"lmpipe", "training"} <= set(dag["tags"]) and dag["doc"]


def test_every_task_has_retries_delay_and_timeout(probe):
    for dag_id, dag in probe["dags"].items():
        for task_id, t in dag["tasks"].items():
            assert t["retries"] >= 1 and t["retry_delay"] and t["timeout"], (dag_id, task_id, t)


def test_params_have_schema_description_and_default(probe):
    dag = probe["dags"]["lm_pipeline"]
    assert set(dag["params"]) == {"corpus", "output", "recipe", "vocab_size", "seq_len", "curate", "decontaminate",
                                  "zero_stage", "nproc", "nodes",
                                  "max_steps", "warm_start", "margin", "tokenize_overrides", "check_overrides",
                                  "train_overrides", "evaluate_overrides", "promote_overrides"}
    for name, schema in dag["params"].items():
        assert "type" in schema and dag["descriptions"][name], name


def test_params_take_defaults_and_choices_from_the_stages_own_config(probe):
    from registry.promote import PromoteConfig
    from spark_jobs.config import TokenizeConfig
    from training.config import TrainConfig
    from training.recipes import RECIPES

    dag = probe["dags"]["lm_pipeline"]
    tok, train = TokenizeConfig(), TrainConfig()
    assert dag["defaults"]["vocab_size"] == tok.tokenizer.vocab_size and dag["defaults"]["seq_len"] == tok.seq_len
    assert dag["defaults"]["recipe"] == train.recipe and dag["params"]["recipe"]["enum"] == list(RECIPES)
    assert dag["defaults"]["zero_stage"] == train.deepspeed.zero_stage and dag["params"]["zero_stage"]["enum"] == [0, 1, 2, 3]
    assert dag["defaults"]["nproc"] == train.launch.nproc and dag["defaults"]["nodes"] == train.launch.num_nodes
    assert dag["defaults"]["max_steps"] is None and dag["defaults"]["margin"] == PromoteConfig().margin
    from spark_jobs.curate.filters import PRESETS

    assert dag["defaults"]["curate"] == tok.curate.filters == "code" and dag["params"]["curate"]["enum"] == list(PRESETS)


def test_param_schemas_accept_good_and_reject_bad_values(probe):
    verdicts = probe["dags"]["lm_pipeline"]["verdicts"]
    assert verdicts["good"] == "ok"
    for name in BAD:
        assert verdicts[name].startswith("rejected"), (name, verdicts[name])


def test_nightly_schedule_is_set_in_one_place(tmp_path):
    """LMPIPE_NIGHTLY_CRON moves the schedule; nothing else in the DAG hard-codes a time."""
    from lmpipe import settings

    assert settings.SETTINGS["LMPIPE_NIGHTLY_CRON"].default == "0 2 * * *"
    src = (REPO / "dags" / "lm_pipeline.py").read_text()
    assert src.count("LMPIPE_NIGHTLY_CRON") == 1 and "0 2 * * *" not in src


def test_train_runs_on_the_hostfiles_head_node_with_every_argument_quoted(tmp_path, monkeypatch):
    import shlex

    from lmpipe.errors import ConfigError
    from lmpipe_airflow import common
    from lmpipe_airflow import lm_pipeline as tasks

    params = {"corpus": "/data/corpus", "output": "/data/out", "recipe": "llama-1b", "vocab_size": 32000,
              "seq_len": 2048, "zero_stage": 3, "nproc": 8, "nodes": 2, "max_steps": 10, "warm_start": False,
              "margin": 0.01, "train_overrides": ["debug.step_delay_s=0"],
              **{f"{s}_overrides": [] for s in ("tokenize", "check", "evaluate", "promote")}}
    root = str(tmp_path / "runs" / "x; rm -rf ~")
    monkeypatch.delenv("LMPIPE_HOSTFILE", raising=False)
    with pytest.raises(ConfigError, match="LMPIPE_HOSTFILE"):
        tasks.run_config(params, root, None)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# GPU nodes\ngpu-0 slots=8\ngpu-1 slots=8\n")
    monkeypatch.setenv("LMPIPE_HOSTFILE", str(hostfile))
    train = tasks.run_config(params, root, None)["train"]
    assert (train.launch.hostfile, train.launch.num_nodes, train.launch.nproc) == (str(hostfile), 2, 8)
    assert train.debug.step_delay_s == 0 and train.deepspeed.zero_stage == 3
    assert tasks.head_node(str(hostfile)) == "gpu-0"
    args = ["train", "--config", f"{root}/run_config.yaml"]
    cmd = common.stage_command(args, "gpu-0")
    assert cmd[:5] == ["ssh", "-tt", "-o", "BatchMode=yes", "gpu-0"]
    assert shlex.split(cmd[5]) == ["python", "-m", "lmpipe.cli", *args]  # what the remote shell runs, verbatim


PLAN_PARAMS = {"corpus": "/data/corpus", "output": "/data/out", "recipe": "tiny", "vocab_size": 400, "seq_len": 64,
               "zero_stage": 2, "nproc": 2, "nodes": 1, "max_steps": 10, "warm_start": False, "margin": 0.01,
               **{f"{s}_overrides": [] for s in ("tokenize", "check", "train", "evaluate", "promote")}}


@pytest.mark.parametrize("section,item", [
    ("train", "work_dir=/etc"), ("train", "fresh=true"), ("train", "tracking.uri=http://elsewhere:5000"),
    ("train", "storage.endpoint_url=http://elsewhere:9000"), ("train", "launch.hostfile=/tmp/hosts"),
    ("train", "launch.nproc=512"), ("train", "deepspeed.extra.tensorboard.output_path=/etc"),
    ("train", "init_from=s3://elsewhere/model"), ("train", "out=/tmp/x"),
    ("tokenize", "spark_conf.spark.driver.extraJavaOptions=-Dx=y"), ("tokenize", "overwrite=true"),
    ("tokenize", "tokenizer.path=/etc/passwd"), ("tokenize", "spark_master=local[64]"),
    ("check", "results=/tmp/r"), ("evaluate", "tracking.uri=http://elsewhere"), ("promote", "rollback=true"),
])
def test_an_override_outside_the_allowlist_is_refused_naming_the_key(tmp_path, monkeypatch, section, item):
    from lmpipe.errors import ConfigError
    from lmpipe_airflow import lm_pipeline as tasks

    monkeypatch.delenv("LMPIPE_HOSTFILE", raising=False)
    key = item.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{section}_overrides: '{re.escape(key)}' cannot be set from a triggered run"):
        tasks.run_config({**PLAN_PARAMS, f"{section}_overrides": [item]}, str(tmp_path / "run"), None)


def test_allowed_overrides_reach_the_run_config_and_every_allowed_key_is_documented(tmp_path, monkeypatch):
    from lmpipe_airflow import lm_pipeline as tasks

    monkeypatch.delenv("LMPIPE_HOSTFILE", raising=False)
    run = tasks.run_config({**PLAN_PARAMS, "train_overrides": ["optim.lr=0.002", "debug.step_delay_s=0.5",
                                                               "deepspeed.zero_stage=3"],
                            "tokenize_overrides": ["reader.text_field=body", "tokenizer.vocab_size=512"],
                            "promote_overrides": ["report=false"]}, str(tmp_path / "run"), None)
    assert (run["train"].optim.lr, run["train"].debug.step_delay_s, run["train"].deepspeed.zero_stage) == (0.002, 0.5, 3)
    assert (run["tokenize"].reader.text_field, run["tokenize"].tokenizer.vocab_size, run["promote"].report) == \
        ("body", 512, False)
    doc = (REPO / "docs" / "airflow.md").read_text()
    for section, keys in tasks.OVERRIDABLE.items():
        assert all(f"`{k}`" in doc for k in keys), section


KEYS = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID0001", "AWS_SECRET_ACCESS_KEY": "secret/value+example0001",
        "AWS_SESSION_TOKEN": "session-token-example-0001", "AWS_ENDPOINT_URL": "http://minio:9000"}


@pytest.mark.parametrize("master", ["yarn", "local[*]", "spark://master:7077"])
def test_s3_credentials_never_reach_the_spark_submit_command_line(monkeypatch, master):
    """The Spark provider's own hook builds the command: with YARN it turns env_vars into --conf
    arguments, which every user of the machine can read in the process list."""
    from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook
    from lmpipe_airflow.lm_pipeline import submit_env

    monkeypatch.setenv("AIRFLOW_CONN_SPARK_TEST", json.dumps({"conn_type": "spark", "host": master}))
    env_vars, hidden, conf = submit_env(master, dict(KEYS))
    hook = SparkSubmitHook(conn_id="spark_test", env_vars=env_vars, conf=conf)
    cmd = " ".join(hook._build_spark_submit_command("job.py"))
    assert not any(KEYS[k] in cmd for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")), cmd
    process_env = {**(hook._env or {}), **hidden}  # what spark-submit (a client-mode driver) runs with
    assert all(process_env[k] == v for k, v in KEYS.items())


def test_a_kubernetes_master_names_the_secret_and_never_carries_the_keys(monkeypatch):
    from lmpipe_airflow.lm_pipeline import submit_env

    monkeypatch.setenv("LMPIPE_SPARK_K8S_SECRET", "lmpipe-s3")
    env_vars, hidden, conf = submit_env("k8s://https://k8s.example:6443", dict(KEYS))
    assert env_vars == {"AWS_ENDPOINT_URL": "http://minio:9000"}  # the hook puts these on the command line
    assert conf["spark.kubernetes.driver.secretKeyRef.AWS_SECRET_ACCESS_KEY"] == "lmpipe-s3:AWS_SECRET_ACCESS_KEY"
    assert conf["spark.kubernetes.executor.secretKeyRef.AWS_ACCESS_KEY_ID"] == "lmpipe-s3:AWS_ACCESS_KEY_ID"
    assert not any(v in json.dumps(conf) for v in KEYS.values())


def test_one_promote_runs_at_a_time_across_runs(probe):
    tasks = probe["dags"]["lm_pipeline"]["tasks"]
    assert tasks["promote"]["max_active_tis_per_dag"] == 1
