"""Typed stage configs: load from YAML/JSON, apply dotted ``key=value`` overrides.

Every stage owns a small dataclass. Validation goes through pydantic's ``TypeAdapter`` on
those plain dataclasses, so an unknown key or a wrong type is an error that names the dotted
key (``tokenizer.vocab_size``), never a silently ignored typo.

A config file holds either one stage's keys, or a *run config*: one section per stage
(:data:`SECTIONS`), as ``lm_pipeline`` writes it to ``<run root>/run_config.yaml``. A stage
reads only its own section. Precedence, lowest first: the dataclass defaults (and, for
``train``, the recipe's), the file, ``key=value`` overrides, then the flags given.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from lmpipe.errors import ConfigError, StorageError

T = TypeVar("T")

FORBID = pydantic.ConfigDict(extra="forbid")

# The sections of a run config, one per stage, in pipeline order (``serve`` is read by
# ``lmpipe serve`` only; lm_pipeline writes the first five).
SECTIONS = ("tokenize", "check", "train", "evaluate", "promote", "serve")


def stage_config(cls: type[T]) -> type[T]:
    """Make ``cls`` a dataclass whose validation rejects unknown keys."""
    cls.__pydantic_config__ = FORBID  # type: ignore[attr-defined]
    return dataclasses.dataclass(cls)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=1`` -> (["a", "b"], 1). Values are parsed as YAML scalars/lists."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # an unparseable YAML scalar is just a string
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``dotted.key=value`` set."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return out


def _read(path: str | Path) -> tuple[str, str]:
    """(text, name) of a config file: a local path, ``file://`` or ``s3://`` URI."""
    from lmpipe.storage import open_store, split_uri

    text = str(path)
    if "://" not in text:
        p = Path(text).expanduser()
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        return p.read_text(), p.name
    parent, name = split_uri(text)
    try:
        return open_store(parent).get_bytes(name).decode("utf-8"), name
    except StorageError as exc:
        raise ConfigError(f"config file {text} cannot be read: {exc}") from None


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file (local, ``file://`` or ``s3://``) into a dict."""
    text, name = _read(path)
    suffix = Path(name).suffix
    try:
        data = yaml.safe_load(text) if suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid {suffix.lstrip('.').upper()}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def is_run_config(data: dict[str, Any]) -> bool:
    """Whether a config file's mapping is a run config (stage sections) rather than one stage's keys."""
    sections = [k for k in data if k in SECTIONS]
    if sections and len(sections) != len(data):
        other = sorted(k for k in data if k not in SECTIONS)
        raise ConfigError(f"config file mixes run-config sections ({', '.join(sections)}) with other keys "
                          f"({', '.join(other)}): put every key under its stage's section")
    return bool(sections)


def section_of(data: dict[str, Any], name: str) -> dict[str, Any]:
    """One stage's keys from a config file's mapping (its section of a run config, or all of it)."""
    if not is_run_config(data):
        return data
    sec = data.get(name) or {}
    if not isinstance(sec, dict):
        raise ConfigError(f"config section {name!r} must be a mapping")
    return sec


def _describe(err: dict[str, Any], prefix: str) -> str:
    key = prefix + (".".join(str(x) for x in err["loc"]) or "<root>")
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"unknown config key {key!r}"
    return f"config key {key!r}: {err['msg']} (got {err.get('input')!r})"


def build(cls: type[T], data: dict[str, Any] | None = None, overrides: list[str] | None = None,
          prefix: str = "") -> T:
    """Validate ``data`` (plus overrides) into the dataclass ``cls``. Errors name each key,
    after ``prefix`` (``train.`` names a key of a run config's train section)."""
    merged = apply_overrides(data or {}, overrides or [])
    try:
        return pydantic.TypeAdapter(cls).validate_python(merged)
    except pydantic.ValidationError as exc:
        raise ConfigError("; ".join(_describe(e, prefix) for e in exc.errors())) from None


def load(cls: type[T], path: str | Path | dict | None, overrides: list[str] | None = None,
         section: str | None = None) -> T:
    """Load ``cls`` from a file (its ``section`` of a run config), or from a mapping already
    loaded, plus overrides."""
    data: dict[str, Any] = {}
    if isinstance(path, dict):
        data = path
    elif path:
        data = load_file(path)
        if section:
            data = section_of(data, section)
    return build(cls, data, overrides)


def from_cli(cls: type[T], config_path, overrides: list[str], flags: dict[str, Any], section: str) -> T:
    """A stage config from its CLI: the file (or its section), then ``key=value`` overrides,
    then the flags that were given (``None`` means not given)."""
    extra = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    return load(cls, config_path, [*overrides, *extra], section=section)


def choices(cls: type, name: str) -> list:
    """The values a ``Literal`` field of a config dataclass allows (for forms and help)."""
    import typing

    return list(typing.get_args(typing.get_type_hints(cls)[name]))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def dump_yaml(data: Any) -> str:
    """YAML of a config (or a dict of configs), keys in their declared order."""
    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    elif isinstance(data, dict):
        data = {k: to_dict(v) if dataclasses.is_dataclass(v) else v for k, v in data.items()}
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100)
