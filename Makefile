# The two commands of the README: `make reproduce` (the main job) and `make test`.
# Each creates the local virtual environment .venv on first use.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# The data root is not decided here: heterofl_core.data.resolve_data_root does it for every command.
PROFILE ?= quick

.PHONY: install test reproduce wheel clean

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

# A wheel of the project in dist/, for hosted notebooks: HETEROFL_SOURCE=dist/heterofl-<version>-py3-none-any.whl
wheel: install
	$(BIN)/python -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir dist .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis dist build
