# Two entry points (see README): `make quickstart` runs the appliance on this CPU, `make test` runs the suite.
# Both build the pinned virtual environment in .venv first; it is rebuilt when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: quickstart test lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet -e '.[cpu,test]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(BIN)/appliance quickstart

lint: $(STAMP)
	$(BIN)/ruff check .

# The suite runs without a network (scripts/offline.sh: a namespace with loopback only, where the machine allows).
test: lint
	scripts/offline.sh $(BIN)/pytest

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
