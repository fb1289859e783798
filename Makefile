# Two commands do all the set-up on a fresh machine (Python >= 3.10 with venv):
#   make quickstart   creates .venv, installs the pinned set, runs the quickstart search
#   make test         creates .venv, installs the pinned set, runs ruff, mypy, lint-imports
#                     (the layers contract in pyproject.toml) and pytest
#   make gpu-check    on a CUDA machine: the tests marked cuda, a 2-worker search sharing the
#                     GPU, the speed benchmark on it and one trial in float32 and in bf16,
#                     in at most 8 minutes (benchmarks/gpu_check.py; without a GPU: one
#                     line, exit 0)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test gpu-check clean

$(STAMP): pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	@# The distribution used to be named "autometa" (on the package index, another project):
	@# drop an old install and its metadata, or every first-party entry point would be found
	@# twice and conflict with itself. -qq: silent when there is none.
	$(BIN)/python -m pip uninstall -qq --disable-pip-version-check --yes autometa
	rm -rf autometa.egg-info
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -e .
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/autometa run --config examples/quickstart.toml

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

gpu-check: $(STAMP)
	@$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) autometa.db autometa.db.autometa-lock autometa-artifacts autometa-reports \
		autometa_ml.egg-info .import_linter_cache
