# The two commands for a fresh machine (each creates its environments itself):
#   make demo   the main job: real SmolLM2-135M ranked, patched and measured on real Wikipedia text
#   make test   ruff check (the lint rules in pyproject.toml), then the test suite (what CI runs), in two environments:
#               1. .venv: the newest transformers, the whole suite (real weights included);
#               2. .ci/.venv: the oldest releases the floors allow (.ci/constraints-oldest.txt: transformers 5.0.0,
#                  accelerate 1.2.0), the suite without the tests that load real weights (they run in 1.)
# Either half of the suite alone, in .venv (not part of `make test`):
#   make test-unit          the tests that need no real weights or text (`pytest -m "not integration"`)
#   make test-integration   the tests that load real offline weights or text: SmolLM2, MiniLM, Wikipedia (`-m integration`)
VENV ?= .venv
PY := $(VENV)/bin/python
OLDEST_VENV ?= .ci/.venv
OLDEST_PY := $(OLDEST_VENV)/bin/python

.PHONY: demo test lint test-newest test-oldest test-unit test-integration env env-oldest

env:
	bash scripts/setup_env.sh $(VENV)

env-oldest:
	bash .ci/setup_oldest.sh $(OLDEST_VENV)

demo: env
	$(PY) -m hf_sparse_attn.cli demo

test: lint test-newest test-oldest

lint: env
	$(PY) -m ruff check .

test-newest: env
	$(PY) -m pytest -q -p no:cacheprovider --durations=20

test-oldest: env-oldest
	HF_SPARSE_ATTN_SKIP_REAL_WEIGHTS=1 $(OLDEST_PY) -m pytest -q -p no:cacheprovider -m "not slow" --durations=20

test-unit: env
	$(PY) -m pytest -q -p no:cacheprovider -m "not integration"

test-integration: env
	$(PY) -m pytest -q -p no:cacheprovider -m integration
