"""Typed stage configs: load from YAML/JSON, apply dotted ``key=value`` overrides.

Every stage owns a small dataclass. Validation goes through pydantic's
``TypeAdapter`` on those plain dataclasses, so an unknown key or a wrong type
is an error that names the dotted key (``tokenizer.vocab_size``), never a
silently ignored typo (the llm-foundry trap).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from lmpipe.errors import ConfigError

T = TypeVar("T")

FORBID = pydantic.ConfigDict(extra="forbid")


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


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON config file into a dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) if p.suffix in (".yaml", ".yml") else json.loads(p.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {p} is not valid {p.suffix.lstrip('.').upper()}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return data


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(x) for x in err["loc"]) or "<root>"
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"unknown config key {key!r}"
    return f"config key {key!r}: {err['msg']} (got {err.get('input')!r})"


def build(cls: type[T], data: dict[str, Any] | None = None, overrides: list[str] | None = None) -> T:
    """Validate ``data`` (plus overrides) into the dataclass ``cls``."""
    merged = apply_overrides(data or {}, overrides or [])
    try:
        return pydantic.TypeAdapter(cls).validate_python(merged)
    except pydantic.ValidationError as exc:
        raise ConfigError("; ".join(_describe(e) for e in exc.errors())) from None


def load(cls: type[T], path: str | Path | None, overrides: list[str] | None = None, section: str | None = None) -> T:
    """Load ``cls`` from a file (optionally one ``section`` of a pipeline file) plus overrides."""
    data: dict[str, Any] = {}
    if path:
        data = load_file(path)
        if section and section in data and isinstance(data[section], dict):
            data = data[section]
    return build(cls, data, overrides)


def from_cli(cls: type[T], config_path, overrides: list[str], flags: dict[str, Any], section: str) -> T:
    """A stage config from its CLI: file (or its ``section``), then ``key=value`` overrides,
    then the flags that were given (``None`` means not given)."""
    extra = [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    return load(cls, config_path, [*overrides, *extra], section=section)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)
