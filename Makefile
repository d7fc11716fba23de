# make demo: the main job on the bundled demo data.  make test: the test suite.
# Both create or refresh .venv themselves; a second call does not reinstall
# (the stamp file is newer than pyproject.toml and constraints.txt).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lmpipe-installed
LMPIPE_HOME ?= $(CURDIR)/.lmpipe
export LMPIPE_HOME
DEMO   := $(LMPIPE_HOME)/demo
DEMO_MB ?= 8
PYTEST_ARGS ?=

SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv system-deps demo test bench clean

venv: $(STAMP)

# Java runs Spark; Debian's chromium renders pages in the browser tests.
system-deps:
	@command -v java >/dev/null || { echo "error: Spark needs Java 17 on PATH (apt-get install openjdk-17-jre-headless)"; exit 1; }
	@command -v chromium >/dev/null || { echo "installing Debian's chromium for the browser tests"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing lmpipe and its pinned stack into $(VENV) (first time: a few minutes)"
	# torch first, alone: the CPU build (see shared/TRAPS.md); any other spec pulls GBs of CUDA wheels.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# The Airflow Spark provider declares pyspark-client, which overwrites classic pyspark's
	# files and breaks mapInArrow (shared/TRAPS.md): install it without that dependency.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -c constraints.txt \
		apache-airflow-providers-apache-spark grpcio-status
	@touch $@

demo: venv
	@command -v java >/dev/null || { echo "error: Spark needs Java 17 on PATH"; exit 1; }
	$(VENV)/bin/lmpipe demo-corpus --out $(DEMO)/corpus --max-mb $(DEMO_MB)
	$(VENV)/bin/lmpipe check-data --corpus $(DEMO)/corpus --run-id demo
	$(VENV)/bin/lmpipe tokenize --corpus $(DEMO)/corpus --out $(DEMO)/shards \
		--vocab-size 4096 --seq-len 256 validation_fraction=0.05 partition_mb=2 overwrite=true
	$(VENV)/bin/lmpipe check-data --shards $(DEMO)/shards --run-id demo
	$(VENV)/bin/lmpipe train --shards $(DEMO)/shards --out $(DEMO)/run --recipe tiny --nproc 2 --fresh \
		max_steps=150 save_every=50 log_every=10 micro_batch_size=8
	$(VENV)/bin/lmpipe evaluate --model $(DEMO)/run/export --shards $(DEMO)/shards max_sequences=256
	-$(VENV)/bin/lmpipe promote --candidate $$($(PY) -c "import json; print(json.load(open('$(DEMO)/run/model_version.json'))['version'])")
	$(VENV)/bin/lmpipe models
	$(VENV)/bin/lmpipe report $(DEMO)/run
	@echo
	@echo "demo corpus:         $(DEMO)/corpus"
	@echo "corpus checks:       $(DEMO)/corpus/_checks/demo/data_docs/index.html"
	@echo "shards and manifest: $(DEMO)/shards/manifest.json"
	@echo "shard checks:        $(DEMO)/shards/_checks/demo/data_docs/index.html"
	@echo "training run:        $(DEMO)/run   (metrics.jsonl, checkpoints/, export/ = the HF model)"
	@echo "run report:          $(DEMO)/run/report/index.html"
	@echo "MLflow UI:           $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(LMPIPE_HOME)/mlflow.db"
	@echo "(open the data_docs pages in a browser; result.json beside them holds the same results)"

test: venv system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

bench: venv
	$(PY) bench/tokenize.py
	$(PY) bench/check_data.py
	$(PY) bench/train.py
	$(PY) bench/serve.py

clean:
	rm -rf $(VENV) $(LMPIPE_HOME)
