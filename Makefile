# The two commands of the README: `make demo` and `make test`. Both set up what is missing first.
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PYTEST_ARGS ?=

.PHONY: setup demo test lint

setup:
	@scripts/bootstrap.sh

demo: setup
	$(VENV)/bin/safetypatch demo

test: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/python -m pytest -m "not gpu" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests bench
