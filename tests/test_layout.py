"""The shape of the house: the core package knows no stage, and code stays short enough to read.

The core (``lmpipe/``) holds what every stage shares; only its CLI (``lmpipe/cli/``) knows the
stage packages. The limits on function and file length are the ones docs/contributing.md
states, with its list of the files allowed to be longer and why.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("spark_jobs", "data_checks", "training", "registry", "serving", "lmpipe_airflow")
PRODUCT = ("lmpipe", "spark_jobs", "data_checks", "training", "registry", "serving", "dags", "bench", "docker")
MAX_FUNCTION_LINES, MAX_FILE_LINES = 60, 400


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth, including ``importlib.import_module("x")``."""
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            out.add(str(node.args[0].value))
    return out


def test_no_core_module_imports_a_stage_package():
    core = [p for p in (ROOT / "lmpipe").rglob("*.py") if "cli" not in p.relative_to(ROOT / "lmpipe").parts]
    assert len(core) >= 7
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.split(".")[0] in STAGES)
                 for p in core}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_cli_is_where_the_core_meets_the_stages():
    cli = set().union(*(imported_modules(p) for p in (ROOT / "lmpipe" / "cli").rglob("*.py")))
    assert {m.split(".")[0] for m in cli} >= {"spark_jobs", "data_checks", "training", "registry", "serving"}


def long_files() -> dict[str, str]:
    """The files docs/contributing.md allows past the limit, with its reason for each."""
    text = (ROOT / "docs" / "contributing.md").read_text()
    m = re.search(r"<!-- long-files:start -->\n(.*?)\n<!-- long-files:end -->", text, re.DOTALL)
    assert m, "docs/contributing.md lost its long-files markers"
    rows = [line.split("|")[1:3] for line in m.group(1).splitlines()[2:]]
    return {f.strip().strip("`"): why.strip() for f, why in rows}


def product_files() -> list[Path]:
    return sorted(p for top in PRODUCT for p in (ROOT / top).rglob("*.py"))


def test_files_stay_short_or_say_why():
    allowed = long_files()
    over = {str(p.relative_to(ROOT)): n for p in product_files() if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert set(over) <= set(allowed), f"files over {MAX_FILE_LINES} lines that docs/contributing.md does not list: " \
                                      f"{ {k: v for k, v in over.items() if k not in allowed} }"
    assert all(allowed.values())
    stale = set(allowed) - set(over)
    assert not stale, f"docs/contributing.md lists files that are no longer long: {stale}"


def test_functions_stay_short():
    over = {}
    for p in product_files():
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    over[f"{p.relative_to(ROOT)}:{node.name}"] = n
    assert over == {}, f"functions over {MAX_FUNCTION_LINES} lines: {over}"


def test_no_bench_script_shadows_a_standard_module():
    import sys

    clashes = [p.name for p in (ROOT / "bench").glob("*.py") if p.stem in sys.stdlib_module_names]
    assert clashes == []
