# The two commands of the README: `make demo` (the main job) and `make test` (the whole suite).
# Both create the local virtual environment on first use; later runs reuse it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_NAME ?= demo

.PHONY: install demo test test-fast lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[vision,dev]"
	@touch $(STAMP)

demo: install
	$(BIN)/prunetune search --model small_cnn --dataset digits --flops 50% --trials 12 --name $(RUN_NAME) --overwrite

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check src backend estimators spaces search
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not ray"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
