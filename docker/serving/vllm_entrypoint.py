"""vLLM variant of the serving job: fetch the model a registry reference points at, the way
`lmpipe serve` does (registry/resolve.py), then hand this process over to `vllm serve`.

    python vllm_entrypoint.py [models:/lmpipe@champion] [extra `vllm serve` flags...]

Waits while the alias has no version yet (a fresh stack has no champion). vLLM loads once, so a
new champion is served after a restart (lmpipe's own server swaps models live instead).
"""

import os
import sys
import time

from lmpipe import settings
from lmpipe.errors import LmpipeError
from lmpipe.log import log
from registry import resolve as resolver
from serving.serve import ServeConfig


def main(argv: list[str]) -> int:
    cfg = ServeConfig(model=argv[0] if argv else "models:/lmpipe@champion")
    while True:
        try:
            ref = resolver.lookup(cfg.model, cfg.tracking, cfg.storage)
            break
        except LmpipeError as exc:
            log(f"waiting for {cfg.model}: {exc}")
            time.sleep(30)
    path = resolver.fetch(ref, cfg.storage)
    cmd, env = vllm_command(str(path), ref.name, argv[1:])
    log(f"serving {ref.label} from {path} with vLLM")
    os.execvpe(cmd[0], cmd, env)  # vLLM from the image's own Python, on PATH
    return 0  # not reached


def vllm_command(path: str, name: str, extra: list[str]) -> tuple[list[str], dict[str, str]]:
    """``vllm serve`` and its environment. The API key goes in ``VLLM_API_KEY``, which vLLM reads
    when ``--api-key`` is absent: a command line is readable by every user of the machine."""
    if any(a == "--api-key" or a.startswith("--api-key=") for a in extra):
        raise LmpipeError("pass the API key as LMPIPE_API_KEY, not --api-key: a command line is visible to every user")
    cmd = ["vllm", "serve", path, "--served-model-name", name, "--host", "0.0.0.0", "--port", "8000", *extra]
    env = dict(os.environ)
    if key := settings.get("LMPIPE_API_KEY"):
        env["VLLM_API_KEY"] = key
    return cmd, env


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
