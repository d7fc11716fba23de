"""
### lm_serving_rollout: move the serving replicas to a new champion, one at a time, with rollback

Scheduled on the `lmpipe://models/lmpipe/champion` asset, which `lm_pipeline`'s `promote`
emits when it promotes a version.

1. **champion**: the version the registry's `champion` alias points at.
2. **roll_out**: with a load balancer (`LMPIPE_LB_ADMIN`, HAProxy's runtime API), each replica
   of its `serving` backend in turn is drained, reloaded (`POST /admin/reload`), waited on
   until `/v1/models` reports the version, smoke-tested and put back in rotation. The last
   replica in rotation is never drained: it swaps in place, atomically. Without a load
   balancer, the one serving job at `LMPIPE_SERVE_URL` swaps in place. Then a completion
   through `LMPIPE_SERVE_URL`.
3. **rollback** (only when `roll_out` failed): move `champion` back to the previous version,
   put every replica on it and back in rotation, and fail the run so the failure stays visible.
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
    def champion() -> str:
        return tasks.champion_version()

    @task
    def roll_out(version: str) -> str:
        return tasks.roll(version)

    @task(trigger_rule="one_failed")
    def rollback(version: str) -> None:
        from airflow.sdk.exceptions import AirflowFailException

        to = tasks.rollback(version)
        raise AirflowFailException(f"rollout of v{version} failed" + (f": champion rolled back to v{to}" if to else ""))

    version = champion()
    roll_out(version) >> rollback(version)


lm_serving_rollout()
