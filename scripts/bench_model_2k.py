"""Model level (issue 7) at 2048 tokens: real SmolLM2-135M-Instruct on the first 20 real Wikipedia articles with at
least 2048 tokens, exact vs sparse_hyper on 15 layers (weight_norm and last) and on all 30 layers.

With its defaults sparse_hyper runs causal calls shorter than 8192 tokens exact (below that the causal recursion is
slower than SDPA on this CPU: eval/results/kernels_cpu), so a default-patched model at 2k *is* the exact model. This
run forces the method on: min_seq_len=512 (leaf size of the causal recursion) and causal_min_seq_len=1024, the
parameters of the offline suite (scripts/offline_suite.py), to show what it would cost and save at 2k.

One torch thread (run pinned to one core with taskset, as scripts/bench_model_grid.py); resumable.
Machine: 2-core CPU VM (AMD EPYC, AVX2), no GPU. Date: 2026-11-22.

    taskset -c 1 .venv/bin/python scripts/bench_model_2k.py    # writes eval/results/model_bench_2k/
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hf_sparse_attn.cli import main  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "eval", "results", "model_bench_2k")


def forced_on_argv(tokens: int, articles: int, threads: int, machine_note: str, out: str) -> list[str]:
    """`hf-sparse-attn bench model` arguments: exact vs sparse_hyper on 15 layers (weight_norm, last) and on all 30,
    the method forced on at short contexts (also used by scripts/bench_model_4k.py)."""
    return [
        "bench", "model", "--tokens", str(tokens), "--articles", str(articles), "--threads", str(threads),
        "--methods", "sparse_hyper", "--layers", "0", "15", "30", "--selections", "weight_norm", "last",
        "--compare-selections-at", "15",
        "--method-param", "sparse_hyper.min_seq_len=512", "--method-param", "sparse_hyper.causal_min_seq_len=1024",
        "--machine-note", machine_note, "--out", out,
    ]


ARGV = forced_on_argv(2048, 20, 1, "1 torch thread pinned to one core; the other core ran scripts/offline_suite.py", OUT)

if __name__ == "__main__":
    sys.exit(main(ARGV + sys.argv[1:]))
