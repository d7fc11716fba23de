"""The generated docs (CLI and config references, the settings, exit-code and ZeRO tables) match the code."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing

from lmpipe.cli import reference, runconfig


def test_generated_docs_have_not_drifted_from_the_code():
    r = subprocess.run([sys.executable, "-m", "lmpipe.cli.reference", "--check"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_the_config_reference_lists_every_key_of_every_section():
    text = reference.config_reference()
    for section, cls in runconfig.CLASSES.items():
        body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
        for key in _keys(cls):
            assert f"| `{key}` |" in body, (section, key)
