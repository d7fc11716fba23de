"""``lmpipe``: one command per stage. Each parses its flags into the stage's config and calls its ``run``.

This is the one place of the core package that knows the stage packages; the rest of the core
(config, storage, manifest, settings, errors, logging) knows none of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import sys
from dataclasses import dataclass

from lmpipe import __version__
from lmpipe.errors import EXIT_CODES, ExitCode, LmpipeError


@dataclass(frozen=True)
class Verb:
    name: str
    module: str  # provides add_arguments(p), and config_from_args(args) when it has a config
    help: str
    config: str | None = None  # "module:Class" of its config dataclass
    section: str | None = None  # its section of a run config


VERBS = [
    Verb("demo-corpus", "spark_jobs.demo_corpus", "write a deterministic JSONL corpus from Python's own docs and sources"),
    Verb("tokenize", "spark_jobs.tokenize_shard", "Spark job: tokenize a corpus and pack it into shards",
         "spark_jobs.config:TokenizeConfig", "tokenize"),
    Verb("compact", "spark_jobs.compact", "copy a shard set and every shard it references into one self-contained set",
         "spark_jobs.compact:CompactConfig"),
    Verb("check-data", "data_checks.check_data", "Great Expectations gate on a corpus or a shard set",
         "data_checks.check_data:CheckConfig", "check"),
    Verb("train", "training.launcher", "DeepSpeed ZeRO training from shards (resumes an existing run)",
         "training.config:TrainConfig", "train"),
    Verb("evaluate", "training.evaluate", "held-out perplexity of a model (and the champion) on validation shards",
         "training.evaluate:EvalConfig", "evaluate"),
    Verb("promote", "registry.promote", "move the champion alias through the promotion gate, or roll it back",
         "registry.promote:PromoteConfig", "promote"),
    Verb("models", "registry.promote", "the registered versions, aliases and champion history",
         "registry.tracking:TrackingConfig"),
    Verb("report", "registry.report", "write an HTML report into a training run folder"),
    Verb("serve", "serving.serve", "the OpenAI-compatible inference server for the champion",
         "serving.serve:ServeConfig", "serve"),
    Verb("stack", "lmpipe.stack", "start, list or stop the production topology as local processes (make stack)"),
    Verb("config", "lmpipe.cli.runconfig", "print a stage's resolved config with every default"),
]
SECTION_OF = {v.name: v.section for v in VERBS if v.section}


def config_class(verb: Verb) -> type | None:
    if not verb.config:
        return None
    module, _, name = verb.config.partition(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------- the commands


def _run(verb: str, args: argparse.Namespace) -> int:
    mod = importlib.import_module(next(v.module for v in VERBS if v.name == verb))
    if verb == "demo-corpus":
        sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
        print(mod.write(args.out, args.max_mb, sources)["uri"])
        return ExitCode.OK
    if verb == "models":
        from lmpipe import config
        from registry.tracking import TrackingConfig

        print(mod.models_table(config.build(TrackingConfig, {}, args.overrides)))
        return ExitCode.OK
    if verb == "report":
        print(mod.build_uri(args.run))
        return ExitCode.OK
    if verb == "stack":
        return mod.main(args.action)
    if verb == "config":
        print(mod.show(SECTION_OF.get(args.verb, args.verb), args.config, args.overrides), end="")
        return ExitCode.OK
    if getattr(args, "config", None):
        from lmpipe.cli import runconfig

        # A run config is checked as a whole before any work starts; the stage gets its section.
        section = runconfig.section_data(args.config, SECTION_OF[verb])
        if section is not None:
            args.config = section
    cfg = mod.config_from_args(args)
    if verb == "tokenize":
        print(mod.run(cfg)["config"]["out"])
        return ExitCode.OK
    if verb == "compact":
        print(mod.run(cfg)["out"])
        return ExitCode.OK
    if verb == "check-data":
        result = mod.run(cfg)
        print(result["data_docs"])
        return ExitCode.OK if result["success"] else ExitCode.CHECKS_FAILED
    if verb == "evaluate":
        print(mod.run(cfg)["metrics_path"])
        return ExitCode.OK
    return mod.run(cfg)  # train, promote, serve: their exit code


def _add_config_verb(p: argparse.ArgumentParser) -> None:
    choices = [v.name for v in VERBS if v.section] + ["check"]  # a verb, or its section's name
    p.add_argument("action", choices=["show"], help="show: print the resolved config as YAML")
    p.add_argument("verb", choices=choices, help="the stage whose config to show (check-data's section is check)")
    p.add_argument("--config", help="a config file (a stage's keys, or a run config) to resolve")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, as the stage takes them")


# ---------------------------------------------------------------- the parser

KEY = re.compile(r"\(([a-z_][a-z0-9_.]*)\)$")  # a flag's help ends with the config key it sets


def _describe_flags(p: argparse.ArgumentParser, cls: type | None) -> None:
    """Append each flag's config default to its help, from the config dataclass, and mark required ones."""
    if cls is None:
        return
    defaults = dataclasses.asdict(cls())
    for action in p._actions:
        m = KEY.search(action.help or "")
        if not m:
            continue
        value = defaults
        for part in m.group(1).split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value == "":
            note = "required: here or in --config"
        elif value is None or isinstance(value, bool):
            note = "default: " + {None: "unset", True: "true", False: "false"}[value]
        else:
            note = f"default: {value}"
        action.help = f"{action.help[: m.start()]}({m.group(1)}; {note})"


class _Help(argparse.HelpFormatter):
    """Shows a flag's argparse default unless its help already gives one (config keys do)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {int(code):>3}  {text}" for code, text in EXIT_CODES.items())
    parser = argparse.ArgumentParser(
        prog="lmpipe", description="Raw text to a served language model: one command per pipeline stage.",
        epilog=f"exit codes:\n{codes}\n\nEach stage also reads --config FILE (its keys, or a run config's section) "
               "and dotted key=value overrides.", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lmpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in VERBS:
        p = sub.add_parser(verb.name, help=verb.help, description=verb.help, formatter_class=_Help)
        if verb.name == "config":
            _add_config_verb(p)
        elif verb.name == "models":
            p.add_argument("overrides", nargs="*", metavar="key=value", help="tracking settings, e.g. uri=http://mlflow:5000")
        elif verb.name == "report":
            p.add_argument("run", help="the training run folder")
        else:
            importlib.import_module(verb.module).add_arguments(p)
        _describe_flags(p, config_class(verb) if verb.section else None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may sit between flags (argparse alone would stop at the first flag)
    args, rest = parser.parse_known_args(argv)
    if rest:
        if hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
            args.overrides = [*args.overrides, *rest]
        else:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(_run(args.command, args))
    except LmpipeError as exc:
        print(f"lmpipe {args.command}: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print(f"lmpipe {args.command}: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
