"""lm_pipeline on a live Airflow (api-server, scheduler, dag-processor on loopback), driven the way
users drive it: the trigger form in the UI, in headless Chromium, and the REST API.

The UI run meets a champion it cannot beat by the margin set in the form: promotion refuses, the
run still succeeds, and no champion asset event is emitted. (A promoting run and its asset event,
incremental nightly runs, warm starts and killed ranks are tested on the production topology,
tests/test_stack.py; the embedded ``airflow dags test`` run is the demo's, tests/test_demo.py.)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from airflow_live import LiveAirflow, airflow_live
from conftest import write_jsonl

from lmpipe_airflow.lm_pipeline import safe_run_id

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"]  # containers: no userns, small shm
CREDS_DAG = '''
from airflow.sdk import dag, task

from lmpipe_airflow.common import aws_env, stage


@dag(dag_id="s3_creds", schedule=None)
def s3_creds():
    @task
    def use(out: str) -> dict:
        env = aws_env("aws_default")
        print("the secret key is " + env["AWS_SECRET_ACCESS_KEY"])
        stage(["demo-corpus", "--out", out, "--max-mb", "0.01"], env)  # a real S3 write with them
        return {"variables": sorted(env)}

    use("{{ dag_run.conf['out'] }}")


s3_creds()
'''

SECRET = "conn-secret-4f1e9c"
TASKS = ["check_corpus", "tokenize_shard", "check_shards", "train", "evaluate", "promote"]


@pytest.fixture(scope="module")
def live(tmp_path_factory, demo_corpus_dir, s3_endpoint) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("live")
    dags = root / "dags"  # the project's DAG files, plus a probe of the aws connection
    dags.mkdir()
    for f in (REPO / "dags").iterdir():  # the DAG files, their task package and .airflowignore
        if f.name != "__pycache__":
            (dags / f.name).symlink_to(f)
    (dags / "s3_creds.py").write_text(CREDS_DAG)
    lines = next(Path(demo_corpus_dir).glob("*.jsonl")).read_text().splitlines()
    write_jsonl(root / "corpus" / "date=2026-11-20" / "part-0.jsonl", lines[:100])
    env = {"LMPIPE_HOME": str(root / "lmpipe"), "LMPIPE_CORPUS": str(root / "corpus"),
           "LMPIPE_OUTPUT": str(root / "out"), "PYTHONPATH": str(REPO),
           "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[2]"}),
           "AIRFLOW_CONN_AWS_DEFAULT": json.dumps({"conn_type": "aws", "login": "conn-key", "password": SECRET,
                                                   "extra": {"endpoint_url": s3_endpoint}}),
           # no interval of this schedule has ended since the DAG's start date (Feb 29 is in 2028),
           # so unpausing starts no nightly run with the default params beside the test's runs
           "LMPIPE_NIGHTLY_CRON": "0 2 29 2 *"}
    with airflow_live(root / "airflow", dags, env=env, dag_ids=["lm_pipeline", "lm_serving_rollout", "s3_creds"]) as af:
        af.unpause("lm_pipeline")  # lm_serving_rollout stays paused: no serving job in this test
        yield {"af": af, "root": root, "lines": lines}


def param_row(dialog, label: str):
    """A Param's row in the trigger form, by its visible label (Airflow 3.3 does not link the label
    of a string Param to its input, so get_by_label finds only the numeric ones)."""
    return dialog.get_by_role("group").filter(
        has=dialog.page.locator("label", has_text=re.compile(rf"^\s*{re.escape(label)}(\s|\*|$)")))


def param_input(dialog, label: str):
    row = param_row(dialog, label)
    return row.get_by_role("textbox").or_(row.get_by_role("spinbutton"))


def seed_champion(live, shards: Path) -> str:
    """A champion in the live Airflow's registry (a tiny random model) for the UI run to meet."""
    import mlflow

    from registry import tracking
    from serving_helpers import register, tiny_export

    prior = os.environ.get("MLFLOW_TRACKING_URI")  # tracking.client exports the URI to this process
    tcfg = tracking.TrackingConfig(uri=f"sqlite:///{live['root'] / 'lmpipe' / 'mlflow.db'}")
    try:
        v = register(tiny_export(live["root"] / "champion", shards, seed=5), "lmpipe", tcfg)
        tracking.client(tcfg).set_registered_model_alias("lmpipe", tracking.CHAMPION, v)
    finally:
        mlflow.set_tracking_uri(prior)
    return v


def champion_version(live) -> str:
    from registry import tracking

    prior = os.environ.get("MLFLOW_TRACKING_URI")
    tcfg = tracking.TrackingConfig(uri=f"sqlite:///{live['root'] / 'lmpipe' / 'mlflow.db'}")
    try:
        return str(tracking.alias_version(tracking.client(tcfg), "lmpipe", tracking.CHAMPION).version)
    finally:
        import mlflow

        mlflow.set_tracking_uri(prior)


