"""A real uvicorn server on 127.0.0.1 in a thread, and tiny exported models to serve."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(cfg, wait_ready: bool = True):
    """Start the app under uvicorn on loopback; yield the base URL; always stop it."""
    import httpx
    import uvicorn

    from serving.serve import app_for

    cfg.host, cfg.port = "127.0.0.1", free_port()
    server = uvicorn.Server(uvicorn.Config(app_for(cfg), host=cfg.host, port=cfg.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{cfg.port}"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            try:
                r = httpx.get(base + ("/readyz" if wait_ready else "/healthz"), timeout=2)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise TimeoutError("server did not become ready")
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def tiny_export(dest: Path, shards: Path, seed: int, positions: int = 128) -> Path:
    """A randomly initialised tiny model with the shards' tokenizer, exported like a training run."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from training import recipes

    man = json.loads((shards / "manifest.json").read_text())
    torch.manual_seed(seed)
    m = recipes.tiny().model
    m.max_position_embeddings = positions
    model = recipes.build_model(m, man["tokenizer"]["vocab_size"], man["tokenizer"]["eos_id"])
    model.config.use_cache = True
    model.save_pretrained(dest, safe_serialization=True)
    from lmpipe.chat_template import CHAT_TEMPLATE

    tok = PreTrainedTokenizerFast(tokenizer_file=str(shards / "tokenizer.json"), eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)
    tok.save_pretrained(dest)
    return dest


def register(export: Path, name: str, tracking_cfg) -> str:
    """Log an export as an MLflow run's model and register it; return the version."""
    from registry import tracking

    c = tracking.client(tracking_cfg)
    run = c.create_run(tracking.experiment_id(c, tracking_cfg))
    c.log_artifacts(run.info.run_id, str(export), "model")
    c.set_terminated(run.info.run_id)
    tracking.ensure_model(c, name)
    v = c.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return str(v.version)
