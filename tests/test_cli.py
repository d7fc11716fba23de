"""The ``lmpipe`` command itself: its version, and help that shows defaults and required flags."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from importlib import metadata

import pytest

from lmpipe.cli import VERBS
from lmpipe.errors import EXIT_CODES, ExitCode


def lmpipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmpipe.cli", *args], capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})


def test_version_is_the_installed_packages():
    r = lmpipe("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"lmpipe {metadata.version('lmpipe')}"


def test_top_level_help_lists_every_command_and_every_exit_code():
    r = lmpipe("--help")
    assert r.returncode == 0
    for verb in VERBS:
        assert re.search(rf"^\s+{re.escape(verb.name)}\s", r.stdout, re.M), verb.name
    for code in ExitCode:
        assert re.search(rf"^\s+{int(code)}\s+\S", r.stdout, re.M), code
    assert set(EXIT_CODES) == set(ExitCode)


@pytest.mark.parametrize("verb,flag,shown", [
    ("tokenize", "--seq-len", "(seq_len; default: 256)"),
    ("tokenize", "--corpus", "(corpus; required: here or in --config)"),
    ("tokenize", "--vocab-size", "(tokenizer.vocab_size; default: 4096)"),
    ("train", "--zero-stage", "(deepspeed.zero_stage; default: 2)"),
    ("train", "--shards", "(shards; required: here or in --config)"),
    ("train", "--recipe", "(recipe; default: tiny)"),
    ("evaluate", "--model", "(model; required: here or in --config)"),
    ("promote", "--margin", "(margin; default: 0.01)"),
    ("serve", "--port", "(port; default: 8000)"),
    ("demo-corpus", "--sources", "(default: docs,stdlib)"),
])
def test_help_shows_defaults_and_marks_required_flags(verb, flag, shown):
    r = lmpipe(verb, "--help")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    start = next(i for i, x in enumerate(lines) if x.strip().startswith(flag))
    block = [lines[start], *itertools.takewhile(lambda x: x.startswith(" " * 8), lines[start + 1:])]  # wrapped help
    text = " ".join(x.strip() for x in block)
    assert text.endswith(shown), text


def test_every_commands_help_works():
    for verb in VERBS:
        r = lmpipe(verb.name, "--help")
        assert r.returncode == 0 and r.stdout.startswith(f"usage: lmpipe {verb.name}"), (verb.name, r.stderr)


def test_a_bad_command_line_is_a_config_error():
    r = lmpipe("train", "--zero-stage", "two")
    assert r.returncode == ExitCode.CONFIG and "invalid int value" in r.stderr
