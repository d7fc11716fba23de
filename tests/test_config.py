import json

import pytest

from lmpipe import config
from lmpipe.errors import ConfigError
from spark_jobs.tokenize_shard import TokenizeConfig


def test_defaults_and_dotted_overrides():
    cfg = config.build(TokenizeConfig, {"corpus": "c", "out": "o"}, ["seq_len=128", "tokenizer.vocab_size=1000",
                                                                     "reader.text_field=body", "dedup=false"])
    assert (cfg.seq_len, cfg.tokenizer.vocab_size, cfg.reader.text_field, cfg.dedup) == (128, 1000, "body", False)
    assert cfg.validation_fraction == 0.02  # untouched default


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="unknown config key 'seq_lenn'"):
        config.build(TokenizeConfig, {}, ["seq_lenn=3"])
    with pytest.raises(ConfigError, match="unknown config key 'tokenizer.vocab'"):
        config.build(TokenizeConfig, {"tokenizer": {"vocab": 3}})


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="config key 'seq_len'.*integer"):
        config.build(TokenizeConfig, {}, ["seq_len=abc"])
    with pytest.raises(ConfigError, match="config key 'reader.long_doc_policy'"):
        config.build(TokenizeConfig, {}, ["reader.long_doc_policy=explode"])
    with pytest.raises(ConfigError, match="config key 'tokenizer'"):
        config.build(TokenizeConfig, {"tokenizer": 5})


def test_malformed_override():
    with pytest.raises(ConfigError, match="not of the form"):
        config.build(TokenizeConfig, {}, ["seq_len"])
    with pytest.raises(ConfigError, match="is not a section"):
        config.build(TokenizeConfig, {}, ["seq_len=4", "seq_len.x=1"])


def test_yaml_and_json_files_with_a_stage_section(tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text("tokenize:\n  seq_len: 64\n  tokenizer:\n    vocab_size: 777\n")
    j = tmp_path / "p.json"
    j.write_text(json.dumps({"seq_len": 65}))
    assert config.load(TokenizeConfig, y, section="tokenize").tokenizer.vocab_size == 777
    assert config.load(TokenizeConfig, j, ["seq_len=66"], section="tokenize").seq_len == 66
    bad = tmp_path / "bad.yaml"
    bad.write_text("tokenize: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(TokenizeConfig, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(TokenizeConfig, tmp_path / "missing.yaml")


def test_dump_round_trips():
    cfg = config.build(TokenizeConfig, {"corpus": "c", "spark_conf": {"a": "b"}})
    assert config.build(TokenizeConfig, json.loads(config.dump(cfg))) == cfg
