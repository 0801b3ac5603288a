# The two commands of the README:
#   make demo   set up .venv and run the algorithm on the shipped test case
#   make test   set up .venv and run every check: ruff, mypy, shellcheck, hadolint, the tests
# Other targets: make setup, make lint, make clean.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where the demo keeps random weights when the real model files are not in model/.
DEMO_MODEL := .cache/random-model

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else \
		"Python >= 3.11 is needed (lungmask 0.2.22 requires it); run: make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps balaitous==1.2
	touch $(STAMP)

demo: $(STAMP)
	./scripts/demo.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/shellcheck --external-sources build.sh test.sh export.sh scripts/*.sh .ci/run
	$(BIN)/hadolint Dockerfile

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .cache test/output .mypy_cache .ruff_cache .pytest_cache
