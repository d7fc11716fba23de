"""The generated parts of the docs: the CLI and config references, and the tables that come from code.

    python -m lmpipe.cli.reference          # rewrite them
    python -m lmpipe.cli.reference --check  # exit 1, naming the files, when any has drifted

``docs/reference/cli.md`` is every command's ``--help``; ``docs/reference/config.md`` every
config key with its type, default and comment, from the dataclasses; the settings and exit
code tables in ``docs/concepts.md`` and the ZeRO sizing tables in
``docs/deploy/zero-sizing.md`` sit between ``<!-- name:start -->`` / ``<!-- name:end -->`` markers.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import typing
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
WIDTH = "100"  # argparse wraps --help to $COLUMNS: fixed, so the reference is the same everywhere


# ---------------------------------------------------------------- CLI


def cli_reference() -> str:
    from lmpipe.cli import VERBS, build_parser

    with mock.patch.dict(os.environ, {"COLUMNS": WIDTH}):
        parser = build_parser()
        subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        out = ["# CLI reference", "", "Generated from the argparse parsers by `python -m lmpipe.cli.reference`; "
               "a test fails when it drifts from the code.", "", "## lmpipe", "", "```", parser.format_help().rstrip(),
               "```"]
        for verb in VERBS:
            out += ["", f"## lmpipe {verb.name}", "", "```", subs.choices[verb.name].format_help().rstrip(), "```"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- config


def _comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class source: the comment lines right above it, then its own."""
    out, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").rstrip())
            continue
        m = re.match(r"\s+(\w+)\s*:", line)
        if m:
            own = line.split("  # ", 1)[1].strip() if "  # " in line else ""
            out[m.group(1)] = " ".join([*above, own]).strip()
        above = []
    return out


def _type_name(t) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return "null" if t is type(None) else getattr(t, "__name__", str(t))


def _rows(cls: type, prefix: str = "") -> list[str]:
    hints, comments, defaults = typing.get_type_hints(cls), _comments(cls), cls()
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        t, value = hints[f.name], getattr(defaults, f.name)
        if dataclasses.is_dataclass(t):
            nested.append((f.name, t))
            continue
        shown = "unset" if value is None else ("required" if value == "" else f"`{value!r}`" if not isinstance(
            value, bool) else f"`{str(value).lower()}`")
        what = comments.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{prefix}{f.name}` | {_type_name(t)} | {shown.replace('|', chr(92) + '|')} | {what} |")
    for name, t in nested:
        rows += _rows(t, f"{prefix}{name}.")
    return rows


def config_reference() -> str:
    from lmpipe.cli.runconfig import CLASSES

    out = ["# Config reference", "", "Every key of every stage's config, generated from the dataclasses by "
           "`python -m lmpipe.cli.reference`; a test fails when it drifts from the code. A key is set in "
           "its stage's section of a run config, in `--config FILE`, or as `key=value` on the command "
           "line (see [concepts](../concepts.md#config-one-run-config-one-flow)). `lmpipe config show VERB` "
           "prints the resolved values.", ""]
    for section, cls in CLASSES.items():
        out += [f"## {section}", "", f"`{cls.__module__}.{cls.__name__}`", "", "| key | type | default | what |",
                "| --- | --- | --- | --- |", *_rows(cls), ""]
    return "\n".join(out)


# ---------------------------------------------------------------- tables inside pages


def settings_table() -> str:
    from lmpipe import settings

    rows = ["| variable | default | set by | what |", "| --- | --- | --- | --- |"]
    for s in settings.SETTINGS.values():
        rows.append(f"| `{s.name}` | {f'`{s.default}`' if s.default else '-'} | {s.kind} | {s.help} |")
    return "\n".join(rows)


def exit_codes_table() -> str:
    from lmpipe.errors import EXIT_CODES

    return "\n".join(["| code | meaning |", "| --- | --- |",
                      *(f"| {int(code)} | {text} |" for code, text in EXIT_CODES.items())])


def zero_sizing() -> str:
    from training import ds_config

    return ds_config.runbook_sizing()


SECTIONS = {  # page -> {marker name: generator}
    DOCS / "concepts.md": {"settings": settings_table, "exit-codes": exit_codes_table},
    DOCS / "deploy" / "zero-sizing.md": {"zero-sizing": zero_sizing},
}
PAGES = {DOCS / "reference" / "cli.md": cli_reference, DOCS / "reference" / "config.md": config_reference}


def fill(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"the markers {start} ... {end} are missing")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{body.strip()}\n{end}{rest.split(end, 1)[1]}"


def expected() -> dict[Path, str]:
    """Every generated file's content, as the code says it should be."""
    out = {path: gen() for path, gen in PAGES.items()}
    for path, parts in SECTIONS.items():
        text = path.read_text()
        for name, gen in parts.items():
            text = fill(text, name, gen())
        out[path] = text
    return out


def main(argv: list[str] | None = None) -> int:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    stale = []
    for path, text in expected().items():
        if not path.is_file() or path.read_text() != text:
            stale.append(path.relative_to(ROOT).as_posix())
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if check and stale:
        print("drifted from the code: " + ", ".join(stale) + " (regenerate: python -m lmpipe.cli.reference)")
        return 1
    print(("rewrote " if stale else "up to date: ") + (", ".join(stale) if stale else "all generated docs"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
