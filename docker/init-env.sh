#!/usr/bin/env sh
# Write docker/.env from docker/.env.example, replacing every `change-me` with a fresh random
# secret (hex; the Fernet key in its own format). Refuses to overwrite an existing .env.
#   sh docker/init-env.sh [TARGET]
set -eu
here=$(cd "$(dirname "$0")" && pwd)
target=${1:-$here/.env}
if [ -e "$target" ]; then
    echo "$target exists: not overwriting it (delete it first to start over)" >&2
    exit 1
fi
umask 077
hex() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
fernet() { head -c 32 /dev/urandom | base64 | tr '+/' '-_'; }
while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in
        AIRFLOW_FERNET_KEY=change-me) echo "AIRFLOW_FERNET_KEY=$(fernet)" ;;
        *=change-me) echo "${line%%=*}=$(hex)" ;;
        *) echo "$line" ;;
    esac
done < "$here/.env.example" > "$target"
echo "wrote $target"
