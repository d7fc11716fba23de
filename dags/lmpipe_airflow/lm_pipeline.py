"""What ``lm_pipeline``'s tasks do (``dags/lm_pipeline.py`` keeps its params and wiring).

The first task resolves one run config from the trigger's params and the stages' own
defaults and writes it to ``<output>/runs/<run_id>/run_config.yaml``; every later task hands
its stage ``--config`` that file and nothing else, and each stage reads only its section.
Every task writes only under the run root, so clearing and re-running a task is safe, and
``train`` resumes from its newest committed checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import shutil
import sys
from pathlib import Path

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

from lmpipe import settings
from lmpipe.errors import ConfigError, ExitCode
from lmpipe.log import log
from lmpipe.storage import check_uri, join, open_store
from lmpipe_airflow.common import checkpoint_env, link, links, s3_access, s3_env, stage

COMPLETED = "COMPLETED.json"  # written by the last task: this run's shards may seed the next nightly run
RUN_CONFIG = "run_config.yaml"
SECTIONS = ("tokenize", "check", "train", "evaluate", "promote")


def safe_run_id(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]", "_", run_id)


def run_root(output: str, run_id: str) -> str:
    """``<output>/runs/<run_id>`` with the run id made safe as one path segment."""
    return join(output, "runs", safe_run_id(run_id))


def default_corpus() -> str:
    return settings.get("LMPIPE_CORPUS") or str(settings.home() / "demo" / "corpus")


def default_output() -> str:
    return settings.get("LMPIPE_OUTPUT") or str(settings.home() / "pipeline")


# ---------------------------------------------------------------- the run config

# The keys a triggered run may set through the ``*_overrides`` params ("x.*": every key under x).
# Paths, credentials' destinations (``storage.*``, ``tracking.*``), Spark and launcher settings,
# ``fresh``/``overwrite``/``work_dir`` and raw DeepSpeed config stay with the DAG and the deployment:
# anyone who can trigger a run could otherwise delete folders or send the keys elsewhere.
OVERRIDABLE = {
    "tokenize": ("validation_fraction", "partition_mb", "shard_sequences", "compression", "dedup", "reader.*",
                 "curate.filters", "curate.languages", "curate.keep_removed", "curate.removed_sample",
                 "curate.decontaminate_ngram", "curate.near_dedup.*",
                 "tokenizer.vocab_size", "tokenizer.eos_token", "tokenizer.special_tokens", "tokenizer.min_frequency",
                 "tokenizer.train_sample_mb"),
    "check": ("min_documents", "min_doc_chars", "max_doc_chars", "max_out_of_bounds_fraction", "max_null_text_fraction",
              "max_duplicate_rate", "max_skipped_fraction", "min_validation_sequences", "eos_rate_tolerance", "workers",
              "max_removed_fraction", "max_removed_fraction_by_step.*", "max_contaminated_documents",
              "min_kept_language_share", "reader.*"),
    "train": ("model.*", "micro_batch_size", "grad_accum", "global_batch_size", "max_steps", "seed", "save_every",
              "keep_checkpoints", "log_every", "nan_abort_after", "prefetch", "optim.*", "deepspeed.zero_stage",
              "deepspeed.offload_optimizer", "deepspeed.offload_params", "deepspeed.precision",
              "deepspeed.activation_checkpointing", "debug.*"),
    "evaluate": ("batch_size", "max_sequences", "sample_tokens", "compare_champion", "seed"),
    "promote": ("margin", "report"),
}


def overridable(section: str, key: str) -> bool:
    return any(key == k or (k.endswith(".*") and key.startswith(k[:-1])) for k in OVERRIDABLE[section])


def check_overrides(overrides: dict[str, list[str]]) -> None:
    """Refuse an override of a key outside :data:`OVERRIDABLE`, naming it and what is allowed."""
    for section, items in overrides.items():
        for item in items or []:
            key = item.split("=", 1)[0].strip()
            if not overridable(section, key):
                raise ConfigError(f"{section}_overrides: {key!r} cannot be set from a triggered run "
                                  f"(allowed: {', '.join(OVERRIDABLE[section])})")


def run_config(params: dict, root: str, base: str | None) -> dict:
    """The run's resolved config: the params placed in their sections, each stage's defaults,
    then the per-stage override lists, checked as the CLI checks them."""
    from lmpipe.cli import runconfig

    shards, train = join(root, "shards"), join(root, "train")
    hostfile = settings.get("LMPIPE_HOSTFILE")
    if params["nodes"] > 1 and not hostfile:
        raise ConfigError("nodes > 1 needs a DeepSpeed hostfile: set LMPIPE_HOSTFILE on the workers")
    data = {
        "tokenize": {"corpus": params["corpus"], "out": shards, "base": base, "seq_len": params["seq_len"],
                     "tokenizer": {"vocab_size": params["vocab_size"]},
                     "curate": {"filters": params.get("curate", "code"), "decontaminate": params.get("decontaminate")}},
        "check": {"corpus": params["corpus"], "shards": shards, "results": join(root, "checks"), "run_id": "pipeline"},
        "train": {"shards": shards, "out": train, "recipe": params["recipe"], "max_steps": params["max_steps"],
                  "data_checks": join(root, "checks", "shards", "result.json"),
                  "deepspeed": {"zero_stage": params["zero_stage"]},
                  "launch": {"nproc": params["nproc"], "num_nodes": params["nodes"], "hostfile": hostfile}},
        "evaluate": {"model": join(train, "export"), "shards": shards},
        "promote": {"run": train, "margin": params["margin"]},
    }
    if params["warm_start"]:
        data["train"]["init_missing"] = "scratch"  # from scratch while there is no champion
    overrides = {name: params[f"{name}_overrides"] for name in SECTIONS}
    check_overrides(overrides)
    try:
        run = runconfig.resolve(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (from the params and the *_overrides lists)") from None
    if params["warm_start"] and not run["train"].init_from:  # start from the champion's weights
        name = run["train"].tracking.model_name
        run["train"] = dataclasses.replace(run["train"], init_from=f"models:/{name}@champion")
    return run


def plan(params: dict, run_id: str, conf: dict) -> dict:
    """Resolve and write the run config (before any work starts); return the run plan (URIs only)."""
    from airflow.sdk.exceptions import AirflowFailException
    from lmpipe.cli import runconfig

    unknown = sorted(set(conf or {}) - set(params))
    if unknown:
        raise AirflowFailException(f"unknown param(s) in the run's conf: {', '.join(unknown)} "
                                   f"(known: {', '.join(sorted(params))})")
    try:
        for key in ("corpus", "output"):
            check_uri(params[key], f"param {key!r}")
    except ConfigError as exc:
        raise AirflowFailException(str(exc)) from None
    root = run_root(params["output"], run_id)
    with s3_access(root, params["corpus"]):
        base = base_shards(params["output"], run_id, params["corpus"], params["seq_len"])
        try:
            run = run_config(params, root, base)
        except ConfigError as exc:
            raise AirflowFailException(f"bad run config: {exc}") from None
        open_store(root).put_bytes(RUN_CONFIG, runconfig.dump(run).encode())
    uri = join(root, RUN_CONFIG)
    log(f"run config written to {uri}" + (f"; incremental run on top of {base}" if base else ""))
    return {"root": root, "config": uri, "corpus": params["corpus"], "shards": join(root, "shards"),
            "train": join(root, "train"), "checks": join(root, "checks"), "base": base,
            "hostfile": run["train"].launch.hostfile}


def base_shards(output: str, run_id: str, corpus: str, seq_len: int) -> str | None:
    """The shard set of the newest completed run under ``output`` that tokenized the same corpus at
    the same seq_len: the base of an incremental run. Completion is a file the last task writes, so
    this works the same for scheduled, manual and ``airflow dags test`` runs."""
    store = open_store(join(output, "runs"))
    best = None
    for name in store.children(""):
        if name == safe_run_id(run_id) or not store.exists(f"{name}/{COMPLETED}"):
            continue
        done = json.loads(store.get_bytes(f"{name}/{COMPLETED}"))
        if done.get("corpus", "").rstrip("/") != corpus.rstrip("/") or done.get("seq_len") != seq_len:
            continue
        if best is None or done["completed_at"] > best[1]["completed_at"]:
            best = (name, done)
    if best is None:
        log("no completed earlier run of this corpus: tokenizing all of it")
        return None
    return join(output, "runs", best[0], "shards")


# ---------------------------------------------------------------- the stages


def check(plan: dict, suite: str) -> None:
    stage(["check-data", "--config", plan["config"], "--suite", suite], s3_env(plan["corpus"], plan["root"]))
    docs = join(plan["checks"], suite, "data_docs", "index.html")
    if suite == "shards":
        links(shard_manifest=link(join(plan["shards"], "manifest.json")), data_docs=link(docs))
    else:
        links(data_docs=link(docs))


SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def submit_env(master: str, env: dict[str, str]) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(``env_vars`` for the Spark hook, the spark-submit process's own environment, extra Spark
    conf) so that no credential reaches a command line. For YARN and Kubernetes masters the hook
    turns ``env_vars`` into ``--conf`` arguments, so the keys go only into the process environment
    (a client-mode driver's); a Kubernetes cluster-mode driver and its executors read them from the
    Kubernetes secret ``LMPIPE_SPARK_K8S_SECRET`` (``secretKeyRef``), named, never copied."""
    if not master.startswith(("yarn", "k8s://")):
        return env, {}, {}
    hidden = {k: v for k, v in env.items() if k in SECRET_ENV}
    conf = {}
    if master.startswith("k8s://") and (secret := settings.get("LMPIPE_SPARK_K8S_SECRET")):
        for name in SECRET_ENV[:2]:
            for role in ("driver", "executor"):
                conf[f"spark.kubernetes.{role}.secretKeyRef.{name}"] = f"{secret}:{name}"
    return {k: v for k, v in env.items() if k not in SECRET_ENV}, hidden, conf


