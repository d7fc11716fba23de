"""One run config, one flow: sections, recipe resolution, the rules across stages, and the CLI's
``--config``. Expected values are the recipes' published numbers and hand-written keys."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from lmpipe import config
from lmpipe.cli import runconfig
from lmpipe.errors import ConfigError


def lmpipe(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmpipe.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def test_config_show_prints_every_default_and_the_recipes_values():
    r = lmpipe("config", "show", "train", "recipe=gpt2-124m")
    assert r.returncode == 0, r.stderr
    train = yaml.safe_load(r.stdout)["train"]
    # llm.c's GPT-2 (124M) recipe: lr 6e-4, 700 warmup steps, 512 x 1024 tokens per step
    assert (train["optim"]["lr"], train["optim"]["warmup_steps"], train["global_batch_size"]) == (6e-4, 700, 512)
    assert train["model"]["hidden_size"] == 768 and train["model"]["num_layers"] == 12
    assert train["deepspeed"]["extra"] == {} and train["launch"]["num_nodes"] == 1  # defaults are printed too
    r = lmpipe("config", "show", "tokenize")
    assert yaml.safe_load(r.stdout)["tokenize"]["reader"]["text_field"] == "text"


def test_a_recipe_flag_never_trains_with_the_tiny_recipes_learning_rate(tmp_path):
    from lmpipe.cli import build_parser
    from training import config as train_config
    from training.launcher import config_from_args

    args = build_parser().parse_args(["train", "--shards", "s", "--out", "o", "--recipe", "gpt2-124m"])
    assert train_config.resolve(config_from_args(args)).optim.lr == 6e-4
    args = build_parser().parse_args(["train", "--recipe", "gpt2-124m", "optim.lr=1e-3", "max_steps=7"])
    cfg = train_config.resolve(config_from_args(args))
    assert (cfg.optim.lr, cfg.max_steps, cfg.optim.warmup_steps) == (1e-3, 7, 700)  # what is set wins
    tiny = train_config.resolve(config.build(train_config.TrainConfig, {}))
    assert (tiny.optim.lr, tiny.micro_batch_size, tiny.grad_accum, tiny.max_steps) == (3e-3, 8, 1, 150)


def test_seq_len_beyond_the_recipes_positions_names_both_keys():
    with pytest.raises(ConfigError, match=r"'tokenize.seq_len' is 2048 but 'train.model.max_position_embeddings' is 1024"):
        runconfig.resolve({"tokenize": {"seq_len": 2048}, "train": {"recipe": "tiny"}})
    run = runconfig.resolve({"tokenize": {"seq_len": 2048}, "train": {"model": {"max_position_embeddings": 2048}}})
    assert run["train"].model["max_position_embeddings"] == 2048


def test_nodes_against_the_hostfile_name_both_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.launch.num_nodes' is 2: more than one node needs 'train.launch.hostfile'"):
        runconfig.resolve({"train": {"launch": {"num_nodes": 2}}})
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one node\ngpu-0 slots=4\n")
    with pytest.raises(ConfigError, match=r"'train.launch.num_nodes' is 2 but 'train.launch.hostfile' .* lists 1 host"):
        runconfig.resolve({"train": {"launch": {"num_nodes": 2, "hostfile": str(hostfile)}}})
    with pytest.raises(ConfigError, match=r"'train.launch.nproc' is 8 but 'train.launch.hostfile' gives gpu-0 fewer slots"):
        runconfig.resolve({"train": {"launch": {"nproc": 8, "hostfile": str(hostfile)}}})
    hostfile.write_text("gpu-0 slots=4\ngpu-1 slots=4\n")
    assert runconfig.resolve({"train": {"launch": {"num_nodes": 2, "nproc": 4, "hostfile": str(hostfile)}}})


def test_offload_against_the_zero_stage_names_both_keys():
    with pytest.raises(ConfigError, match=r"'train.deepspeed.offload_params' needs 'train.deepspeed.zero_stage' 3"):
        runconfig.resolve({"train": {"deepspeed": {"zero_stage": 2, "offload_params": True}}})
    with pytest.raises(ConfigError, match=r"'train.deepspeed.offload_optimizer' needs 'train.deepspeed.zero_stage'"):
        runconfig.resolve({"train": {"deepspeed": {"zero_stage": 0, "offload_optimizer": True}}})


def test_unknown_keys_and_sections_are_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'check.max_dup'"):
        runconfig.resolve({"check": {"max_dup": 1}})
    with pytest.raises(ConfigError, match=r"unknown config key 'train.model.hidden'"):
        runconfig.resolve({"train": {"model": {"hidden": 3}}})
    with pytest.raises(ConfigError, match=r"unknown config section\(s\) 'trian'"):
        runconfig.resolve({"trian": {}})
    with pytest.raises(ConfigError, match=r"unknown config key 'tokenize.seq_lenn'"):
        runconfig.resolve({}, {"tokenize": ["seq_lenn=3"]})


def test_the_corpus_gate_reads_the_corpus_the_way_tokenize_does():
    run = runconfig.resolve({"tokenize": {"reader": {"text_field": "body"}}})
    assert run["check"].reader.text_field == "body"
    run = runconfig.resolve({"tokenize": {"reader": {"text_field": "body"}}}, {"check": ["reader.text_field=content"]})
    assert run["check"].reader.text_field == "content"  # a section's own setting wins
    run = runconfig.resolve({"train": {"tracking": {"model_name": "coder"}}})
    assert run["evaluate"].tracking.model_name == run["promote"].tracking.model_name == "coder"


def test_deepspeed_extra_passes_other_keys_and_refuses_typed_ones():
    from training import ds_config
    from training.config import TrainConfig, resolve

    cfg = resolve(config.build(TrainConfig, {"deepspeed": {"extra": {
        "zero_optimization": {"reduce_bucket_size": 2e8}, "wall_clock_breakdown": True}}}))
    ds = ds_config.build(cfg, ds_config.batch(8, 1, 2), "fp32")
    assert ds["zero_optimization"]["reduce_bucket_size"] == 2e8 and ds["wall_clock_breakdown"] is True
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 16  # typed keys kept
    for extra, key in (({"train_batch_size": 64}, "global_batch_size"),
                       ({"zero_optimization": {"stage": 3}}, "deepspeed.zero_stage"),
                       ({"bf16": {"enabled": True}}, "deepspeed.precision")):
        cfg = resolve(config.build(TrainConfig, {"deepspeed": {"extra": extra}}))
        with pytest.raises(ConfigError, match=f"is set by '{key}'"):
            ds_config.build(cfg, ds_config.batch(8, 1, 2), "fp32")


def test_a_stage_given_a_run_config_reads_its_section_after_checking_the_whole_file(tmp_path):
    good = {"tokenize": {"seq_len": 64, "reader": {"text_field": "body"}}, "check": {"max_duplicate_rate": 0.5}}
    f = tmp_path / "run_config.yaml"
    f.write_text(yaml.safe_dump(good))
    r = lmpipe("config", "show", "check", "--config", str(f))
    check = yaml.safe_load(r.stdout)["check"]
    assert check["max_duplicate_rate"] == 0.5 and check["reader"]["text_field"] == "body"
    # a mistake in another section stops a stage before it writes anything
    f.write_text(yaml.safe_dump({**good, "train": {"optim": {"lr": "fast"}}}))
    out = tmp_path / "shards"
    r = lmpipe("tokenize", "--config", str(f), "--corpus", str(tmp_path), "--out", str(out))
    assert r.returncode == 2 and "config key 'train.optim.lr'" in r.stderr, r.stderr
    assert not out.exists()
    f.write_text(yaml.safe_dump({"tokenize": {"seq_len": 64}, "seq_len": 3}))
    r = lmpipe("config", "show", "tokenize", "--config", str(f))
    assert r.returncode == 2 and "mixes run-config sections (tokenize) with other keys (seq_len)" in r.stderr


def test_the_dag_writes_a_run_config_that_reloads_to_the_same_settings(tmp_path, monkeypatch):
    from lmpipe_airflow import lm_pipeline as tasks

    monkeypatch.delenv("LMPIPE_HOSTFILE", raising=False)
    params = {"corpus": str(tmp_path / "corpus"), "output": str(tmp_path / "out"), "recipe": "tiny",
              "vocab_size": 512, "seq_len": 128, "zero_stage": 3, "nproc": None, "nodes": 1, "max_steps": None,
              "warm_start": True, "margin": 0.05, "tokenize_overrides": ["reader.text_field=body"],
              "check_overrides": [], "train_overrides": ["optim.lr=0.01"], "evaluate_overrides": [],
              "promote_overrides": ["report=false"]}
    plan = tasks.plan(params, "manual__2026-12-01T00:00:00+00:00", {"seq_len": 128})
    written = yaml.safe_load(open(plan["config"]).read())  # read back with a plain YAML reader
    assert written["tokenize"]["seq_len"] == 128 and written["tokenize"]["tokenizer"]["vocab_size"] == 512
    assert written["check"]["reader"]["text_field"] == "body" and written["check"]["results"] == plan["checks"]
    assert written["train"]["optim"]["lr"] == 0.01 and written["train"]["max_steps"] == 150  # the recipe's
    assert written["train"]["init_from"] == "models:/lmpipe@champion" and written["train"]["init_missing"] == "scratch"
    assert written["train"]["deepspeed"]["zero_stage"] == 3 and written["promote"]["report"] is False
    assert written["evaluate"]["model"] == f"{plan['train']}/export" and written["promote"]["margin"] == 0.05
    assert runconfig.resolve(written) == runconfig.resolve(json.loads(json.dumps(written)))
    with pytest.raises(Exception, match="unknown param"):
        tasks.plan(params, "r2", {"overrides": ["max_steps=3"]})
    with pytest.raises(Exception, match="unknown config key 'train.optim.learning_rate'"):
        tasks.plan({**params, "train_overrides": ["optim.learning_rate=1"]}, "r3", {})
