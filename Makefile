# make demo: the main job on the bundled demo data.  make test: the test suite.
# Both create or refresh .venv themselves; a second call does not reinstall
# (the stamp file is newer than pyproject.toml and constraints.txt).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lmpipe-installed
LMPIPE_HOME ?= $(CURDIR)/.lmpipe
DEMO   := $(LMPIPE_HOME)/demo
DEMO_MB ?= 8
PYTEST_ARGS ?=

.PHONY: venv demo test bench clean

venv: $(STAMP)

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
	$(VENV)/bin/lmpipe demo-corpus --out $(DEMO)/corpus --max-mb $(DEMO_MB)
	$(VENV)/bin/lmpipe tokenize --corpus $(DEMO)/corpus --out $(DEMO)/shards \
		--vocab-size 4096 --seq-len 256 validation_fraction=0.05 overwrite=true
	@echo
	@echo "demo corpus:  $(DEMO)/corpus"
	@echo "shards:       $(DEMO)/shards   (manifest: $(DEMO)/shards/manifest.json)"

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

bench: venv
	$(PY) bench/tokenize.py

clean:
	rm -rf $(VENV) $(LMPIPE_HOME)
