# distillery: `make demo` runs the main pipeline on built-in data, `make test` the fast tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR ?= outputs/demo

.PHONY: install demo test test-full lint bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/distillery experiment=supervised run_dir=$(RUN_DIR)

test: install
	$(BIN)/pytest -m "not slow" -q

test-full: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) outputs multirun .cache .pytest_cache
