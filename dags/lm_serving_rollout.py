"""
### lm_serving_rollout: move the serving job to a new champion, with rollback

Scheduled on the `lmpipe://models/lmpipe/champion` asset, which `lm_pipeline`'s `promote`
emits when it promotes a version.

1. **reload**: `POST /admin/reload` on the serving job (`LMPIPE_SERVE_URL`); it loads the new
   champion beside the old one and swaps atomically, so no request is dropped.
2. **wait_for_version**: poll `/v1/models` until it reports the champion's version.
3. **smoke_test**: a real completion through the OpenAI-compatible API.
4. **rollback** (only when a step above failed): move `champion` back to the previous version,
   reload again, and fail the run so the failure stays visible.
"""

from __future__ import annotations

import datetime as dt

from airflow.sdk import dag, task

from lmpipe_airflow import lm_serving_rollout as tasks
from lmpipe_airflow.common import champion_asset

DEFAULTS = {"owner": "lmpipe", "retries": 1, "retry_delay": dt.timedelta(seconds=20),
            "execution_timeout": dt.timedelta(minutes=15)}


@dag(dag_id="lm_serving_rollout", schedule=[champion_asset()], start_date=dt.datetime(2026, 1, 1), catchup=False,
     max_active_runs=1, default_args=DEFAULTS, tags=["lmpipe", "serving"], doc_md=__doc__)
def lm_serving_rollout():
    @task
    def reload() -> str:
        version = tasks.champion_version()
        tasks.reload()
        return version

    @task
    def wait_for_version(version: str) -> str:
        return tasks.wait_for(version)["id"]

    @task
    def smoke_test(model: str) -> str:
        return tasks.smoke(model)

    @task(trigger_rule="one_failed")
    def rollback(version: str) -> None:
        from airflow.sdk.exceptions import AirflowFailException

        to = tasks.rollback(version or tasks.champion_version())  # reload may have failed before returning
        raise AirflowFailException(f"rollout of v{version} failed" + (f": champion rolled back to v{to}" if to else ""))

    version = reload()
    smoke = smoke_test(wait_for_version(version))
    smoke >> rollback(version)


lm_serving_rollout()
