"""Spark session setup and progress lines that read well in a terminal and in Airflow logs."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

from lmpipe import settings
from lmpipe.log import log


def s3_env() -> dict[str, str]:
    """The S3 settings of this process's environment (what a task handed the driver)."""
    found = {"AWS_ACCESS_KEY_ID": settings.explicit("AWS_ACCESS_KEY_ID"),
             "AWS_SECRET_ACCESS_KEY": settings.explicit("AWS_SECRET_ACCESS_KEY"),
             "AWS_SESSION_TOKEN": settings.explicit("AWS_SESSION_TOKEN"),
             "AWS_ENDPOINT_URL": settings.explicit("AWS_ENDPOINT_URL")}
    return {k: v for k, v in found.items() if v}


def session(master: str | None, app_name: str, conf: dict[str, str] | None = None):
    """A SparkSession. Under spark-submit the master comes from spark-submit unless one is given."""
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    launched_by_submit = settings.get("SPARK_SUBMIT_OPTS") or settings.get("SPARK_ENV_LOADED")
    if master and not (launched_by_submit and master == "local[*]"):
        builder = builder.master(master)
    defaults = {
        "spark.ui.showConsoleProgress": "false",  # our own progress lines work in Airflow logs too
        "spark.ui.enabled": "false",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.driver.memory": "2g",
        "spark.sql.adaptive.enabled": "false",  # keep partition counts exactly as configured
    }
    # Executors on a cluster's workers do not inherit the driver's environment: hand them the S3
    # credentials the driver got (from the Airflow aws connection), redacted in Spark's UI and logs.
    # On Kubernetes with LMPIPE_SPARK_K8S_SECRET the executors read them from that secret instead.
    k8s_secret = settings.get("LMPIPE_SPARK_K8S_SECRET")
    for name, value in s3_env().items():
        if not (k8s_secret and name != "AWS_ENDPOINT_URL"):
            defaults[f"spark.executorEnv.{name}"] = value
    defaults["spark.redaction.regex"] = "(?i)secret|password|token|access[.]key|aws_access_key_id"
    if (master or "local").startswith("local"):
        # Workers on this machine run this interpreter, so they see the same packages, and a
        # local job stays on loopback.
        if not settings.get("PYSPARK_PYTHON"):
            os.environ["PYSPARK_PYTHON"] = sys.executable
        if not settings.get("PYSPARK_DRIVER_PYTHON"):
            os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
        if not settings.get("SPARK_LOCAL_IP"):
            os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
        defaults["spark.driver.host"] = "127.0.0.1"
        defaults["spark.driver.bindAddress"] = "127.0.0.1"
    for key, value in {**defaults, **(conf or {})}.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(settings.get("LMPIPE_SPARK_LOG_LEVEL"))
    return spark


@contextlib.contextmanager
def progress(spark, label: str, every_s: float | None = None) -> Iterator[None]:
    """Print one line per interval (``LMPIPE_PROGRESS_S``) with the active stages' task counts."""
    every_s = every_s or float(settings.get("LMPIPE_PROGRESS_S"))
    tracker = spark.sparkContext.statusTracker()
    stop = threading.Event()
    start = time.monotonic()

    def loop() -> None:
        while not stop.wait(every_s):
            parts = []
            for sid in sorted(tracker.getActiveStageIds()):
                info = tracker.getStageInfo(sid)
                if info:
                    parts.append(f"stage {sid} {info.numCompletedTasks}/{info.numTasks} tasks")
            line = ", ".join(parts) or "waiting"
            log(f"{label}: {line} ({time.monotonic() - start:.0f}s)")

    thread = threading.Thread(target=loop, daemon=True, name="spark-progress")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=1)


def task_error_message(exc: BaseException, marker: str) -> str | None:
    """Pull a worker-side ``marker: message`` line (e.g. ``CorpusError: ...``) out of a Spark error."""
    text = str(exc)
    for line in text.splitlines():
        idx = line.find(marker + ": ")
        if idx >= 0:
            return line[idx + len(marker) + 2 :].strip()
    return None
