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
    cmd = ["vllm", "serve", str(path), "--served-model-name", ref.name, "--host", "0.0.0.0", "--port", "8000",
           *argv[1:]]
    if settings.get("LMPIPE_API_KEY"):
        cmd += ["--api-key", settings.get("LMPIPE_API_KEY")]
    log(f"serving {ref.label} from {path} with vLLM")
    os.execvp(cmd[0], cmd)  # vLLM from the image's own Python, on PATH
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
