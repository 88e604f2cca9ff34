"""Model level (issue 7) re-run after `sparse_hyper` gained attention-sink keys (num_sink_tokens=64 by default):
real SmolLM2-135M-Instruct, 2 Wikipedia articles at 8192 tokens, exact vs sparse_hyper on 15 layers (weight_norm and
last) and on all 30 layers. Same harness as scripts/bench_model_smollm2.py (`hf-sparse-attn bench model`), own output.

Machine: 2-core CPU VM, no GPU; run when the other jobs had finished (see the load column). Date: 2026-11-22.

    .venv/bin/python scripts/bench_model_smollm2_sinks.py   # resumable; writes eval/results/model_bench_sinks/
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hf_sparse_attn.cli import main  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "eval", "results", "model_bench_sinks")

if __name__ == "__main__":
    sys.exit(main([
        "bench", "model", "--tokens", "8192", "--articles", "2", "--methods", "sparse_hyper",
        "--layers", "0", "15", "30", "--selections", "weight_norm", "last", "--compare-selections-at", "15",
        "--method-param", "sparse_hyper.num_sink_tokens=64",
        "--machine-note", "run after the other jobs had finished (see the load column)", "--out", OUT,
    ]))
