"""vLLM variant of the serving job: fetch the model a registry reference points at, the way
`lmpipe serve` does (serving/models.py), then hand this process over to `vllm serve`.

    python vllm_entrypoint.py [models:/lmpipe@champion] [extra `vllm serve` flags...]

Waits while the alias has no version yet (a fresh stack has no champion). vLLM loads once, so a
new champion is served after a restart (lmpipe's own server swaps models live instead).
"""

import os
import sys
import time

from lmpipe.errors import LmpipeError
from serving.models import ModelManager
from serving.serve import ServeConfig


def main(argv: list[str]) -> int:
    ref = argv[0] if argv else "models:/lmpipe@champion"
    manager = ModelManager(ServeConfig(model=ref))
    while True:
        try:
            name, version, source = manager.target()
            break
        except LmpipeError as exc:
            print(f"waiting for {ref}: {exc}", file=sys.stderr, flush=True)
            time.sleep(30)
    path = manager._fetch(name, version, source)
    cmd = ["vllm", "serve", str(path), "--served-model-name", name, "--host", "0.0.0.0", "--port", "8000", *argv[1:]]
    if os.environ.get("LMPIPE_API_KEY"):
        cmd += ["--api-key", os.environ["LMPIPE_API_KEY"]]
    print(f"serving {name} v{version} from {path} with vLLM", flush=True)
    os.execvp(cmd[0], cmd)  # vLLM from the image's own Python, on PATH
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
