# Two commands: `make up` runs everything on this machine, `make test` runs every test.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: up test check fmt clean install

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/baton up $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

check: $(STAMP)
	$(BIN)/ruff format --check baton shared services tests
	$(BIN)/ruff check baton shared services tests
	$(BIN)/mypy shared services baton

fmt: $(STAMP)
	$(BIN)/ruff format baton shared services tests
	$(BIN)/ruff check --fix baton shared services tests

clean:
	rm -rf $(VENV) .baton .pytest_cache .mypy_cache .ruff_cache
