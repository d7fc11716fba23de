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
