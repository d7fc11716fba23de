"""``lmpipe serve``: the OpenAI-compatible server under uvicorn.

    lmpipe serve --model models:/lmpipe@champion|PATH [--host 127.0.0.1] [--port 8000] [--api-key KEY]

The API key also comes from ``LMPIPE_API_KEY``. When the model is a registry alias the server
watches it and swaps in the new version without downtime; ``POST /admin/reload`` forces a check.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import field
from pathlib import Path
from typing import Literal

from lmpipe import config as cfglib
from lmpipe import settings
from lmpipe.config import stage_config
from lmpipe.errors import ConfigError, LmpipeError
from lmpipe.log import log
from lmpipe.storage import StorageConfig
from registry.tracking import TrackingConfig


@stage_config
class ServeConfig:
    model: str = "models:/lmpipe@champion"  # what to serve: a registry alias is watched and swapped without downtime
    host: str = "127.0.0.1"  # bind address; keep it on loopback without an API key
    port: int = 8000  # listen port
    api_key: str | None = None  # default: $LMPIPE_API_KEY; when set, every route but /healthz, /readyz and /metrics needs it
    tls_certfile: str | None = None  # PEM certificate (chain): serve HTTPS; needs tls_keyfile
    tls_keyfile: str | None = None  # PEM private key of tls_certfile
    shutdown_grace_s: float = 30.0  # on SIGTERM, how long open requests may finish before the server exits
    backend: Literal["transformers", "vllm"] = "transformers"  # the built-in server runs transformers; vllm prints how to serve the export with vLLM
    max_tokens_limit: int = 512  # largest max_tokens a request may ask for
    max_n: int = 4  # largest n (completions per prompt) a request may ask for
    max_prompts: int = 16  # prompts in one request
    max_prompt_tokens: int = 8192  # prompt tokens in one request, all prompts together
    max_stop_sequences: int = 4  # stop strings in one request
    max_stop_chars: int = 128  # characters in one stop string
    max_body_bytes: int = 1_048_576  # request body size; past it, 413 before the body is read
    max_batch: int = 8  # requests decoded together
    batch_wait_ms: float = 0.0  # how long an idle decoder waits for company (0: start at once; later arrivals join at the next step)
    max_queue: int = 64  # requests queued or decoding; past it, 429
    cache_entries: int = 1024  # responses of deterministic requests kept in-process (0 and no Redis: no cache)
    cache_ttl_s: int = 3600  # how long Redis keeps a cached response
    redis_url: str | None = None  # default: $LMPIPE_REDIS_URL; Redis for the response cache, shared by replicas
    watch_interval_s: float = 10.0  # registry alias polling (0: only /admin/reload)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)


def resolve(cfg: ServeConfig) -> ServeConfig:
    if cfg.api_key is None and settings.get("LMPIPE_API_KEY"):
        cfg.api_key = settings.get("LMPIPE_API_KEY")
    if cfg.redis_url is None and settings.get("LMPIPE_REDIS_URL"):
        cfg.redis_url = settings.get("LMPIPE_REDIS_URL")
    if cfg.backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ConfigError("backend=vllm needs vLLM installed (GPU machines: pip install vllm)") from None
        raise ConfigError("backend=vllm: serve the export folder with `vllm serve PATH` (see README); "
                          "lmpipe's built-in server uses the transformers backend")
    if cfg.redis_url and not cfg.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("redis_url (or LMPIPE_REDIS_URL) must be a redis://, rediss:// or unix:// URL")
    if bool(cfg.tls_certfile) != bool(cfg.tls_keyfile):
        raise ConfigError("tls_certfile and tls_keyfile go together: set both to serve HTTPS, or neither")
    for key in ("tls_certfile", "tls_keyfile"):
        path = getattr(cfg, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"{key}: {path} is not a file")
    return cfg


def tls(cfg: ServeConfig) -> dict:
    """uvicorn's TLS settings for this config (none without a certificate)."""
    return {"ssl_certfile": cfg.tls_certfile, "ssl_keyfile": cfg.tls_keyfile} if cfg.tls_certfile else {}


def app_for(cfg: ServeConfig):
    from serving.app import create_app

    return create_app(resolve(cfg))


def run(cfg: ServeConfig) -> int:
    import uvicorn

    cfg = resolve(cfg)
    from serving.app import create_app

    scheme = "https" if cfg.tls_certfile else "http"
    log(f"serving {cfg.model} on {scheme}://{cfg.host}:{cfg.port} (OpenAI API at /v1; auth "
        f"{'on' if cfg.api_key else 'off'})")
    uvicorn.run(create_app(cfg), host=cfg.host, port=cfg.port, log_level="warning",
                timeout_graceful_shutdown=cfg.shutdown_grace_s, **tls(cfg))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, or an exported model folder (model)")
    p.add_argument("--host", help="address to bind; keep it on loopback without an API key (host)")
    p.add_argument("--port", type=int, help="port to listen on (port)")
    p.add_argument("--api-key", help="require this bearer key; default: $LMPIPE_API_KEY (api_key)")
    p.add_argument("--config", help="YAML or JSON config: serve keys, or a run config whose 'serve' section is used")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. max_batch=16 watch_interval_s=5")


def config_from_args(args) -> ServeConfig:
    flags = {"model": args.model, "host": args.host, "port": args.port, "api_key": args.api_key}
    return cfglib.from_cli(ServeConfig, args.config, args.overrides, flags, "serve")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lmpipe serve", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    try:
        return run(config_from_args(p.parse_args(argv)))
    except LmpipeError as exc:
        print(f"lmpipe serve: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":  # python -m serving.serve: the slim serving image has no other stages
    sys.exit(main())
