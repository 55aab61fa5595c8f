# The two commands of the README: `make reproduce` (the main job) and `make test`.
# Each creates the local virtual environment .venv on first use.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# Data: $HETEROFL_DATA when set, else the offline copy beside the checkout, else ./data.
HETEROFL_DATA ?= $(if $(wildcard ../shared/data),../shared/data,data)
export HETEROFL_DATA
PROFILE ?= quick

.PHONY: install test reproduce clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

test: install
	$(BIN)/python -m pytest -q

reproduce: install
	$(BIN)/heterofl reproduce --profile $(PROFILE)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
