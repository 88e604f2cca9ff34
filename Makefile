# The two commands for a fresh machine (each creates .venv itself):
#   make demo   the main job: real SmolLM2-135M ranked, patched and measured on real Wikipedia text
#   make test   the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test env

env:
	bash scripts/setup_env.sh $(VENV)

demo: env
	$(PY) -m hf_sparse_attn.cli demo

test: env
	$(PY) -m pytest -q -p no:cacheprovider
