"""docker/: the compose stack, the images and the runbook agree with the code.

No Docker engine runs in CI, so everything here is static: the compose file and the
Dockerfiles are parsed, hadolint lints them, and the environment names they set are
checked against the names the code reads (lmpipe/settings.py) and Airflow's own config.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmpipe import settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
RUNBOOK = ROOT / "docs" / "deploy" / "zero-sizing.md"
POD_TEMPLATE = DOCKER / "k8s" / "train-pod.yaml"

SCANNED = ("lmpipe", "spark_jobs", "data_checks", "training", "registry", "serving", "dags", "docker")
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
SERVICE_KEYS = {"build", "image", "command", "entrypoint", "environment", "env_file", "ports", "volumes",
                "depends_on", "healthcheck", "restart", "profiles", "hostname", "deploy", "shm_size", "ulimits",
                "user", "working_dir", "networks", "labels", "expose", "init", "stop_grace_period", "ipc"}


# ---------------------------------------------------------------- helpers


def env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not NAME=value"
            out[name.strip()] = value
    return out


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error} and $$."""
    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if op in (":-", ":?") and not value or op in ("-", "?") and value is None:
            return arg if op in (":-", "-") else ""
        return value or ""
    return VAR.sub(sub, text.replace("$$", "\0")).replace("\0", "$")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict]:
    return compose()["services"]


def service_env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def compose_vars() -> list[tuple[str, str | None, str | None]]:
    """Every ${...} in compose.yaml (comments skipped): (name, operator, argument)."""
    text = "\n".join(line.split(" #")[0] for line in COMPOSE.read_text().splitlines()).replace("$$", "")
    return [(m.group(1), m.group(2), m.group(3)) for m in VAR.finditer(text)]


