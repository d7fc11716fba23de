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


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with the cryptography library."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def make_champion(c, version: str) -> None:
    """What a promotion does to the registry (alias plus history), without the evaluation gate."""
    from registry import tracking

    c.set_registered_model_alias("lmpipe", tracking.CHAMPION, version)
    tracking.log_champion(c, "lmpipe", version, "promoted", "2026-01-01T00:00:00Z")
