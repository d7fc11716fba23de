"""lm-evaluation-harness against the server, as users run it: ``lm_eval --model
local-completions`` on a small multiple-choice task built from local files. The harness finds
the server's own tokenizer through ``/tokenizer_info`` and ``/tokenize``, sends token-id
prompts with ``echo`` and ``logprobs``, and scores each choice from the prompt logprobs. Its
per-choice loglikelihoods must equal a forward pass with transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmpipe import config
from serving.serve import ServeConfig
from serving_helpers import running, tiny_export

pytestmark = pytest.mark.slow

DOCS = [
    {"question": "def add(a, b):\n    return", "choices": ["a + b", "a - b", "None"], "answer": 0},
    {"question": "import", "choices": ["os", "sys", "json"], "answer": 1},
    {"question": "for i in", "choices": ["range(10):", "items:", "x"], "answer": 0},
    {"question": "class Config", "choices": [":", "(object):", "Base"], "answer": 2},
]
TASK = """task: lmpipe_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""


def loglikelihoods(export: Path) -> list[list[float]]:
    """The oracle: each choice's summed logprob after its question, with transformers alone
    (the continuation is the choice after a space, its tokens those of question + continuation
    past the question's, as the harness splits them)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(export)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    out = []
    for d in DOCS:
        ctx = tok(d["question"], add_special_tokens=False).input_ids
        row = []
        for choice in d["choices"]:
            whole = tok(d["question"] + " " + choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
            row.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
        out.append(row)
    return out


def test_lm_eval_local_completions_scores_what_transformers_scores(real_shards, tmp_path):
    export = tiny_export(tmp_path / "m", real_shards, seed=21)
    data = tmp_path / "task" / "docs.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "task" / "lmpipe_local_mc.yaml").write_text(TASK.format(data=data))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    with running(config.build(ServeConfig, {"model": str(export), "watch_interval_s": 0})) as base:
        r = subprocess.run([str(Path(sys.executable).parent / "lm_eval"), "--model", "local-completions",
                            "--model_args", f"model=m,base_url={base}/v1/completions,num_concurrent=1,max_retries=1",
                            "--tasks", "lmpipe_local_mc", "--include_path", str(tmp_path / "task"),
                            "--output_path", str(tmp_path / "out"), "--log_samples", "--batch_size", "1"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert "remote tokenizer" in (r.stdout + r.stderr).lower(), (r.stdout + r.stderr)[-3000:]
    samples = [json.loads(x) for f in (tmp_path / "out").rglob("samples_lmpipe_local_mc_*.jsonl")
               for x in f.read_text().splitlines()]
    got = {s["doc_id"]: [float(resp[0][0]) for resp in s["resps"]] for s in samples}
    expected = loglikelihoods(export)
    assert sorted(got) == list(range(len(DOCS)))
    for i, row in enumerate(expected):
        assert got[i] == pytest.approx(row, abs=1e-3), (i, got[i], row)
