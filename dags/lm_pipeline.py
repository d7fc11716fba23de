"""
### lm_pipeline: raw text to a promoted champion

`check_corpus` → `tokenize_shard` → `check_shards` → `train` → `evaluate` → `promote`

1. **check_corpus**: resolves the run config from these params (every stage's settings, checked
   before any work starts) into `<output>/runs/<run_id>/run_config.yaml`, then runs the Great
   Expectations corpus gate (Data Docs linked in the log).
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

Every task after the first gets the run config and nothing else; any stage setting is reachable
through that stage's override list (`key=value`, e.g. `reader.text_field=body` for a corpus whose
text is not in `text`). Every task writes only under `<output>/runs/<run_id>/`, so clearing any
task is safe. S3 credentials come from the Airflow aws connection (`aws_default`), masked, never in XCom.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from airflow.sdk import AssetAlias, Param, dag, task

from lmpipe import settings
from lmpipe.config import choices
from lmpipe_airflow import lm_pipeline as tasks
from lmpipe_airflow.common import champion_asset
from registry.promote import PromoteConfig
from spark_jobs.config import TokenizeConfig
from training.config import DeepSpeedConfig, LaunchConfig, TrainConfig
from training.recipes import RECIPES

REPO = Path(__file__).resolve().parents[1]
NIGHTLY = settings.get("LMPIPE_NIGHTLY_CRON")  # the one place the schedule is set (default 02:00)
SCHEDULE = None if NIGHTLY.strip().lower() == "none" else NIGHTLY  # "none": triggered runs only
CHAMPION = champion_asset()
PROMOTIONS = AssetAlias("lmpipe-promotions")  # promote emits CHAMPION through it only when it promotes

RETRY_DELAY = dt.timedelta(seconds=int(settings.get("LMPIPE_RETRY_DELAY_S")))
SOON = min(RETRY_DELAY, dt.timedelta(seconds=30))  # train resumes from its checkpoint; promote is idempotent
DEFAULTS = {"owner": "lmpipe", "retries": 2, "retry_delay": RETRY_DELAY,
            "execution_timeout": dt.timedelta(hours=1)}
TOK, TRAIN, DS, LAUNCH = TokenizeConfig(), TrainConfig(), DeepSpeedConfig(), LaunchConfig()
KEY_VALUE = {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_.]*=.*$"}


def overrides(stage: str, example: str) -> Param:
    return Param([], type="array", items=KEY_VALUE, title=f"{stage.capitalize()} overrides",
                 description=f"Any other {stage} setting as key=value (`lmpipe config show` lists them), "
                             f"e.g. {example}")


PARAMS = {
    "corpus": Param(tasks.default_corpus(), type="string", minLength=1, title="Corpus URI",
                    description="Corpus file, folder or s3:// prefix (JSONL, text or Parquet; date=... partitions "
                                "make nightly runs incremental)"),
    "output": Param(tasks.default_output(), type="string", minLength=1, title="Output prefix",
                    description="Folder or s3://bucket/prefix; this run writes under <output>/runs/<run_id>/"),
    "recipe": Param(TRAIN.recipe, type="string", enum=list(RECIPES), title="Recipe",
                    description="Training recipe: model shape, learning rate, warmup, batch and steps"),
    "vocab_size": Param(TOK.tokenizer.vocab_size, type="integer", minimum=260, maximum=262144, title="Vocab size",
                        description="Byte-level BPE vocabulary size (ignored when merging with a previous run: "
                                    "its tokenizer is kept)"),
    "seq_len": Param(TOK.seq_len, type="integer", minimum=8, maximum=65536, title="Sequence length",
                     description="Tokens per training sequence; at most the recipe's max_position_embeddings"),
    "curate": Param(TOK.curate.filters, type="string", enum=["code", "web", "none"], title="Curation preset",
                    description="Filters before tokenizing: code (line length, alphanumeric share, generated files, "
                                "secrets), web (Gopher, C4, FineWeb, language) or none; near-dup and exact dedup "
                                "always run. A list of filters goes in tokenize overrides (curate.filters=[...])"),
    "decontaminate": Param(None, type=["null", "string"], title="Evaluation texts",
                           description="File, folder or s3:// prefix of evaluation texts (JSONL or txt): documents "
                                       "sharing a 13-word n-gram with them are removed, and the data gate fails"),
    "zero_stage": Param(DS.zero_stage, type="integer", enum=choices(DeepSpeedConfig, "zero_stage"), title="ZeRO stage",
                        description="DeepSpeed ZeRO stage"),
    "nproc": Param(LAUNCH.nproc, type=["null", "integer"], minimum=1, maximum=64, title="Ranks per node",
                   description="GPUs per node, or CPU ranks where there is no GPU (empty: every GPU, or 2 CPU ranks)"),
    "nodes": Param(LAUNCH.num_nodes, type="integer", minimum=1, maximum=1024, title="Nodes",
                   description="Training nodes; more than 1 needs LMPIPE_HOSTFILE on the workers"),
    "max_steps": Param(TRAIN.max_steps, type=["null", "integer"], minimum=1, maximum=10_000_000, title="Max steps",
                       description="Optimizer steps (empty: the recipe's)"),
    "warm_start": Param(True, type="boolean", title="Warm start",
                        description="Start from the champion's weights (from scratch when there is none, or "
                                    "when unchecked)"),
    "margin": Param(PromoteConfig().margin, type="number", minimum=0, maximum=1, title="Promotion margin",
                    description="Relative perplexity improvement over the champion needed to promote"),
    "tokenize_overrides": overrides("tokenize", "reader.text_field=body"),
    "check_overrides": overrides("check", "max_duplicate_rate=0.1"),
    "train_overrides": overrides("train", "optim.lr=0.001"),
    "evaluate_overrides": overrides("evaluate", "max_sequences=2000"),
    "promote_overrides": overrides("promote", "report=false"),
}


@dag(dag_id="lm_pipeline", schedule=SCHEDULE, start_date=dt.datetime(2026, 1, 1), catchup=False, max_active_runs=1,
     default_args=DEFAULTS, params=PARAMS, tags=["lmpipe", "training", "spark", "deepspeed"], doc_md=__doc__)
def lm_pipeline():
    @task(execution_timeout=dt.timedelta(minutes=30))
    def check_corpus(params=None, run_id=None, dag_run=None) -> dict:
        plan = tasks.plan(params, run_id, dag_run.conf)
        tasks.check(plan, "corpus")
        return plan

    plan = check_corpus()
    tokenize = tasks.TokenizeSubmit(task_id="tokenize_shard", conn_id=settings.get("LMPIPE_SPARK_CONN_ID"),
                                    name="lmpipe-tokenize", application=str(REPO / "spark_jobs" / "tokenize_shard.py"),
                                    execution_timeout=dt.timedelta(hours=4))

    @task(execution_timeout=dt.timedelta(minutes=30))
    def check_shards(plan: dict) -> dict:
        tasks.check(plan, "shards")
        return plan

    @task(execution_timeout=dt.timedelta(hours=24), retry_delay=SOON)
    def train(plan: dict) -> dict:
        return {**plan, **tasks.train(plan)}

    @task(execution_timeout=dt.timedelta(hours=2))
    def evaluate(run: dict) -> dict:
        tasks.evaluate(run)
        return run

    # A registry that is briefly away is retried soon; the gate itself is idempotent. One promote
    # at a time across runs: two gates deciding against the same champion would both move it.
    @task(outlets=[PROMOTIONS], execution_timeout=dt.timedelta(minutes=30), retry_delay=SOON,
          max_active_tis_per_dag=1)
    def promote(run: dict, params=None, outlet_events=None) -> dict:
        decision = tasks.promote(run, params)
        if decision == "promoted":
            outlet_events[PROMOTIONS].add(CHAMPION, extra={"version": run["version"]})
        return {"decision": decision, "version": run["version"]}

    checked = check_shards(plan)
    plan >> tokenize >> checked
    promote(evaluate(train(checked)))


lm_pipeline()
