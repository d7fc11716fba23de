"""What the DAGs' tasks do, one module per DAG, so the DAG files keep to params and wiring.

Airflow puts the DAG folder on ``sys.path``, so the DAG files import this package; the
``.airflowignore`` beside it keeps the DAG processor from parsing it as DAG files. Importing it
is cheap: no torch, pyspark or deepspeed, and no Airflow import until a task calls for one.
"""
