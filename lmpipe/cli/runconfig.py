"""Run configs: one resolved config for a whole pipeline run, one section per stage.

``lm_pipeline``'s first task builds one from the trigger's params and writes it to
``<run root>/run_config.yaml``; every later task hands its stage ``--config`` that file, and
each stage reads only its section. A run config from the CLI gets the same checks: every
section is validated by its stage's dataclass (an unknown key names its section), the train
section is resolved against its recipe, and settings that contradict each other across
stages are refused before any work starts, naming both keys.
"""

from __future__ import annotations

from typing import Any

from lmpipe import config as cfglib
from lmpipe.errors import ConfigError
from data_checks.check_data import CheckConfig
from registry.promote import PromoteConfig
from serving.serve import ServeConfig
from spark_jobs.config import TokenizeConfig
from training import config as train_config
from training.config import TrainConfig
from training.evaluate import EvalConfig

CLASSES: dict[str, type] = {"tokenize": TokenizeConfig, "check": CheckConfig, "train": TrainConfig,
                            "evaluate": EvalConfig, "promote": PromoteConfig, "serve": ServeConfig}
PIPELINE = ("tokenize", "check", "train", "evaluate", "promote")  # what lm_pipeline writes
assert tuple(CLASSES) == cfglib.SECTIONS

# Settings one stage takes from another unless its own section sets them: the corpus gate reads
# the corpus the way tokenize will, and every stage reaches storage and the registry alike.
FOLLOWS = {
    ("check", "reader"): ("tokenize", "reader"),
    ("check", "storage"): ("tokenize", "storage"),
    ("train", "storage"): ("tokenize", "storage"),
    ("evaluate", "storage"): ("train", "storage"),
    ("evaluate", "tracking"): ("train", "tracking"),
    ("promote", "tracking"): ("train", "tracking"),
    ("promote", "storage"): ("train", "storage"),
}

HEADER = "# lmpipe run config: one section per stage; each stage reads only its own (`lmpipe config show VERB`).\n"


def build_section(name: str, data: dict[str, Any] | None = None, overrides: list[str] | None = None):
    """One section's config, validated; the train section resolved against its recipe."""
    cfg = cfglib.build(CLASSES[name], data or {}, overrides, prefix=f"{name}.")
    if name == "train":
        cfg = train_config.resolve(cfg, prefix="train.")
    return cfg


def followed(data: dict[str, Any], overrides: dict[str, list[str]] | None = None,
             sections: tuple[str, ...] = PIPELINE) -> dict[str, dict[str, Any]]:
    """Each section's own keys, plus what it follows from another section (:data:`FOLLOWS`)."""
    unknown = sorted(set(data) - set(CLASSES))
    if unknown:
        raise ConfigError(f"unknown config section(s) {', '.join(map(repr, unknown))} "
                          f"(known: {', '.join(CLASSES)})")
    overrides = overrides or {}
    out: dict[str, dict[str, Any]] = {}
    for name in sections:
        if not isinstance(data.get(name) or {}, dict):
            raise ConfigError(f"config section {name!r} must be a mapping")
        own = dict(data.get(name) or {})
        for (dst, key), (src, src_key) in FOLLOWS.items():
            if dst == name and src in out and not _sets(own, overrides.get(name), key):
                src_cfg = cfglib.build(CLASSES[src], out[src], overrides.get(src), prefix=f"{src}.")
                own[key] = cfglib.to_dict(src_cfg)[src_key]
        out[name] = own
    return out


def resolve(data: dict[str, Any], overrides: dict[str, list[str]] | None = None,
            sections: tuple[str, ...] = PIPELINE) -> dict[str, Any]:
    """Every section of a run config, validated, resolved and checked across stages."""
    overrides = overrides or {}
    run = {name: build_section(name, own, overrides.get(name))
           for name, own in followed(data, overrides, sections).items()}
    check(run)
    return run


def _sets(data: dict[str, Any], overrides: list[str] | None, key: str) -> bool:
    """Whether a section's data or overrides set ``key`` (or a key below it)."""
    return key in data or any(o.split("=", 1)[0].strip() == key or o.startswith(key + ".") for o in overrides or [])


def check(run: dict[str, Any]) -> None:
    """Settings that contradict each other across stages."""
    tok, train = run.get("tokenize"), run.get("train")
    if tok is not None and train is not None:
        positions = train.model["max_position_embeddings"]
        if tok.seq_len > positions:
            raise ConfigError(f"config key 'tokenize.seq_len' is {tok.seq_len} but 'train.model.max_position_embeddings' "
                              f"is {positions} (recipe {train.recipe!r}): lower the one or raise the other")


def section_data(path: str, name: str) -> dict[str, Any] | None:
    """A stage's keys from a run config file, after checking the whole file (every section and
    the rules across them), with what the section follows filled in; None when the file is
    one stage's own keys."""
    data = cfglib.load_file(path)
    if not cfglib.is_run_config(data):
        return None
    present = tuple(k for k in CLASSES if k in data or k == name)
    resolve(data, sections=present)
    return followed(data, sections=present)[name]


def dump(run: dict[str, Any]) -> str:
    return HEADER + cfglib.dump_yaml(run)


def show(section: str, path: str | None, overrides: list[str]) -> str:
    """One stage's resolved config as YAML, with every default, as the stage would run with it."""
    data = {}
    if path:
        data = section_data(path, section)
        data = cfglib.load_file(path) if data is None else data
    return cfglib.dump_yaml({section: build_section(section, data, overrides)})
