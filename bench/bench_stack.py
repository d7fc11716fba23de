"""Benchmark: the production topology (``make stack``) against the embedded path, on one small run.

One JSON line per result:
- ``stack_start``: seconds from nothing to every service healthy (fresh home: initdb, migrations);
- ``stack_restart``: a second ``lmpipe stack up`` on a running stack (a no-op);
- ``run``: wall time of the same ``lm_pipeline`` run (same corpus, same conf) on the stack (REST
  trigger, scheduler, Celery workers, Spark standalone, S3, MLflow server) and embedded
  (``airflow dags test``, SQLite, ``local[2]`` Spark, local folders, as ``make demo``), their
  ratio, and each task's seconds on both, which says where the difference goes.

    .venv/bin/python bench/bench_stack.py [--lines 400]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "dags")]
CONF = {"vocab_size": 400, "seq_len": 64, "max_steps": 6, "nproc": 2, "warm_start": False,
        "train_overrides": ["micro_batch_size=4", "log_every=2"]}


def emit(**kw) -> None:
    print(json.dumps({"bench": "stack", **kw}), flush=True)


def seconds(ti: dict) -> float | None:
    from datetime import datetime

    if not ti.get("start_date") or not ti.get("end_date"):
        return None
    start, end = (datetime.fromisoformat(ti[k].replace("Z", "+00:00")) for k in ("start_date", "end_date"))
    return round((end - start).total_seconds(), 1)


def corpus_lines(n: int) -> list[str]:
    from spark_jobs import demo_corpus

    out = Path(tempfile.mkdtemp(prefix="bench-stack-corpus-"))
    demo_corpus.write(str(out), 2.5)
    return next(out.glob("*.jsonl")).read_text().splitlines()[:n]


def embedded(lines: list[str]) -> tuple[float, dict]:
    """The run as `make demo` runs it: `airflow dags test` on SQLite, local Spark, local folders."""
    root = Path(tempfile.mkdtemp(prefix="bench-embedded-"))
    (root / "corpus" / "date=2026-11-20").mkdir(parents=True)
    (root / "corpus" / "date=2026-11-20" / "part-0.jsonl").write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW_"))}
    env |= {"AIRFLOW_HOME": str(root / "airflow"), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "LMPIPE_HOME": str(root / "home"),
            "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[2]"})}
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True)
    conf = {**CONF, "corpus": str(root / "corpus"), "output": str(root / "out")}
    t0 = time.perf_counter()
    r = subprocess.run([airflow, "dags", "test", "lm_pipeline", "-c", json.dumps(conf)], env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"embedded run failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    runs = json.loads(subprocess.run([airflow, "dags", "list-runs", "lm_pipeline", "-o", "json"], env=env,
                                     capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    tis = json.loads(subprocess.run([airflow, "tasks", "states-for-dag-run", "lm_pipeline", runs[-1]["run_id"],
                                     "-o", "json"], env=env, capture_output=True, text=True,
                                    check=True).stdout.splitlines()[-1])
    return wall, {t["task_id"]: seconds(t) for t in tis}


def on_stack(lines: list[str]) -> tuple[float, dict]:
    from stack_live import stack_live

    t0 = time.perf_counter()
    with stack_live() as st:
        emit(metric="stack_start", seconds=round(time.perf_counter() - t0, 1))
        t1 = time.perf_counter()
        assert st.cli("up").returncode == 0
        emit(metric="stack_restart", seconds=round(time.perf_counter() - t1, 1))
        st.s3.put_object(Bucket="lmpipe", Key="corpus/date=2026-11-20/part-0.jsonl",
                         Body=("\n".join(lines) + "\n").encode())
        st.airflow.unpause("lm_pipeline")
        t2 = time.perf_counter()
        run = st.airflow.trigger("lm_pipeline", conf=CONF)
        state = st.airflow.wait_run("lm_pipeline", run["dag_run_id"], timeout=1200)
        wall = time.perf_counter() - t2
        if state != "success":
            raise SystemExit(f"stack run {state}: {st.airflow.task_states('lm_pipeline', run['dag_run_id'])}")
        tis = st.airflow.api("GET", f"/dags/lm_pipeline/dagRuns/{run['dag_run_id']}/taskInstances").json()
        return wall, {t["task_id"]: seconds(t) for t in tis["task_instances"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=400, help="demo corpus documents in the run")
    args = p.parse_args()
    lines = corpus_lines(args.lines)
    stack_s, stack_tasks = on_stack(lines)
    embedded_s, embedded_tasks = embedded(lines)
    emit(metric="run", documents=len(lines), stack_s=round(stack_s, 1), embedded_s=round(embedded_s, 1),
         ratio=round(stack_s / embedded_s, 2), stack_tasks=stack_tasks, embedded_tasks=embedded_tasks,
         machine=f"{os.cpu_count()} cores")


if __name__ == "__main__":
    main()
