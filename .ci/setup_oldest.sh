#!/usr/bin/env bash
# The second CI environment: the package installed with the oldest transformers (and accelerate) its floors allow,
# pinned in .ci/constraints-oldest.txt, beside torch 2.13.0. Idempotent like scripts/setup_env.sh.
set -euo pipefail
VENV="${1:-.ci/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.hf_sparse_attn_installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt .ci/constraints-oldest.txt ] && [ "$STAMP" -nt .ci/setup_oldest.sh ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" "torch==2.13.0"
fi
"${PIP[@]}" -c .ci/constraints-oldest.txt -e ".[test,triton]"
"$VENV/bin/python" - <<'PY'
import accelerate, torch, transformers
print(f"oldest environment ready: torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}")
PY
touch "$STAMP"
