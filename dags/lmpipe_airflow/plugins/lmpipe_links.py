"""Airflow plugin: what an lmpipe task produced, as extra-link buttons on the task in the UI.

Each task stores its outputs in the ``lmpipe_links`` XCom (see ``lmpipe_airflow.common.links``).
The api-server turns them into buttons: Data Docs, shard manifest, report, MLflow run and model
version. An ``s3://`` output becomes a presigned URL made when the page asks for it (from the
``aws_default`` connection, valid for an hour), so the button works without S3 credentials in
the browser. Point ``[core] plugins_folder`` at this folder (``make stack`` and compose do).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink

LINKS_KEY = "lmpipe_links"
PRESIGN_S = 3600


def stored_links(ti_key) -> dict:
    """The ``lmpipe_links`` XCom of a task instance, read from the metadata DB (api-server side)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(XComModel.get_many(run_id=ti_key.run_id, key=LINKS_KEY, dag_ids=ti_key.dag_id,
                                                 task_ids=ti_key.task_id, map_indexes=ti_key.map_index)).first()
        value = XComModel.deserialize_value(row) if row is not None else None
    return value if isinstance(value, dict) else {}


def browser_url(uri: str) -> str:
    """An ``s3://`` URI as a presigned GET URL; anything else as it is."""
    if not uri.startswith("s3://"):
        return uri
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from lmpipe import settings

    bucket, _, key = uri[5:].partition("/")
    client = S3Hook(aws_conn_id=settings.get("LMPIPE_AWS_CONN_ID")).get_conn()
    return client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGN_S)


class _Link(BaseOperatorLink):
    key = ""

    def get_link(self, operator, *, ti_key) -> str:
        uri = stored_links(ti_key).get(self.key)
        return browser_url(uri) if uri else ""


class DataDocsLink(_Link):
    name, key = "Data Docs", "data_docs"


class ShardManifestLink(_Link):
    name, key = "Shard manifest", "shard_manifest"


class ReportLink(_Link):
    name, key = "Report", "report"


class MlflowRunLink(_Link):
    name, key = "MLflow run", "mlflow_run"


class ModelVersionLink(_Link):
    name, key = "Model version", "model_version"


class LmpipeLinksPlugin(AirflowPlugin):
    name = "lmpipe_links"
    global_operator_extra_links = [DataDocsLink(), ShardManifestLink(), ReportLink(), MlflowRunLink(),
                                   ModelVersionLink()]
