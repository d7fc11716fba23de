"""The pinned stack installs side by side without one package breaking another."""

from importlib import metadata

import pytest


def test_classic_pyspark_is_not_replaced_by_pyspark_client():
    import pyspark

    assert pyspark.__version__ == metadata.version("pyspark") == "4.3.0"
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("pyspark-client")


def test_the_stack_imports_together():
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator  # noqa: F401
    import deepspeed  # noqa: F401
    import great_expectations as gx
    import mlflow
    import torch
    import transformers

    assert gx.__version__.startswith("1.")
    assert mlflow.__version__.startswith("3.")
    assert torch.__version__.startswith("2.13.0")
    assert transformers.__version__.startswith("5.")
    assert metadata.version("apache-airflow").startswith("3.")


@pytest.mark.slow
def test_deepspeed_cpu_ops_are_built_by_the_install_not_by_the_first_run():
    """``make venv`` builds DeepSpeed's CPU ops; the ranks then load the built modules from
    torch's extension cache instead of compiling them inside the first training run."""
    import subprocess
    import sys
    from pathlib import Path

    from torch.utils.cpp_extension import get_default_build_root

    recipe = (Path(__file__).parents[1] / "Makefile").read_text().split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    assert "-m training.build_ops" in recipe
    r = subprocess.run([sys.executable, "-m", "training.build_ops"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    for op in ("deepspeed_shm_comm", "cpu_adam"):
        assert f"DeepSpeed op {op} ready" in r.stdout + r.stderr
        assert list(Path(get_default_build_root()).glob(f"*/{op}/{op}.so")), op  # <root>/py311_cpu/<op>/
