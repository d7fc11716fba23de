"""Build the DeepSpeed ops lmpipe's training loads on this machine, once, ahead of any run.

DeepSpeed compiles its CPU ops (the shared-memory allreduce of its CPU accelerator, and
``cpu_adam`` for optimizer offload) the first time a rank loads them: one to two minutes on a
small machine, inside the first training run. ``make venv`` runs this module instead, as
DeepSpeed's own ``DS_BUILD_OPS`` install does for a CUDA build, so the first ``lmpipe train``
(and ``make demo``) starts at once. The builds land in torch's extension cache
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), where the ranks find them.

    python -m training.build_ops
"""

from __future__ import annotations

import os
import time

from lmpipe.log import log

CPU_OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")  # the CPU accelerator's ops lmpipe's training loads


def build() -> list[str]:
    """Build (or find already built) the ops of this machine's accelerator; their names."""
    from deepspeed.accelerator import get_accelerator

    from training.launcher import build_path, clear_stale_build_locks

    os.environ["PATH"] = build_path()  # the ninja the ranks build with (see build_path)
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        log(f"accelerator {acc.device_name()}: its ops are built by DeepSpeed's own install (DS_BUILD_OPS), "
            "nothing to build here")
        return []
    clear_stale_build_locks()
    built = []
    for builder in CPU_OPS:
        op, t0 = acc.create_op_builder(builder), time.monotonic()
        op.load(verbose=False)
        built.append(op.name)
        log(f"DeepSpeed op {op.name} ready ({time.monotonic() - t0:.0f}s)")
    return built


if __name__ == "__main__":
    build()
