# The two commands of the README:
#   make demo   set up .venv and run the algorithm on the shipped test case
#   make test   set up .venv and run every check: ruff, mypy, the import layers, shellcheck,
#               hadolint, the tests, and the container test when docker or podman is
#               usable (in CI: always)
# Other targets: make setup, make lint, make container-test, make gpu-check (on a GPU
# machine: every GPU measurement in one call), make clean.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# podman settings for restricted machines (runc, explicit ulimits), for the container test only.
export CONTAINERS_CONF ?= $(CURDIR)/test/container/containers.conf

.PHONY: setup demo test lint container-test gpu-check clean

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

# On a machine with a GPU: every GPU measurement in one call (bench/gpu_check.py).
gpu-check: $(STAMP)
	$(BIN)/python -m bench.gpu_check

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/shellcheck --external-sources build.sh test.sh export.sh scripts/*.sh \
		scripts/cluster/*.sbatch \
		test/container/*.sh .ci/run
	$(BIN)/hadolint Dockerfile test/container/base.Containerfile

# The container test runs where an engine answers, and in CI always (CI=true): there a
# missing engine fails it. Elsewhere the last lines say plainly that it did not run.
test: lint
	$(BIN)/python -m pytest
	@if [ "$${CI:-}" = true ] || bash -c 'here=. && source scripts/engine.sh' >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory container-test; \
	else \
		echo; \
		echo "NOTE: the container was NOT built or tested: no usable docker or podman here"; \
		echo "      (see docs/how-to/submit-to-grand-challenge.md); everything else above passed."; \
	fi

# Build the real Dockerfile and run the image as grand-challenge does (test/container/).
container-test: $(STAMP)
	$(BIN)/python -m pytest -m container test/container

clean:
	rm -rf $(VENV) .cache wheelhouse test/output .mypy_cache .ruff_cache .pytest_cache
