"""MLflow for a training run: the run (params, streamed metrics, data artifacts) and the
registered model version with lineage tags that lead back to the exact data."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from lmpipe import settings
from lmpipe.log import log
from lmpipe.storage import is_s3, join, open_store, split_uri
from registry import tracking


def data_check(cfg) -> tuple[str | None, dict | None]:
    """The shard-check result recorded as lineage: ``data_checks`` if set, else the newest under the shards."""
    if not cfg.data_checks:
        return latest_data_check(cfg.shards, cfg.storage)
    parent, name = split_uri(cfg.data_checks)
    store = open_store(parent, cfg.storage)
    if not store.exists(name):
        return None, None
    return cfg.data_checks, json.loads(store.get_bytes(name))


def config_uri(cfg, run: Path) -> str:
    """Where the run's resolved config lives (train_config.json in the run folder)."""
    from training.config import CONFIG_FILE

    return join(cfg.out, CONFIG_FILE) if is_s3(cfg.out) else str(run / CONFIG_FILE)


def latest_data_check(shards_uri: str, storage) -> tuple[str | None, dict | None]:
    """The newest shard-suite result under ``<shards>/_checks/`` (URI and content)."""
    store = open_store(shards_uri, storage)
    best = (None, None)
    for obj in store.list("_checks"):
        if not obj.key.endswith("/result.json") or obj.key.count("/") != 2:
            continue
        try:
            result = json.loads(store.get_bytes(obj.key))
        except (ValueError, OSError):
            continue
        if result.get("kind") == "shards" and (best[1] is None or result["created_at"] > best[1]["created_at"]):
            best = (store.url(obj.key), result)
    return best


def start(cfg, run: Path, man: dict, model: dict) -> str | None:
    """Create (or, on resume, reuse) the MLflow run; log params, data manifest and check links."""
    if not cfg.tracking.enabled:
        return None
    tracking.s3_env(cfg.storage)
    c = tracking.client(cfg.tracking)
    marker = run / "mlflow_run.json"
    if marker.is_file():
        run_id = json.loads(marker.read_text())["run_id"]
        c.update_run(run_id, status="RUNNING")
        return run_id
    exp = tracking.experiment_id(c, cfg.tracking)
    tags = {"lmpipe.out": cfg.out, "lmpipe.shards": cfg.shards, "lmpipe.git_commit": tracking.git_commit(),
            "lmpipe.config": config_uri(cfg, run)}
    if settings.get("AIRFLOW_CTX_DAG_RUN_ID"):
        tags["lmpipe.airflow_run_id"] = settings.get("AIRFLOW_CTX_DAG_RUN_ID")
    r = c.create_run(exp, run_name=f"train-{Path(str(cfg.out)).name}", tags=tags)
    run_id = r.info.run_id
    from lmpipe import config as cfglib

    params = tracking.flatten({**cfglib.to_dict(cfg), "model": model})
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])
    store = open_store(cfg.shards, cfg.storage)
    (run / "data").mkdir(exist_ok=True)
    (run / "data" / "manifest.json").write_bytes(store.get_bytes("manifest.json"))
    check_uri, check = data_check(cfg)
    (run / "data" / "data_checks.json").write_text(json.dumps({"result": check_uri, "success": check and check["success"],
                                                               "data_docs": check and check["data_docs"]}, indent=2))
    c.log_artifacts(run_id, str(run / "data"), "data")
    marker.write_text(json.dumps({"run_id": run_id, "tracking_uri": tracking.tracking_uri(cfg.tracking)}))
    log(f"MLflow run {run_id} ({tracking.tracking_uri(cfg.tracking)})")
    return run_id


def finish(cfg, run: Path, man: dict, run_id: str | None, rc: int) -> str | None:
    """On success: log the export and register it as a new model version with lineage tags."""
    if run_id is None:
        return None
    c = tracking.client(cfg.tracking)
    if rc != 0:
        c.set_terminated(run_id, status="FAILED")
        return None
    from training import checkpoint as ckpt

    tag = ckpt.committed(run / "checkpoints")[-1]
    marker = json.loads((run / "checkpoints" / tag / ckpt.MARKER).read_text())
    registered = _registered(run, run_id, marker["step"])
    if registered:  # a retried task: the same run at the same step is one version, not two
        c.set_terminated(run_id, status="FINISHED")
        log(f"models:/{registered['name']}/{registered['version']} is this run's version already (step {marker['step']})")
        return registered["version"]
    c.log_artifacts(run_id, str(run / "export"), "model")
    source = f"{c.get_run(run_id).info.artifact_uri}/model"
    store = open_store(cfg.shards, cfg.storage)
    check_uri, check = data_check(cfg)
    lineage = {
        "lmpipe.shards_manifest": store.url("manifest.json"),
        "lmpipe.shards_manifest_sha256": hashlib.sha256(store.get_bytes("manifest.json")).hexdigest(),
        "lmpipe.tokenizer_sha256": man["tokenizer"]["sha256"],
        "lmpipe.data_checks": check_uri or "missing",
        "lmpipe.data_checks_success": "missing" if check is None else str(bool(check["success"])).lower(),
        "lmpipe.checkpoint": join(cfg.out, "checkpoints", tag) if is_s3(cfg.out) else str(run / "checkpoints" / tag),
        "lmpipe.checkpoint_step": str(marker["step"]),
        "lmpipe.config": config_uri(cfg, run),
        "lmpipe.git_commit": tracking.git_commit(),
        "lmpipe.run": cfg.out,
        "lmpipe.training_status": "FINISHED",
        "lmpipe.registered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if settings.get("AIRFLOW_CTX_DAG_RUN_ID"):
        lineage["lmpipe.airflow_run_id"] = settings.get("AIRFLOW_CTX_DAG_RUN_ID")
    tracking.ensure_model(c, cfg.tracking.model_name)
    v = c.create_model_version(cfg.tracking.model_name, source=source, run_id=run_id, tags=lineage)
    for k, val in lineage.items():
        c.set_tag(run_id, k, val)
    c.set_terminated(run_id, status="FINISHED")
    (run / "model_version.json").write_text(json.dumps({"name": cfg.tracking.model_name, "version": v.version,
                                                        "run_id": run_id, "source": source,
                                                        "checkpoint_step": marker["step"]}, indent=2))
    log(f"registered model version models:/{cfg.tracking.model_name}/{v.version} (MLflow run {run_id})")
    if check is None:
        log(f"no data-check result for {cfg.shards}: promotion will refuse this version", level="warning")
    return v.version


def _registered(run: Path, run_id: str, step: int) -> dict | None:
    """The version this MLflow run registered at this checkpoint step, if it did."""
    f = run / "model_version.json"
    mv = json.loads(f.read_text()) if f.is_file() else {}
    return mv if mv.get("run_id") == run_id and mv.get("checkpoint_step") == step else None


def log_metrics(run_id: str | None, line: dict, step: int) -> None:
    """Called by rank 0 while training: stream the step metrics to the MLflow run."""
    if not run_id:
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    metrics = [Metric(k, float(v), ts, step) for k, v in line.items() if k not in ("step", "time")
               and isinstance(v, (int, float))]
    MlflowClient().log_batch(run_id, metrics=metrics)
