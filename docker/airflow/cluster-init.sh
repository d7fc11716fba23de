#!/usr/bin/env bash
# One-shot (compose service cluster-init): what the Airflow workers and the trainer nodes need
# to reach each other over ssh. Keys are made once per deployment, inside volumes, never in git;
# the hostfile is rewritten at each start from TRAINER_GPUS.
#   /etc/lmpipe/cluster (Airflow and trainers): id_ed25519[.pub], authorized_keys, known_hosts, hostfile
#   /etc/lmpipe/sshd    (trainers only):        ssh_host_ed25519_key[.pub]
set -euo pipefail
umask 077
cluster=/etc/lmpipe/cluster
sshd=/etc/lmpipe/sshd

[[ -f $cluster/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -C lmpipe-cluster -f "$cluster/id_ed25519"
[[ -f $sshd/ssh_host_ed25519_key ]] || ssh-keygen -q -t ed25519 -N '' -C lmpipe-trainer -f "$sshd/ssh_host_ed25519_key"
cp "$cluster/id_ed25519.pub" "$cluster/authorized_keys"
# Every trainer node presents the same host key, so one wildcard line pins them all.
echo "* $(cut -d' ' -f1,2 "$sshd/ssh_host_ed25519_key.pub")" > "$cluster/known_hosts"
# DeepSpeed hostfile: one "host slots=GPUs" line per node; the first host runs the launcher.
printf 'trainer slots=%s\n' "${TRAINER_GPUS:-1}" > "$cluster/hostfile"
echo "cluster-init: ssh identity, trainer host key and hostfile are in place"
