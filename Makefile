# The two commands of the README. Both create ./.venv and install into it.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast test-lowest lint install-dev clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# install with the training extra, then: synthesise, train, export, load features, serve, rank
demo: $(BIN)/python
	$(BIN)/pip install --quiet '.[train,readout]'
	$(BIN)/mtrank demo $(DEMO_ARGS)

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[train,dev]'

# the whole test suite (needs redis-server on PATH; tests start their own on a free port)
test: install-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# the edit loop: everything but the slow, Docker and GPU tests, on every core (pytest-xdist)
test-fast: install-dev
	$(BIN)/python -m pytest -n auto -m "not slow and not docker and not gpu" $(PYTEST_ARGS)

# ruff (style, imports, bugbear, pyupgrade) on everything; mypy on the service and the contract
lint: install-dev
	$(BIN)/pip install --quiet -e '.[lint]'
	$(BIN)/ruff check .
	$(BIN)/mypy

# the lowest versions pyproject.toml admits: a separate .venv-lowest (uv, --resolution lowest-direct)
# and the service, HTTP, store and dataset tests against them
test-lowest:
	PY=$(PY) .ci/lowest-deps $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-lowest data build *.egg-info
