# make demo: the main job on the bundled demo data.  make test: the test suite.
# Both create or refresh .venv themselves; a second call does not reinstall
# (the stamp file is newer than pyproject.toml and constraints.txt).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lmpipe-installed
LMPIPE_HOME ?= $(CURDIR)/.lmpipe
export LMPIPE_HOME
DEMO_MB ?= 8
PYTEST_ARGS ?=

SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv system-deps demo airflow-ui stack stack-down stack-status test test-fast bench clean

venv: $(STAMP)

# Java runs Spark; Debian's chromium renders pages in the browser tests; postgresql and
# redis-server are the metadata DB and the Celery broker of `make stack`, haproxy its serving
# load balancer (docs/deploy/local-stack.md).
DEBIAN_PKGS := chromium postgresql redis-server haproxy
system-deps:
	@command -v java >/dev/null || { echo "error: Spark needs Java 17 on PATH (apt-get install openjdk-17-jre-headless)"; exit 1; }
	@missing="$$(for p in $(DEBIAN_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done)"; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing lmpipe and its pinned stack into $(VENV) (first time: a few minutes)"
	# torch first, alone: the CPU build; any other spec pulls GBs of CUDA wheels.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# The Airflow Spark provider declares pyspark-client, which overwrites classic pyspark's
	# files and breaks mapInArrow: install it without that dependency.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt \
		apache-airflow-providers-apache-spark grpcio-status
	# The Data Docs index's table scripts: from the npm registry, pinned and hash-checked.
	$(PY) -m data_checks.assets fetch
	# DeepSpeed's CPU ops, compiled now rather than inside the first training run.
	@echo "building DeepSpeed's CPU ops (first time: a minute or two)"
	$(PY) -m training.build_ops
	@touch $@

# The main job: demo corpus -> serving job -> lm_pipeline through Airflow -> rollout -> a completion.
demo: venv
	@command -v java >/dev/null || { echo "error: Spark needs Java 17 on PATH"; exit 1; }
	DEMO_MB=$(DEMO_MB) PYTHONPATH=dags $(PY) -m lmpipe_airflow.demo

# The Airflow UI on the demo's metadata DB (airflow standalone; the login is printed).
airflow-ui: venv
	PYTHONPATH=dags $(PY) -m lmpipe_airflow.demo ui

# The production topology as local processes: PostgreSQL, Redis, S3 (moto), Spark standalone,
# MLflow, Airflow with Celery workers and the serving job. A second `make stack` is a no-op;
# state and logs live under $(LMPIPE_HOME)/stack.
stack: venv system-deps
	$(PY) -m lmpipe.cli stack up

stack-down: venv
	$(PY) -m lmpipe.cli stack down

stack-status: venv
	$(PY) -m lmpipe.cli stack status

# The whole suite, what CI runs (docs/testing.md); test-fast leaves out the long end-to-end runs.
test: venv system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv system-deps
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

bench: venv
	$(PY) bench/bench_tokenize.py
	$(PY) bench/bench_curate.py
	$(PY) bench/bench_neardup.py
	$(PY) bench/bench_check_data.py
	$(PY) bench/bench_train.py
	$(PY) bench/bench_serve.py
	$(PY) bench/bench_stack.py

clean:
	rm -rf $(VENV) $(LMPIPE_HOME)