@pytest.mark.timeout(900)
def test_trigger_from_the_ui_form_runs_the_pipeline_and_a_refusal_emits_no_asset(live, real_shards):
    from playwright.sync_api import expect, sync_playwright

    af: LiveAirflow = live["af"]
    champion = seed_champion(live, real_shards)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        try:
            af.login(page)
            page.get_by_role("link", name="Dags", exact=True).click()
            page.get_by_role("link", name="lm_pipeline", exact=True).first.click()
            page.wait_for_url("**/dags/lm_pipeline")
            # the DAG page re-mounts its header once the details arrive: wait for the grid first
            expect(page.get_by_role("link", name="check_corpus", exact=True)).to_be_visible()

            page.get_by_role("button", name="Trigger Dag", exact=True).click()
            dialog = page.get_by_role("dialog")
            expect(dialog.get_by_text("Relative perplexity improvement over the champion")).to_be_visible()
            # the corpus and output defaults come from LMPIPE_CORPUS / LMPIPE_OUTPUT
            expect(param_input(dialog, "Corpus URI")).to_have_value(str(live["root"] / "corpus"))
            param_input(dialog, "Vocab size").fill("400")
            param_input(dialog, "Sequence length").fill("64")
            param_input(dialog, "Max steps").fill("4")
            # a 100% gain over the champion is out of reach: promotion must refuse, the run succeed
            param_input(dialog, "Promotion margin").fill("1")
            warm = param_row(dialog, "Warm start").get_by_role("checkbox")
            # the seeded champion has another tokenizer: no warm start from it (the switch's input
            # is hidden under its control, so the click goes to the input itself)
            warm.dispatch_event("click")
            expect(warm).not_to_be_checked()
            dialog.get_by_role("button", name="Trigger", exact=True).click()
            page.wait_for_url(re.compile(r"/dags/lm_pipeline/runs/[^/]+$"))
            run_id = unquote(page.url.rsplit("/", 1)[1])
            assert af.wait_run("lm_pipeline", run_id, timeout=800) == "success", af.log_tail()

            page.reload()
            for task_id in TASKS:
                row = page.get_by_role("row").filter(has=page.get_by_role("link", name=task_id, exact=True))
                expect(row.get_by_role("cell", name="Success", exact=True)).to_be_visible()
            page.screenshot(path=ARTIFACTS / "airflow-ui-lm_pipeline-run.png", full_page=True)
        except Exception:
            page.screenshot(path=ARTIFACTS / "airflow-ui-lm_pipeline-failed.png", full_page=True)
            print(af.log_tail())
            raise
        finally:
            browser.close()

    run = af.api("GET", f"/dags/lm_pipeline/dagRuns/{run_id}").json()
    assert (run["conf"]["vocab_size"], run["conf"]["seq_len"], run["conf"]["max_steps"]) == (400, 64, 4)
    assert (run["conf"]["margin"], run["conf"]["warm_start"]) == (1, False)
    assert run["triggered_by"] == "ui"
    done = json.loads((live["root"] / "out" / "runs" / safe_run_id(run_id) / "COMPLETED.json").read_text())
    assert done["decision"] == "refused" and done["version"] != champion, done
    assert champion_version(live) == champion
    events = af.api("GET", "/assets/events", params={"limit": 50}).json()["asset_events"]
    assert not [e for e in events if e["uri"] == "lmpipe://models/lmpipe/champion"], events  # a refusal emits nothing


@pytest.mark.timeout(300)
def test_rest_trigger_with_a_bad_conf_is_refused_before_any_run_exists(live):
    af: LiveAirflow = live["af"]
    conf = {"vocab_size": 400, "seq_len": 64, "max_steps": 4}

    def runs() -> int:
        return af.api("GET", "/dags/lm_pipeline/dagRuns").json()["total_entries"]

    before = runs()
    for bad in ({**conf, "zero_stage": 5}, {**conf, "max_steps": "many"}, {**conf, "train_overrides": ["rm -rf /"]},
                {**conf, "recipe": "gpt5"}, {**conf, "margin": 2}):
        r = af.api("POST", "/dags/lm_pipeline/dagRuns", json={"logical_date": None, "conf": bad})
        assert r.status_code == 400, (bad, r.status_code, r.text)
    assert runs() == before, "a rejected conf created a run"


@pytest.mark.timeout(300)
def test_s3_credentials_come_from_the_aws_connection_masked_and_never_in_xcom(live, s3_endpoint, bucket):
    import boto3

    af: LiveAirflow = live["af"]
    af.unpause("s3_creds")
    run = af.trigger("s3_creds", conf={"out": f"s3://{bucket}/from-conn.jsonl"})
    run_id = run["dag_run_id"]
    assert af.wait_run("s3_creds", run_id, timeout=240) == "success", af.log_tail()
    log = af.api("GET", f"/dags/s3_creds/dagRuns/{run_id}/taskInstances/use/logs/1", params={"full_content": True}).text
    assert "the secret key is ***" in log, log[-3000:]
    assert SECRET not in log
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    assert s3.head_object(Bucket=bucket, Key="from-conn.jsonl")["ContentLength"] > 0  # the stage used them
    entries = af.api("GET", f"/dags/s3_creds/dagRuns/{run_id}/taskInstances/use/xcomEntries").json()["xcom_entries"]
    assert entries
    for e in entries:
        value = af.api("GET", f"/dags/s3_creds/dagRuns/{run_id}/taskInstances/use/xcomEntries/{e['key']}").text
        assert SECRET not in value and "AWS_SECRET_ACCESS_KEY" in value  # only the variables' names