def dockerfiles() -> list[Path]:
    return sorted(p for p in DOCKER.rglob("Dockerfile*") if not p.name.endswith(".dockerignore"))


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out, buf = [], ""
    for line in dockerfile.read_text().splitlines():
        if line.strip().startswith("#"):  # Docker drops comment lines, inside continuations too
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def copy_sources(args: str) -> list[str] | None:
    """The sources of a COPY/ADD (None for a copy from another stage)."""
    words = json.loads(args) if args.startswith("[") else args.split()
    if any(w.startswith("--from=") for w in words):
        return None
    words = [w for w in words if not w.startswith("--")]
    return words[:-1]


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents wins."""
    def rx(p: str) -> re.Pattern:
        out = re.escape(p.strip("/")).replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        return re.compile(out.replace(".*/", "(.*/)?") + "$")

    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for p in patterns:
        negate = p.startswith("!")
        if any(rx(p.lstrip("!")).match(c) for c in candidates):
            excluded = not negate
    return excluded


def read_names(tree: ast.AST) -> tuple[set[str], list[int], list[int]]:
    """Environment names a module reads: os.environ[...], os.environ.get/setdefault, os.getenv,
    "X" in os.environ, settings.get("X") / settings.explicit("X"); the lines of reads whose name
    is not a literal; and the lines that read the environment other than through settings."""
    def is_environ(n: ast.AST) -> bool:
        return isinstance(n, ast.Attribute) and n.attr == "environ" and isinstance(n.value, ast.Name) \
            and n.value.id == "os"

    names, dynamic, direct = set(), [], []

    def take(arg: ast.AST, line: int, through_settings: bool = False) -> None:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            names.add(arg.value)
        else:
            dynamic.append(line)
        if not through_settings:
            direct.append(line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and is_environ(node.value) and isinstance(node.ctx, ast.Load):
            take(node.slice, node.lineno)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            f = node.func
            if (f.attr in ("get", "setdefault") and is_environ(f.value)
                    or f.attr == "getenv" and isinstance(f.value, ast.Name) and f.value.id == "os"):
                take(node.args[0], node.lineno)
            elif f.attr in ("get", "explicit") and isinstance(f.value, ast.Name) and f.value.id == "settings":
                take(node.args[0], node.lineno, through_settings=True)
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops) \
                and any(is_environ(c) for c in node.comparators):
            take(node.left, node.lineno)
    return names, dynamic, direct


def code_reads() -> dict[str, list[str]]:
    reads: dict[str, list[str]] = {}
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            names, dynamic, direct = read_names(ast.parse(path.read_text(), rel))
            if rel != "lmpipe/settings.py":  # settings.get(name) is the one generic reader
                assert not dynamic, f"{rel}:{dynamic}: reads an environment variable by a computed name"
                assert not direct, f"{rel}:{direct}: reads the environment without lmpipe.settings"
            for n in names:
                reads.setdefault(n, []).append(rel)
    return reads


def deployment_names() -> set[str]:
    """Environment names the deployment sets: compose services, .env.example, the pod template."""
    names = set(env_example())
    for svc in services().values():
        names |= set(service_env(svc))
    pod = yaml.safe_load(POD_TEMPLATE.read_text())
    for c in pod["spec"]["containers"]:
        names |= {e["name"] for e in c.get("env", [])}
    return names


# ---------------------------------------------------------------- compose file


def test_compose_has_known_keys_only():
    doc = compose()
    assert set(doc) - {"name", "services", "volumes", "networks"} <= {k for k in doc if k.startswith("x-")}
    for name, svc in doc["services"].items():
        assert set(svc) <= SERVICE_KEYS, f"service {name}: unknown keys {set(svc) - SERVICE_KEYS}"
        assert "image" in svc, f"service {name} names no image"


def test_compose_converges_without_manual_steps():
    """Long-running services have healthchecks; depends_on waits on health or on one-shots
    finishing; the dependency graph has no cycle; named volumes are declared, bind mounts exist."""
    doc = compose()
    svcs = doc["services"]
    for name, svc in svcs.items():
        one_shot = svc.get("restart") == "no"
        assert one_shot or "healthcheck" in svc, f"service {name} runs on but has no healthcheck"
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"service {name}: depends_on needs conditions"
        for dep, cond in deps.items():
            assert dep in svcs, f"service {name} depends on unknown service {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in svcs[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
            else:
                assert cond["condition"] == "service_completed_successfully", f"{name} -> {dep}: {cond}"
                assert svcs[dep].get("restart") == "no", f"{name} waits for {dep} to finish; it restarts"
            if "profiles" in svcs[dep] and "profiles" not in svc:
                assert cond.get("required") is False, f"{name} needs {dep}, which only runs in a profile"
    done: set[str] = set()
    while len(done) < len(svcs):
        ready = {n for n, s in svcs.items() if n not in done and set(s.get("depends_on", {})) <= done}
        assert ready, f"depends_on cycle among {sorted(set(svcs) - done)}"
        done |= ready
    declared = set(doc.get("volumes", {}))
    for name, svc in svcs.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith((".", "/")):
                assert (DOCKER / source).exists(), f"service {name}: bind mount {source} does not exist"
            else:
                assert source in declared, f"service {name}: volume {source} is not declared"


def test_build_contexts_dockerfiles_and_copy_sources_exist():
    built = 0
    for name, svc in services().items():
        if "build" not in svc:
            continue
        built += 1
        context = (DOCKER / svc["build"]["context"]).resolve()
        dockerfile = context / svc["build"].get("dockerfile", "Dockerfile")
        assert context.is_dir(), f"service {name}: build context {context} does not exist"
        assert dockerfile.is_file(), f"service {name}: {dockerfile} does not exist"
        ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
        assert ignore.is_file(), f"{ignore.name} missing: the whole repository (.venv...) would be sent"
        patterns = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        for word, args in instructions(dockerfile):
            if word in ("COPY", "ADD") and (sources := copy_sources(args)) is not None:
                for src in sources:
                    assert (context / src).exists(), f"{dockerfile.relative_to(ROOT)}: COPY source {src} is missing"
                    assert not dockerignore_excludes(patterns, src), \
                        f"{dockerfile.relative_to(ROOT)}: COPY source {src} is excluded by {ignore.name}"
    assert built >= 5


def test_every_dockerfile_is_built_by_compose():
    used = {(DOCKER / s["build"]["context"] / s["build"]["dockerfile"]).resolve()
            for s in services().values() if "build" in s}
    assert set(dockerfiles()) == used


def test_images_are_pinned():
    def pinned(ref: str) -> bool:
        if "@sha256:" in ref:
            return True
        name, _, tag = ref.rpartition(":")
        return bool(name) and "/" not in tag and tag not in ("", "latest")

    for df in dockerfiles():
        stages: set[str] = set()
        for word, args in instructions(df):
            if word == "FROM":
                parts = [w for w in args.split() if not w.startswith("--")]
                ref = parts[0]
                assert "$" not in ref, f"{df.relative_to(ROOT)}: FROM {ref} is not a literal, pinned image"
                assert ref in stages or pinned(ref), f"{df.relative_to(ROOT)}: FROM {ref} is not pinned"
                if len(parts) == 3 and parts[1].upper() == "AS":
                    stages.add(parts[2])
    env = env_example()
    for name, svc in services().items():
        ref = interpolate(svc["image"], env)
        assert pinned(ref), f"service {name}: image {ref} is not pinned"
    for c in yaml.safe_load(POD_TEMPLATE.read_text())["spec"]["containers"]:
        assert pinned(c["image"]), f"pod template: image {c['image']} is not pinned"


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r'^\s*"?([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s",;#]+)', line)
        if m:
            out[norm(m.group(1))] = m.group(2)
    return out


def test_python_packages_in_images_are_pinned_like_ci():
    """Every package a Dockerfile names is pinned, at the version CI tests (constraints.txt, or
    pyproject.toml for torch); the slim serving image's list is pinned there too."""
    ci = {**_pins(ROOT / "constraints.txt"), **_pins(ROOT / "pyproject.toml")}
    extra_pins = {"psycopg2-binary"}  # not in CI's environment (Postgres drivers for Airflow and MLflow)
    for df in dockerfiles():
        for word, args in instructions(df):
            if word != "RUN":
                continue
            for cmd in re.split(r"&&|;", args):
                words = cmd.split()
                if "install" not in words or not any(w.endswith("pip") for w in words):
                    continue
                rest = iter(words[words.index("install") + 1:])
                for w in rest:
                    if w in ("-c", "-r", "-i", "--index-url", "--extra-index-url"):
                        next(rest, None)  # the option's value
                        continue
                    if w.startswith("-"):
                        continue
                    if w == ".":
                        continue
                    name, sep, version = w.partition("==")
                    assert sep, f"{df.relative_to(ROOT)}: pip installs {w} without a version"
                    if norm(name) in extra_pins:
                        continue
                    assert ci.get(norm(name)) == version, \
                        f"{df.relative_to(ROOT)}: {w}, but CI tests {name}=={ci.get(norm(name))}"
    for line in (DOCKER / "serving" / "requirements.txt").read_text().splitlines():
        name = line.split("#")[0].strip()
        if name:
            assert "==" not in name and norm(name) in ci, f"serving requirement {name} is not pinned in constraints.txt"