class TokenizeSubmit(SparkSubmitOperator):
    """SparkSubmitOperator for the tokenize job: the run config as its only argument, S3
    credentials from the aws connection passed through the environment (masked, never in XCom,
    never on a command line: :func:`submit_env`)."""

    def execute(self, context):
        import os
        from unittest import mock

        from airflow.sdk import Connection
        from airflow.sdk.exceptions import AirflowNotFoundException

        plan, params = context["ti"].xcom_pull(task_ids="check_corpus"), context["params"]
        self.application_args = ["--config", plan["config"]]
        env = s3_env(params["corpus"], plan["root"])
        try:
            conn = Connection.get(self._conn_id)
            master = f"{conn.host}:{conn.port}" if conn.port else (conn.host or "")
        except AirflowNotFoundException:
            self.log.info("no Airflow connection %r: submitting to local[*]", self._conn_id)
            os.environ[f"AIRFLOW_CONN_{self._conn_id.upper()}"] = '{"conn_type": "spark", "host": "local[*]"}'
            master = "local[*]"
        if not shutil.which("spark-submit"):  # a Spark install on PATH wins; else pyspark's own
            os.environ["PATH"] = f"{settings.get('PATH') or ''}{os.pathsep}{Path(sys.executable).parent}"
        env.setdefault("PYSPARK_PYTHON", sys.executable)
        env_vars, hidden, conf = submit_env(master, env)
        self.env_vars = {**(self.env_vars or {}), **env_vars}
        self.conf = {**(self.conf or {}), **conf}
        self._hook = None
        with mock.patch.dict(os.environ, hidden):  # spark-submit inherits them; nothing else keeps them
            super().execute(context)
        links(shard_manifest=link(join(plan["shards"], "manifest.json")))


