"""``lmpipe``: one command per stage. Each subcommand parses its flags and calls the stage's ``run``."""

from __future__ import annotations

import argparse
import sys

from lmpipe.errors import LmpipeError


def _demo_corpus(args: argparse.Namespace) -> int:
    from lmpipe import demo_corpus

    sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    info = demo_corpus.write(args.out, args.max_mb, sources)
    print(info["uri"])
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from spark_jobs import tokenize_shard

    m = tokenize_shard.run(tokenize_shard.config_from_args(args))
    print(m["config"]["out"])
    return 0


def _check_data(args: argparse.Namespace) -> int:
    from lmpipe import check_data

    result = check_data.run(check_data.config_from_args(args))
    print(result["data_docs"])
    return 0 if result["success"] else check_data.EXIT_FAILED


def _train(args: argparse.Namespace) -> int:
    from training import train

    return train.run(train.config_from_args(args))


def _evaluate(args: argparse.Namespace) -> int:
    from training import evaluate

    result = evaluate.run(evaluate.config_from_args(args))
    print(result["metrics_path"])
    return 0


def _tracking_cfg(args: argparse.Namespace):
    from lmpipe import config, tracking

    return config.build(tracking.TrackingConfig, {}, args.overrides)


def _promote(args: argparse.Namespace) -> int:
    from lmpipe import promote

    cfg = _tracking_cfg(args)
    if args.rollback:
        promote.rollback(cfg)
        return 0
    if not args.candidate:
        raise LmpipeError("give --candidate VERSION or --rollback")
    d = promote.promote(cfg, args.candidate, args.margin)
    print(promote.describe(d))
    return 0 if d["decision"] == "promoted" else promote.EXIT_REFUSED


def _models(args: argparse.Namespace) -> int:
    from lmpipe import promote

    print(promote.models_table(_tracking_cfg(args)))
    return 0


def _report(args: argparse.Namespace) -> int:
    from lmpipe import report

    print(report.build(args.run))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from serving import serve

    return serve.run(serve.config_from_args(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmpipe", description="Raw text to a served language model.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-corpus", help="write a deterministic JSONL corpus from Python's own docs and sources")
    p.add_argument("--out", required=True, help="a .jsonl file or a folder/prefix for parts (local, file://, s3://)")
    p.add_argument("--max-mb", type=float, default=None, help="stop at this many MB (default: everything)")
    p.add_argument("--sources", default="docs,stdlib", help="comma list of docs, stdlib, site-packages")
    p.set_defaults(func=_demo_corpus)

    from spark_jobs import tokenize_shard

    p = sub.add_parser("tokenize", help="Spark job: tokenize a corpus and pack it into shards")
    tokenize_shard.add_arguments(p)
    p.set_defaults(func=_tokenize)

    from lmpipe import check_data

    p = sub.add_parser("check-data", help="Great Expectations gate on a corpus or a shard set")
    check_data.add_arguments(p)
    p.set_defaults(func=_check_data)

    from training import train

    p = sub.add_parser("train", help="DeepSpeed ZeRO training from shards (resumes an existing run)")
    train.add_arguments(p)
    p.set_defaults(func=_train)

    from training import evaluate

    p = sub.add_parser("evaluate", help="held-out perplexity of a model (and the champion) on validation shards")
    evaluate.add_arguments(p)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("promote", help="move the champion alias through the promotion gate, or roll it back")
    p.add_argument("--candidate", help="model version to promote")
    p.add_argument("--rollback", action="store_true", help="move champion back to the previous champion")
    p.add_argument("--margin", type=float, default=0.01, help="required relative perplexity improvement (0.01)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="tracking settings, e.g. model_name=lmpipe")
    p.set_defaults(func=_promote)

    p = sub.add_parser("models", help="the registered versions, aliases and champion history")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="tracking settings, e.g. uri=http://mlflow:5000")
    p.set_defaults(func=_models)

    p = sub.add_parser("report", help="write an HTML report into a training run folder")
    p.add_argument("run", help="the training run folder")
    p.set_defaults(func=_report)

    from serving import serve

    p = sub.add_parser("serve", help="the OpenAI-compatible inference server for the champion")
    serve.add_arguments(p)
    p.set_defaults(func=_serve)
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
        return args.func(args)
    except LmpipeError as exc:
        print(f"lmpipe {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"lmpipe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
