#!/usr/bin/env bash
# Entrypoint of the lmpipe Airflow image: prepare what the command needs, then run it.
set -euo pipefail

if [[ "${1:-}" == airflow && "${2:-}" == api-server && -n "${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:-}" ]]; then
    # The admin's password comes from .env (AIRFLOW_ADMIN_PASSWORD). SimpleAuthManager reads its
    # users from [core] simple_auth_manager_users and their passwords from this file, which it
    # would otherwise fill with generated ones; it is rewritten at each start, so a changed
    # password in .env takes effect on the next `docker compose up`.
    python - <<'PY'
import json
import os

user = os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(",")[0].split(":")[0]
path = os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
with os.fdopen(fd, "w") as f:
    json.dump({user: os.environ["AIRFLOW_ADMIN_PASSWORD"]}, f)
PY
fi

exec "$@"
