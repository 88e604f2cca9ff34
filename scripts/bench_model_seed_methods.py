"""Model level (issue 7) for the seed methods kmv (seed 003), poly (seed 004) and feature_sketch (seed 000): real
SmolLM2-135M-Instruct on the first 20 real Wikipedia articles with at least 4096 tokens, cut to 4096 tokens, layers
chosen by weight norm; perplexity and prefill time against the exact model measured in the same run.

What each cell asks:
- kmv with its defaults (min_seq_len 4096, so it serves every prefill at 4k) on 8 and 15 layers: what the kernel
  matrix-vector algorithm costs and keeps on a real model;
- poly forced on (allow_out_of_regime=True) on 8 layers: SmolLM2's scores are far outside Theorem 3.7's bounded
  regime (poly's check refuses them with its defaults, so a default-patched model is the exact model); this shows
  what running it anyway does;
- feature_sketch with its defaults on 15 layers: its regime is d >> n (head dim 64 against 4096 tokens), so every
  call falls back to exact attention and the plan records why; the cell shows that the check costs nothing.
At 8k a kmv cell would take hours of one core per 20 articles; at 2k kmv's default min_seq_len runs it exact.

One torch thread pinned to one core (taskset), resumable (finished articles are kept in results.jsonl).
Machine: 2-core CPU VM (AMD EPYC, AVX2), no GPU. Date: 2026-11-30.

    taskset -c 1 .venv/bin/python scripts/bench_model_seed_methods.py     # about 2.5 hours at 1 thread
    .venv/bin/python scripts/bench_model_seed_methods.py --report-only    # rebuild results.md / json / plots
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hf_sparse_attn.cli import main  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "eval", "results", "model_bench_seed_methods")
ARGV = [
    "bench", "model", "--tokens", "4096", "--articles", "20", "--threads", "1",
    "--methods", "kmv", "poly", "feature_sketch", "--layers", "0", "8", "15",
    "--method-layers", "kmv=8,15", "--method-layers", "poly=8", "--method-layers", "feature_sketch=15",
    "--selections", "weight_norm", "--method-param", "poly.allow_out_of_regime=True",
    "--machine-note", "1 torch thread pinned to one core; the other core ran scripts/bench_model_4k.py --stage 3 (1 thread)",
    "--out", OUT,
]

if __name__ == "__main__":
    sys.exit(main(ARGV + sys.argv[1:]))
