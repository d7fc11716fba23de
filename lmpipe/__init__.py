"""lmpipe: raw text to a served language model, orchestrated by Apache Airflow.

This package is the shared core: config, object storage, the shard-set manifest, settings,
errors and exit codes, logging, and the ``lmpipe`` CLI. Stage code lives in the stage
packages: ``spark_jobs`` (data prep), ``data_checks``, ``training``, ``registry`` and
``serving``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lmpipe")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
