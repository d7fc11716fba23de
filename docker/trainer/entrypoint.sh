#!/usr/bin/env bash
# Trainer node. No arguments: run sshd in the foreground (the compose service, and every node
# of a multi-node run). Arguments: run them (e.g. `lmpipe train ...` in a Kubernetes pod).
set -euo pipefail

# An ssh session does not inherit the container's environment; sshd's PermitUserEnvironment
# takes these names from ~/.ssh/environment (one NAME=value per line).
mkdir -p -m 0700 "$HOME/.ssh"
env | grep -E '^(PATH|LD_LIBRARY_PATH|LMPIPE_[A-Z0-9_]+|MLFLOW_[A-Z0-9_]+|AWS_[A-Z0-9_]+|NCCL_[A-Z0-9_]+|CUDA_[A-Z0-9_]+|NVIDIA_[A-Z0-9_]+|HF_[A-Z0-9_]+|PYTHONUNBUFFERED)=' \
    > "$HOME/.ssh/environment" || true
chmod 0600 "$HOME/.ssh/environment"

if [[ $# -eq 0 ]]; then
    exec /usr/sbin/sshd -D -e -f /etc/lmpipe/sshd_config
fi
exec "$@"