def head_node(hostfile: str) -> str:
    """The first host of a DeepSpeed hostfile (``host slots=N`` lines)."""
    from training.config import hostfile_hosts

    return hostfile_hosts(hostfile)[0][0]


def train(plan: dict) -> dict:
    """``lmpipe train``: with a hostfile, the launcher runs on its first node (so precision and
    devices are the GPU nodes'), which starts the ranks on every node; without one, here."""
    hostfile = plan["hostfile"]
    env = {**s3_env(plan["root"]), **checkpoint_env()}
    stage(["train", "--config", plan["config"]], env, host=head_node(hostfile) if hostfile else None)
    with s3_access(plan["root"]):
        return train_links(plan["train"])


def read_json(uri: str, name: str) -> dict:
    return json.loads(open_store(uri).get_bytes(name))


def mlflow_ui() -> str:
    if ui := settings.explicit("LMPIPE_MLFLOW_UI"):  # the address a browser reaches, which the workers' may not be
        return ui.rstrip("/")
    uri = settings.get("MLFLOW_TRACKING_URI") or ""
    return uri.rstrip("/") if uri.startswith("http") else settings.get("LMPIPE_MLFLOW_UI")


def train_links(train: str) -> dict[str, str]:
    """The registered version of a finished training run, and where to look at it."""
    version, run = read_json(train, "model_version.json"), read_json(train, "mlflow_run.json")
    ui = mlflow_ui()
    try:
        from mlflow import MlflowClient

        exp = MlflowClient(run["tracking_uri"]).get_run(run["run_id"]).info.experiment_id
        run_url = f"{ui}/#/experiments/{exp}/runs/{run['run_id']}"
    except Exception:  # the links are a convenience; the run itself succeeded
        run_url = f"{ui} (run {run['run_id']})"
    out = {"name": version["name"], "version": str(version["version"]), "model_url": f"{ui}/#/models/{version['name']}/versions/{version['version']}",
           "mlflow_url": run_url}
    links(mlflow_run=out["mlflow_url"], model_version=out["model_url"], run_folder=link(train))
    return out


def evaluate(run: dict) -> None:
    stage(["evaluate", "--config", run["config"]], s3_env(run["root"]))
    links(metrics=link(join(run["train"], "eval", "metrics.json")), model_version=run["model_url"])


def promote(run: dict, params: dict) -> str:
    """``lmpipe promote`` (with the run's report): "promoted" or "refused"; the run is then complete."""
    rc = stage(["promote", "--config", run["config"]], s3_env(run["root"]), ok=(ExitCode.OK, ExitCode.REFUSED))
    decision = "promoted" if rc == ExitCode.OK else "refused"
    with s3_access(run["root"]):
        complete(run["root"], params, {"decision": decision, "version": run["version"]})
        log(f"promotion {decision}: models:/{run['name']}/{run['version']}")
        # the report stands alone: its log line is a presigned URL on S3
        links(presign=("report",), model_version=run["model_url"], mlflow_run=run["mlflow_url"],
              report=link(join(run["train"], "report", "index.html")))
    return decision


def complete(root: str, params: dict, info: dict) -> None:
    """Mark the run complete: its shard set may now seed the next nightly run."""
    done = {**info, "corpus": params["corpus"], "seq_len": params["seq_len"],
            "completed_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    open_store(root).put_bytes(COMPLETED, json.dumps(done).encode())
