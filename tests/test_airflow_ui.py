"""lm_pipeline on a live Airflow (api-server, scheduler, dag-processor on loopback), driven the way
users drive it: the trigger form in the UI, in headless Chromium, and the REST API.

The REST run is also the nightly story: a new date partition arrives, the run tokenizes only it on
top of the UI run's shards, warm-starts from the champion, and its ``train`` task is killed and
cleared half-way, after which it resumes from its checkpoint.
"""

from __future__ import annotations

import datetime as dt
import json
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


def param_input(dialog, label: str):
    """A Param's input in the trigger form, by its row's visible label (Airflow 3.3 does not link
    the label of a string Param to its input, so get_by_label finds only the numeric ones)."""
    row = dialog.get_by_role("group").filter(
        has=dialog.page.locator("label", has_text=re.compile(rf"^\s*{re.escape(label)}(\s|\*|$)")))
    return row.get_by_role("textbox").or_(row.get_by_role("spinbutton"))


@pytest.mark.timeout(900)
def test_trigger_from_the_ui_form_runs_the_pipeline(live):
    from playwright.sync_api import expect, sync_playwright

    af: LiveAirflow = live["af"]
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
    assert run["triggered_by"] == "ui"
    done = json.loads((live["root"] / "out" / "runs" / safe_run_id(run_id) / "COMPLETED.json").read_text())
    assert done["decision"] == "promoted"  # the first model becomes the first champion
    events = af.api("GET", "/assets/events", params={"limit": 50}).json()["asset_events"]
    assert any(e["uri"] == "lmpipe://models/lmpipe/champion" and e["extra"].get("version") == done["version"]
               for e in events), events
    live["ui_run"] = run_id


@pytest.mark.timeout(900)
def test_rest_trigger_incremental_run_whose_refusal_emits_no_asset(live):
    """A nightly-style run over REST on the embedded Airflow. (Killed train ranks and the retry
    that resumes are tested on the production topology, tests/test_stack.py, and in test_train.)"""
    af: LiveAirflow = live["af"]
    assert "ui_run" in live, "needs the UI run's shards and champion"
    # margin 1.0 asks for a 100% perplexity gain: promotion must refuse, and the run still succeed
    conf = {"vocab_size": 400, "seq_len": 64, "max_steps": 4, "margin": 1.0, "train_overrides": ["log_every=1"]}

    def runs() -> int:
        return af.api("GET", "/dags/lm_pipeline/dagRuns").json()["total_entries"]

    before = runs()
    for bad in ({**conf, "zero_stage": 5}, {**conf, "max_steps": "many"}, {**conf, "train_overrides": ["rm -rf /"]},
                {**conf, "recipe": "gpt5"}):
        r = af.api("POST", "/dags/lm_pipeline/dagRuns", json={"logical_date": None, "conf": bad})
        assert r.status_code == 400, (bad, r.status_code, r.text)
    assert runs() == before, "a rejected conf created a run"

    # the next night's partition arrives
    write_jsonl(live["root"] / "corpus" / "date=2026-11-21" / "part-0.jsonl", live["lines"][100:])
    run_id = "nightly-rest-1"
    af.trigger("lm_pipeline", conf=conf, dag_run_id=run_id,
               logical_date=dt.datetime.now(dt.timezone.utc).isoformat())
    out = live["root"] / "out" / "runs" / safe_run_id(run_id)
    train_dir = out / "train"
    assert af.wait_run("lm_pipeline", run_id, timeout=600) == "success", af.log_tail()
    states = af.task_states("lm_pipeline", run_id)
    assert all(states[t] == "success" for t in TASKS), states

    m = json.loads((out / "shards" / "manifest.json").read_text())
    assert m["input"]["new_files"] == 1 and m["input"]["files"] == 2, m["input"]
    assert m["base"]["uri"].endswith(f"runs/{safe_run_id(live['ui_run'])}/shards")
    train_cfg = json.loads((train_dir / "train_config.json").read_text())
    assert train_cfg["init_from"] == "models:/lmpipe@champion"  # warm start (the param's default)

    done = json.loads((out / "COMPLETED.json").read_text())
    assert done["decision"] == "refused"
    ui_done = json.loads((live["root"] / "out" / "runs" / safe_run_id(live["ui_run"]) / "COMPLETED.json").read_text())
    events = af.api("GET", "/assets/events", params={"limit": 50}).json()["asset_events"]
    champion_events = [e for e in events if e["uri"] == "lmpipe://models/lmpipe/champion"]
    assert [e["extra"].get("version") for e in champion_events] == [ui_done["version"]]  # a refusal emits nothing


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
