"""
### lm_pipeline: raw text to a promoted champion

`check_corpus` → `tokenize_shard` → `check_shards` → `train` → `evaluate` → `promote`

1. **check_corpus**: the Great Expectations corpus gate (Data Docs linked in the log).
2. **tokenize_shard**: the Spark job, submitted with `SparkSubmitOperator` to the Spark
   connection (`spark_default`; `local[*]` when it does not exist, any `spark://` or `k8s://`
   master otherwise). Nightly runs tokenize only corpus files that are new since the last
   successful run and merge them with its shard manifest.
3. **check_shards**: the Great Expectations shard gate. A failure fails the run: `train` never starts.
4. **train**: the DeepSpeed launcher; ranks and nodes from params (a hostfile from
   `LMPIPE_HOSTFILE` when nodes > 1), CPU ranks over gloo where there is no GPU. A retried or
   cleared `train` resumes from its newest committed checkpoint.
5. **evaluate**: candidate and champion perplexity on the same validation shards.
6. **promote**: the gate. A refusal is a successful run with the decision in the log; a
   promotion emits the `lmpipe://models/<name>/champion` asset, which triggers `lm_serving_rollout`.

Every task writes only under `<output>/runs/<run_id>/`, so clearing any task is safe.
S3 credentials come from the Airflow aws connection (`aws_default`), masked, never in XCom.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk import Asset, AssetAlias, Param, dag, task

from lmpipe import pipeline, settings

REPO = Path(__file__).resolve().parents[1]
NIGHTLY = settings.get("LMPIPE_NIGHTLY_CRON")  # the one place the schedule is set (default 02:00)
SPARK_CONN, AWS_CONN = settings.get("LMPIPE_SPARK_CONN_ID"), settings.get("LMPIPE_AWS_CONN_ID")
MODEL = "lmpipe"
CHAMPION = Asset(f"lmpipe://models/{MODEL}/champion", extra={"model": MODEL})
PROMOTIONS = AssetAlias("lmpipe-promotions")  # promote emits CHAMPION through it only when it promotes

DEFAULTS = {"owner": "lmpipe", "retries": 2, "retry_delay": dt.timedelta(minutes=2),
            "execution_timeout": dt.timedelta(hours=1)}

PARAMS = {
    "corpus": Param(pipeline.default_corpus(), type="string", minLength=1, title="Corpus URI",
                    description="Corpus file, folder or s3:// prefix (JSONL, text or Parquet; date=... partitions "
                                "make nightly runs incremental)"),
    "output": Param(pipeline.default_output(), type="string", minLength=1, title="Output prefix",
                    description="Folder or s3://bucket/prefix; this run writes under <output>/runs/<run_id>/"),
    "recipe": Param("tiny", type="string", enum=["tiny", "gpt2-124m", "llama-1b"], title="Recipe",
                    description="Model recipe"),
    "vocab_size": Param(4096, type="integer", minimum=260, maximum=262144, title="Vocab size",
                        description="Byte-level BPE vocabulary size (ignored when merging with a previous run: "
                                    "its tokenizer is kept)"),
    "seq_len": Param(256, type="integer", minimum=8, maximum=65536, title="Sequence length",
                     description="Tokens per training sequence"),
    "zero_stage": Param(2, type="integer", enum=[0, 1, 2, 3], title="ZeRO stage",
                        description="DeepSpeed ZeRO stage"),
    "nproc": Param(2, type="integer", minimum=1, maximum=64, title="Ranks per node",
                   description="GPUs per node, or CPU ranks where there is no GPU"),
    "nodes": Param(1, type="integer", minimum=1, maximum=1024, title="Nodes",
                   description="Training nodes; more than 1 needs LMPIPE_HOSTFILE on the workers"),
    "max_steps": Param(200, type="integer", minimum=1, maximum=10_000_000, title="Max steps",
                       description="Optimizer steps"),
    "warm_start": Param(True, type="boolean", title="Warm start",
                        description="Start from the champion's weights (from scratch when there is none, or "
                                    "when unchecked)"),
    "margin": Param(0.01, type="number", minimum=0, maximum=1, title="Promotion margin",
                    description="Relative perplexity improvement over the champion needed to promote"),
    "overrides": Param([], type="array", items={"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_.]*=.*$"},
                       title="Training overrides",
                       description="Extra training config as key=value, e.g. optim.lr=0.001"),
}


class TokenizeSubmit(SparkSubmitOperator):
    """SparkSubmitOperator for the tokenize job: arguments from the run plan, S3 credentials from
    the aws connection passed through the environment (masked, never in XCom)."""

    def execute(self, context):
        import os
        import shutil

        from airflow.sdk import Connection
        from airflow.sdk.exceptions import AirflowNotFoundException

        plan, params = context["ti"].xcom_pull(task_ids="check_corpus"), context["params"]
        self.application_args = ["--corpus", params["corpus"], "--out", plan["shards"],
                                 "--vocab-size", str(params["vocab_size"]), "--seq-len", str(params["seq_len"]),
                                 *(["--base", plan["base"]] if plan["base"] else [])]
        env = pipeline.s3_env(AWS_CONN, params["corpus"], plan["shards"])
        try:
            Connection.get(self._conn_id)
        except AirflowNotFoundException:
            self.log.info("no Airflow connection %r: submitting to local[*]", self._conn_id)
            os.environ[f"AIRFLOW_CONN_{self._conn_id.upper()}"] = '{"conn_type": "spark", "host": "local[*]"}'
        if not shutil.which("spark-submit"):  # a Spark install on PATH wins; else pyspark's own
            os.environ["PATH"] = f"{os.environ.get('PATH', '')}{os.pathsep}{Path(sys.executable).parent}"
        env.setdefault("PYSPARK_PYTHON", sys.executable)
        self.env_vars = {**(self.env_vars or {}), **env}
        self._hook = None
        super().execute(context)
        pipeline.links(shard_manifest=pipeline.link(f"{plan['shards']}/manifest.json"))


@dag(dag_id="lm_pipeline", schedule=NIGHTLY, start_date=dt.datetime(2026, 1, 1), catchup=False, max_active_runs=1,
     default_args=DEFAULTS, params=PARAMS, tags=["lmpipe", "training", "spark", "deepspeed"], doc_md=__doc__)
def lm_pipeline():
    @task(execution_timeout=dt.timedelta(minutes=30))
    def check_corpus(params=None, run_id=None) -> dict:
        root = pipeline.run_root(params["output"], run_id)
        env = pipeline.s3_env(AWS_CONN, params["corpus"], root)
        pipeline.stage(["check-data", "--corpus", params["corpus"], "--results", f"{root}/checks/corpus"], env)
        base = pipeline.base_shards(params["output"], run_id, params["corpus"], params["seq_len"])
        if base:
            print(f"lmpipe: incremental run on top of {base}", flush=True)
        pipeline.links(data_docs=pipeline.link(f"{root}/checks/corpus/data_docs/index.html"))
        return {"root": root, "shards": f"{root}/shards", "base": base}

    plan = check_corpus()
    tokenize = TokenizeSubmit(task_id="tokenize_shard", conn_id=SPARK_CONN, name="lmpipe-tokenize",
                              application=str(REPO / "spark_jobs" / "tokenize_shard.py"),
                              execution_timeout=dt.timedelta(hours=4))

    @task(execution_timeout=dt.timedelta(minutes=30))
    def check_shards(plan: dict, params=None) -> dict:
        env = pipeline.s3_env(AWS_CONN, plan["root"])
        results = f"{plan['shards']}/_checks/pipeline"
        pipeline.stage(["check-data", "--shards", plan["shards"], "--results", results], env)
        pipeline.links(shard_manifest=pipeline.link(f"{plan['shards']}/manifest.json"),
                       data_docs=pipeline.link(f"{results}/data_docs/index.html"))
        return plan

    @task(execution_timeout=dt.timedelta(hours=24), retry_delay=dt.timedelta(seconds=30))
    def train(plan: dict, params=None) -> dict:
        env = pipeline.s3_env(AWS_CONN, plan["root"])
        args, host = pipeline.train_args(plan["root"], params)
        pipeline.stage(args, env, host=host)
        return {**plan, "train": f"{plan['root']}/train", **pipeline.train_links(f"{plan['root']}/train")}

    @task(execution_timeout=dt.timedelta(hours=2))
    def evaluate(run: dict) -> dict:
        env = pipeline.s3_env(AWS_CONN, run["root"])
        pipeline.stage(["evaluate", "--model", f"{run['train']}/export", "--shards", run["shards"]], env)
        pipeline.links(metrics=pipeline.link(f"{run['train']}/eval/metrics.json"), model_version=run["model_url"])
        return run

    @task(outlets=[PROMOTIONS], execution_timeout=dt.timedelta(minutes=30))
    def promote(run: dict, params=None, outlet_events=None) -> dict:
        env = pipeline.s3_env(AWS_CONN, run["root"])
        rc = pipeline.stage(["promote", "--candidate", run["version"], "--margin", str(params["margin"])], env,
                            ok=(0, pipeline.EXIT_REFUSED))
        decision = "promoted" if rc == 0 else "refused"
        if decision == "promoted":
            outlet_events[PROMOTIONS].add(CHAMPION, extra={"version": run["version"]})
        report = pipeline.report(run["train"], env)
        pipeline.complete(run["root"], params, {"decision": decision, "version": run["version"]})
        print(f"lmpipe: promotion {decision}: models:/{MODEL}/{run['version']}", flush=True)
        pipeline.links(model_version=run["model_url"], mlflow_run=run["mlflow_url"], report=report)
        return {"decision": decision, "version": run["version"]}

    checked = check_shards(plan)
    plan >> tokenize >> checked
    promote(evaluate(train(checked)))


lm_pipeline()