def test_dockerfiles_pass_hadolint():
    exe = Path(sys.executable).with_name("hadolint")
    exe = str(exe) if exe.exists() else shutil.which("hadolint")
    assert exe, "hadolint is missing: it is a dev dependency (pip install -e '.[dev]')"
    cfg = DOCKER / ".hadolint.yaml"
    r = subprocess.run([exe, "--no-color", "-c", str(cfg), *map(str, dockerfiles())], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    text = cfg.read_text().splitlines()
    for i, line in enumerate(text):
        if re.match(r"\s*-\s*(DL|SC)\d+", line):
            assert i and text[i - 1].strip().startswith("#"), f".hadolint.yaml: {line.strip()} is ignored without a reason"


def test_images_run_as_one_non_root_user():
    users = set()
    for df in dockerfiles():
        final = instructions(df)
        start = max(i for i, (w, _) in enumerate(final) if w == "FROM")
        stage_users = [a for w, a in final[start:] if w == "USER"]
        assert stage_users, f"{df.relative_to(ROOT)}: the image runs as root"
        uid = stage_users[-1].split(":")[0]
        assert uid.isdigit() and uid != "0", f"{df.relative_to(ROOT)}: USER {stage_users[-1]} (numeric, non-root)"
        users.add(stage_users[-1])
    assert len(users) == 1, f"images run as different users {users}: the shared /data volume needs one"
    pod = yaml.safe_load(POD_TEMPLATE.read_text())["spec"]["securityContext"]
    assert pod["runAsNonRoot"] and f"{pod['runAsUser']}:{pod['runAsGroup']}" in users


def test_shell_scripts_parse():
    scripts = sorted(DOCKER.rglob("*.sh"))
    assert scripts
    for s in scripts:
        r = subprocess.run(["bash", "-n", str(s)], capture_output=True, text=True, check=False)
        assert r.returncode == 0, f"{s.relative_to(ROOT)}: {r.stderr}"


# ---------------------------------------------------------------- one source of truth for names


def test_code_reads_the_environment_only_through_settings():
    unknown = {n: files for n, files in code_reads().items() if n not in settings.SETTINGS}
    assert not unknown, f"environment variables lmpipe/settings.py does not declare: {unknown}"


def test_every_setting_is_set_by_the_deployment():
    deployment = {n for n, s in settings.SETTINGS.items() if s.kind == "deployment"}
    missing = deployment - deployment_names()
    assert not missing, f"settings neither set in docker/compose.yaml nor listed in docker/.env.example: {missing}"


def test_lmpipe_names_in_deployment_files_are_settings():
    names = deployment_names() | {name for name, _, _ in compose_vars()}
    typos = {n for n in names if n.startswith("LMPIPE_") and n not in settings.SETTINGS}
    assert not typos, f"LMPIPE_* names lmpipe does not read (lmpipe/settings.py): {typos}"


def test_env_example_lists_every_compose_variable_and_no_other():
    listed, used = set(env_example()), {name for name, _, _ in compose_vars()}
    assert used <= listed, f"compose.yaml reads variables .env.example does not list: {used - listed}"
    unused = {n for n in listed - used if not n.startswith("COMPOSE_")}
    assert not unused, f".env.example lists variables compose.yaml never reads: {unused}"


def test_compose_defaults_equal_env_example():
    env = env_example()
    for name, op, arg in compose_vars():
        if op in (":-", "-"):
            assert env[name] == arg, f"${{{name}{op}{arg}}} in compose.yaml, but {name}={env[name]} in .env.example"


def test_secrets_have_no_default():
    """A secret comes from .env or compose refuses to start (${VAR:?...})."""
    env = env_example()
    for name, op, _ in compose_vars():
        if env.get(name) == "change-me":
            assert op in (":?", None), f"secret {name} has a default in compose.yaml"
            assert any(n == name and o == ":?" for n, o, _ in compose_vars()), f"secret {name} is never required"


def test_airflow_settings_are_airflow_config_options():
    import importlib

    from airflow.configuration import conf

    known = conf.configuration_description
    for name, svc in services().items():
        for var, value in service_env(svc).items():
            if not var.startswith("AIRFLOW__"):
                continue
            section, _, key = var[len("AIRFLOW__"):].lower().partition("__")
            assert key in known.get(section, {}).get("options", {}) or conf.has_option(section, key), \
                f"service {name}: {var} is no Airflow option [{section}] {key}"
            if var == "AIRFLOW__CORE__AUTH_MANAGER":
                module, _, cls = value.rpartition(".")
                getattr(importlib.import_module(module), cls)


def test_compose_commands_take_the_flags_compose_gives():
    """Airflow's CLI, MLflow's server and lmpipe's server parse the arguments compose passes them."""
    import argparse

    from airflow.cli import cli_parser
    from mlflow.cli import cli as mlflow_cli

    from serving import serve

    env, airflow, checked = env_example(), cli_parser.get_parser(), set()
    for name, svc in services().items():
        cmds = [[interpolate(str(c), env) for c in svc["command"]]] if isinstance(svc.get("command"), list) else []
        test = (svc.get("healthcheck") or {}).get("test", [])
        cmds += [shlex.split(test[1])] if test[:1] == ["CMD-SHELL"] else []
        for cmd in cmds:
            if cmd[0] == "airflow":
                airflow.parse_args(cmd[1:])
                checked.add(name)
            elif cmd[:2] == ["mlflow", "server"]:
                mlflow_cli.commands["server"].make_context("mlflow server", cmd[2:])
                checked.add(name)
        if svc["image"].startswith("lmpipe/serving:"):
            p = argparse.ArgumentParser()
            serve.add_arguments(p)
            cfg = serve.config_from_args(p.parse_args(cmds[0]))
            assert cfg.host == "0.0.0.0" and str(cfg.port) in svc["expose"]
            assert cfg.watch_interval_s == 0, f"{name} moves on its own; lm_serving_rollout should move it"
            checked.add(name)
    assert {"airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
            "mlflow", "serving-1", "serving-2"} <= checked


def test_the_load_balancer_config_is_the_one_lmpipe_writes_and_haproxy_accepts_it():
    """docker/haproxy/haproxy.cfg is lmpipe.balancer's compose config (regenerate it with
    `python -m lmpipe.balancer > docker/haproxy/haproxy.cfg`); Debian's haproxy checks it; its
    servers are compose's replicas, and lm_serving_rollout reaches its runtime API."""
    from lmpipe import balancer

    path = DOCKER / "haproxy" / "haproxy.cfg"
    assert path.read_text() == balancer.compose_config(), "regenerate: python -m lmpipe.balancer > " + str(path)
    r = subprocess.run([shutil.which("haproxy") or "/usr/sbin/haproxy", "-c", "-f", str(path)], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    svcs = services()
    replicas = {n for n, s in svcs.items() if s["image"].startswith("lmpipe/serving:")}
    servers = dict(re.findall(r"^\s+server (\S+) (\S+)$", path.read_text(), re.M))
    assert {n: f"{n}:8000" for n in replicas} == servers
    lb = svcs["serving"]
    assert any("haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg" in v for v in lb["volumes"])
    env = service_env(svcs["airflow-worker"])
    assert env["LMPIPE_SERVE_URL"] == "http://serving:8000"
    assert f"stats socket ipv4@0.0.0.0:{env['LMPIPE_LB_ADMIN'].split(':')[1]} level admin" in path.read_text()


def test_airflow_connections_match_the_conn_ids_lmpipe_uses(monkeypatch):
    """AIRFLOW_CONN_<ID> exists for the ids of LMPIPE_SPARK_CONN_ID / LMPIPE_AWS_CONN_ID (and any
    literal conn id in the DAGs), and resolves to the compose Spark master and an aws connection."""
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
    from airflow.providers.apache.spark.hooks.spark_submit import SparkSubmitHook

    dag_ids = set()
    for path in (ROOT / "dags").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg and node.arg.endswith("conn_id") \
                    and isinstance(node.value, ast.Constant):
                dag_ids.add(node.value.value)
    env = env_example()
    svcs = services()
    airflow = {n: s for n, s in svcs.items() if s["image"].startswith("lmpipe/airflow") and "airflow" in n}
    assert airflow
    for name, svc in airflow.items():
        senv = {k: interpolate(v, env) for k, v in service_env(svc).items()}
        spark_id = senv.get("LMPIPE_SPARK_CONN_ID") or settings.SETTINGS["LMPIPE_SPARK_CONN_ID"].default
        aws_id = senv.get("LMPIPE_AWS_CONN_ID") or settings.SETTINGS["LMPIPE_AWS_CONN_ID"].default
        for conn_id in {spark_id, aws_id} | dag_ids:
            assert f"AIRFLOW_CONN_{conn_id.upper()}" in senv, f"service {name}: no connection {conn_id}"
        for var, value in senv.items():
            if var.startswith("AIRFLOW_CONN_"):
                monkeypatch.setenv(var, value)
        master = SparkSubmitHook(conn_id=spark_id)._resolve_connection()["master"]
        host, port = re.fullmatch(r"spark://([^:]+):(\d+)", master).groups()
        assert host in svcs and f"--port {port}" in " ".join(svcs[host]["command"]), master
        conf = AwsBaseHook(aws_conn_id=aws_id).conn_config
        assert conf.aws_access_key_id == env["AWS_ACCESS_KEY_ID"] and conf.region_name == env["AWS_DEFAULT_REGION"]


def test_published_ports_do_not_collide():
    env = env_example()
    seen: dict[tuple[str, str], str] = {}
    for name, svc in services().items():
        for spec in svc.get("ports", []):
            parts = interpolate(str(spec), env).split(":")
            assert len(parts) == 3, f"service {name}: publish {spec} as ADDRESS:HOST:CONTAINER"
            key = (parts[0], parts[1])
            assert key not in seen, f"{name} and {seen[key]} both publish {key[0]}:{key[1]}"
            seen[key] = name
            probe = " ".join(map(str, (svc.get("healthcheck") or {}).get("test", [])))
            if "http://" in probe:  # the port published is the one the service answers on
                assert f":{parts[2]}/" in probe, f"service {name} publishes {parts[2]}, its healthcheck probes {probe}"
    assert len(seen) >= 6


def test_env_file_is_git_ignored_and_example_is_not():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(rel: str) -> bool:
        return subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", rel], check=False).returncode == 0

    assert ignored("docker/.env")
    assert not ignored("docker/.env.example")


def test_init_env_fills_every_secret(tmp_path):
    from cryptography.fernet import Fernet

    target = tmp_path / ".env"
    subprocess.run(["sh", str(DOCKER / "init-env.sh"), str(target)], check=True, capture_output=True)
    written = dict(line.split("=", 1) for line in target.read_text().splitlines() if line and not line.startswith("#"))
    assert set(written) == set(env_example())
    assert "change-me" not in written.values()
    Fernet(written["AIRFLOW_FERNET_KEY"].encode())
    assert re.fullmatch(r"[0-9a-f]{48}", written["POSTGRES_PASSWORD"])
    again = subprocess.run(["sh", str(DOCKER / "init-env.sh"), str(target)], capture_output=True, check=False)
    assert again.returncode != 0  # never overwrites secrets in place


# ---------------------------------------------------------------- runbook and Kubernetes


def test_runbook_zero_table_is_the_trainer_formula():
    from training import ds_config

    text = RUNBOOK.read_text()
    m = re.search(r"<!-- zero-sizing:start -->\n(.*?)\n<!-- zero-sizing:end -->", text, re.DOTALL)
    assert m, "README.md lost its zero-sizing markers"
    assert m.group(1).strip() == ds_config.runbook_sizing().strip(), \
        "the ZeRO tables drifted: regenerate them with `python -m training.ds_config`"


def test_pod_template_is_a_kubernetes_pod_operator_template():
    pod = yaml.safe_load(POD_TEMPLATE.read_text())
    assert pod["apiVersion"] == "v1" and pod["kind"] == "Pod"
    (base,) = [c for c in pod["spec"]["containers"] if c["name"] == "base"]
    trainer_image = interpolate(services()["trainer"]["image"], env_example())
    assert base["image"] == trainer_image
    assert base["resources"]["limits"]["nvidia.com/gpu"] >= 1
    assert any(v["mountPath"] == "/dev/shm" for v in base["volumeMounts"])


def test_the_vllm_entrypoint_passes_the_api_key_in_its_environment_not_its_command_line(monkeypatch):
    import importlib.util

    from lmpipe.errors import LmpipeError

    spec = importlib.util.spec_from_file_location("vllm_entrypoint", DOCKER / "serving" / "vllm_entrypoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setenv("LMPIPE_API_KEY", "sk-serving-key-0001")
    cmd, env = mod.vllm_command("/models/lmpipe/3", "lmpipe", ["--max-model-len", "2048"])
    assert cmd[:3] == ["vllm", "serve", "/models/lmpipe/3"] and "--max-model-len" in cmd
    assert not any("sk-serving-key-0001" in a for a in cmd) and "--api-key" not in cmd
    assert env["VLLM_API_KEY"] == "sk-serving-key-0001"  # vLLM's server reads it when --api-key is absent
    with pytest.raises(LmpipeError, match="not --api-key"):
        mod.vllm_command("/m", "lmpipe", ["--api-key=sk-serving-key-0001"])
