#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU: the `gpu` tests and the MFU benchmark of
# gpt2-124m at seq 1024. One JSON line per result on stdout; at most 10 minutes in all.
#
#   bash bench/gpu.sh            # with the repository's .venv, or PYTHON=/path/to/python
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
export PYTHONPATH="$PWD:$PWD/dags${PYTHONPATH:+:$PYTHONPATH}"
export LMPIPE_HOME="${LMPIPE_HOME:-$(mktemp -d)}"

"$PY" - <<'PY'
import json, torch
print(json.dumps({"bench": "gpu", "metric": "device", "cuda": torch.cuda.is_available(),
                  "name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  "torch": torch.__version__, "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}))
PY

start=$(date +%s)
timeout 330 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml="$LMPIPE_HOME/gpu.xml" >&2
rc=$?
"$PY" - "$LMPIPE_HOME/gpu.xml" "$rc" "$(( $(date +%s) - start ))" <<'PY'
import json, sys, xml.etree.ElementTree as ET
path, rc, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
try:
    cases = ET.parse(path).getroot().iter("testcase")
    for c in cases:
        state = "failed" if c.find("failure") is not None or c.find("error") is not None else \
                "skipped" if c.find("skipped") is not None else "passed"
        print(json.dumps({"bench": "gpu", "metric": "test", "name": c.get("name"), "state": state,
                          "seconds": round(float(c.get("time", 0)), 1)}))
except (OSError, ET.ParseError):
    pass
print(json.dumps({"bench": "gpu", "metric": "tests", "exit_code": rc, "seconds": secs}))
PY

# MFU of gpt2-124m at seq 1024 on one GPU: ZeRO-2 and ZeRO-3 against a plain PyTorch loop.
timeout 240 "$PY" bench/bench_train.py --recipe gpt2-124m --seq-len 1024 --micro 16 --steps 40 --warmup 10
echo "{\"bench\": \"gpu\", \"metric\": \"bench_train\", \"exit_code\": $?}"
