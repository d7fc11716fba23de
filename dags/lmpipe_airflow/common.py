"""What every lmpipe task does: run a stage process, pass S3 credentials, and end with links.

Each stage runs as ``python -m lmpipe.cli VERB ...`` with an argument list, never a shell
string, so no param is ever interpreted by a shell. Progress goes to stderr through
:func:`lmpipe.log.log`; what a task produced (its links) goes to stdout as ``lmpipe:`` lines,
the last lines of its log.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

from lmpipe import settings
from lmpipe.errors import ExitCode
from lmpipe.log import log
from lmpipe.storage import is_s3, open_store, split_uri
from registry.tracking import MODEL_NAME, champion_uri

AWS_CONN = settings.get("LMPIPE_AWS_CONN_ID")


def champion_asset():
    """The asset a promotion emits and ``lm_serving_rollout`` is scheduled on (one definition for both DAGs)."""
    from airflow.sdk import Asset

    return Asset(champion_uri(MODEL_NAME), extra={"model": MODEL_NAME})


def needs_s3(*uris: str) -> bool:
    return any(is_s3(u) for u in uris)


def s3_env(*uris: str) -> dict[str, str]:
    """:func:`aws_env` when any of ``uris`` is on S3, else nothing (no connection lookup)."""
    return aws_env(AWS_CONN) if needs_s3(*uris) else {}


@contextlib.contextmanager
def s3_access(*uris: str) -> Iterator[None]:
    """The aws connection's credentials in this task's own environment while it reads or writes
    ``uris`` itself (the run config, the completion marker), and gone afterwards."""
    with mock.patch.dict(os.environ, s3_env(*uris)):
        yield


def checkpoint_env() -> dict[str, str]:
    """The checkpoint signing key (``LMPIPE_CHECKPOINT_KEY``) from the password of the Airflow
    connection ``LMPIPE_CHECKPOINT_CONN_ID``, for the train stage's environment only; masked in
    logs. Without that connection the trainers use their own (see training/checkpoint.py)."""
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException
    from airflow.sdk.log import mask_secret

    try:
        key = Connection.get(settings.get("LMPIPE_CHECKPOINT_CONN_ID")).password
    except AirflowNotFoundException:
        return {}
    if not key:
        return {}
    mask_secret(key)
    return {"LMPIPE_CHECKPOINT_KEY": key}


def aws_env(conn_id: str) -> dict[str, str]:
    """S3 credentials from the Airflow aws connection, as environment for a stage process.

    They are registered with Airflow's secrets masker, go to child processes only through
    their environment, and are never returned to XCom. A missing connection means boto3's
    own resolution (instance profile, env vars)."""
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    from airflow.sdk.log import mask_secret

    hook = AwsBaseHook(aws_conn_id=conn_id, client_type="s3")
    conn = hook.conn_config
    if conn.conn_id is None:  # the hook found no such connection
        log(f"no Airflow connection {conn_id!r}: boto3 resolves S3 credentials itself")
        return {}
    creds = hook.get_credentials()
    env = {"AWS_ACCESS_KEY_ID": creds.access_key, "AWS_SECRET_ACCESS_KEY": creds.secret_key}
    if creds.token:
        env["AWS_SESSION_TOKEN"] = creds.token
    # The secret and the token are masked in every log; the key id is not a secret (AWS prints it in
    # presigned URLs, which the task log hands out), and masking it would break those links.
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if name in env:
            mask_secret(env[name])
    if endpoint := conn.get_service_endpoint_url("s3"):
        env["AWS_ENDPOINT_URL"] = endpoint
        env["MLFLOW_S3_ENDPOINT_URL"] = endpoint
    if conn.region_name:
        env["AWS_DEFAULT_REGION"] = conn.region_name
    return env


def stage_command(args: list[str], host: str | None = None) -> list[str]:
    if host:
        return ["ssh", "-tt", "-o", "BatchMode=yes", host, shlex.join(["python", "-m", "lmpipe.cli", *args])]
    return [sys.executable, "-m", "lmpipe.cli", *args]


def stage(args: list[str], env: dict[str, str] | None = None, ok: tuple[int, ...] = (0,),
          host: str | None = None) -> int:
    """Run one lmpipe stage; its output streams into the task log. Bad input (a config error,
    a failed data check) fails the task without retries: running it again cannot help.

    With ``host`` the stage runs there over ssh: the remote shell gets every argument quoted
    (``shlex.join``), so a param still cannot become shell syntax, and ``-tt`` makes a kill of
    the task (a hang-up) reach the remote launcher and its ranks."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    cmd = stage_command(args, host)
    log("running " + " ".join(cmd))
    rc = subprocess.run(cmd, env={**os.environ, **(env or {})}).returncode
    if rc in ok:
        return rc
    what = f"lmpipe {args[0]} exited with code {rc}"
    if rc in (ExitCode.CONFIG, ExitCode.CHECKS_FAILED):
        raise AirflowFailException(what + " (bad input: not retried)")
    raise AirflowException(what)


def link(uri: str, presign: bool = False) -> str:
    """A clickable form of a storage URI for the task log: a file:// URL, or for an object on S3
    a presigned URL (``presign``: a page that stands alone, with S3 credentials at hand) or its URI."""
    if is_s3(uri):
        if not presign:
            return uri
        parent, name = split_uri(uri)
        return open_store(parent).presign(name)
    return Path(open_store(uri).root).as_uri()


LINKS_KEY = "lmpipe_links"  # the XCom the extra-link buttons read (plugins/lmpipe_links.py)


def links(presign: tuple[str, ...] = (), **named: str | None) -> None:
    """What this task produced, and where to look at it: the task log's last lines, and the
    ``lmpipe_links`` XCom behind the task's extra-link buttons in the Airflow UI. The XCom keeps
    ``s3://`` URIs (the UI presigns them when asked); the log presigns the ``presign`` names."""
    named = {k: v for k, v in named.items() if v}
    print("lmpipe: outputs of this task:", flush=True)
    for name, url in named.items():
        shown = link(url, presign=True) if name in presign and is_s3(url) else url
        print(f"lmpipe:   {name.replace('_', ' ')}: {shown}", flush=True)
    try:
        from airflow.sdk import get_current_context

        ti = get_current_context()["ti"]
    except Exception:  # not inside a running task (a unit test, a script)
        return
    ti.xcom_push(key=LINKS_KEY, value=named)
