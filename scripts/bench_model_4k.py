"""Model level (issue 7) at 4096 tokens: real SmolLM2-135M-Instruct on the first 20 real Wikipedia articles with at
least 4096 tokens, exact vs sparse_hyper.

With its defaults sparse_hyper runs causal calls shorter than 8192 tokens exact (below that the causal recursion is
slower than SDPA on this CPU: eval/results/kernels_cpu), so a default-patched model at 4k *is* the exact model. This
run forces the method on: min_seq_len=512 (leaf size of the causal recursion) and causal_min_seq_len=1024, the
parameters of the offline suite (scripts/offline_suite.py), to show what it would cost and save at 4k.

Five stages, the same results file (eval/results/model_bench_4k/results.jsonl), resumable:
1. (session 2) 10 articles, 2 torch threads, nothing else running: 15 layers by weight_norm and last, all 30 layers;
2. (session 3, same date) 20 articles, 1 torch thread pinned to one core (the other core ran the 8k grid): the
   cells of stage 1 extended to 20 articles (the 10 new ones computed and timed, the baseline timed on them in the
   same run), plus every selection at 15 layers (first, measured, random x 3 seeds) and 8 / 23 layers by weight_norm;
3. (session 5, 2026-11-30) every selection at 8 and 23 layers too (last, first, measured, random x 3 seeds), so that
   each selection has a curve of perplexity against speed-up at 4k as at 2k; the baseline re-timed in the same run.
   At 30 layers every selection replaces the same layers (only the random seeds change the hashing): not repeated;
4. (session 5) plain `hyper` forced on the same way, by weight_norm at 15 and 30 layers. The 15-layer cell finished;
   the 30-layer one was cut after 1 article when the machine restarted and resumed in session 7 (same date) from
   its article record, the baseline re-timed on the 19 articles left (the other core ran bench_model_2k.py stage 4a);
5. (session 8, same date) plain `hyper` by every other selection at 15 layers (last, first, measured, random x 3
   seeds), so that the selection test has a second method at 4k as at 2k; the baseline re-timed in the same run.
Machine: 2-core CPU VM (AMD EPYC, AVX2), no GPU. Date: 2026-11-22.

    .venv/bin/python scripts/bench_model_4k.py --stage 1              # writes eval/results/model_bench_4k/
    taskset -c 0 .venv/bin/python scripts/bench_model_4k.py --stage 2
    taskset -c 0 .venv/bin/python scripts/bench_model_4k.py --stage 3   # about 2.5 hours at 1 thread
    taskset -c 0 .venv/bin/python scripts/bench_model_4k.py --stage 4   # about 40 min
    taskset -c 1 .venv/bin/python scripts/bench_model_4k.py --stage 5   # about 90 min
    .venv/bin/python scripts/bench_model_4k.py --report-only            # rebuild results.md / json / plots
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_model_2k import FULL_GRID, SELECTION_GRID, forced_on_argv, stage_argv  # noqa: E402

from hf_sparse_attn.cli import main  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "eval", "results", "model_bench_4k")
SELECTIONS_AT_8_15_23 = {**SELECTION_GRID, "compare_at": ["8", "15", "23"]}
STAGES = {
    "1": forced_on_argv(4096, 10, 2, "2 torch threads, no other job", OUT),
    "2": forced_on_argv(4096, 20, 1, "1 torch thread pinned to one core; the other core ran scripts/bench_model_grid.py "
                        "(1 thread)", OUT, FULL_GRID),
    "3": forced_on_argv(4096, 20, 1, "1 torch thread pinned to one core; the other core ran scripts/bench_model_seed_methods.py "
                        "(1 thread)", OUT, SELECTIONS_AT_8_15_23),
    "4": forced_on_argv(4096, 20, 1, "1 torch thread pinned to one core; the other core ran scripts/bench_model_2k.py "
                        "--stage 3, then nothing; when the 30-layer cell was resumed, scripts/bench_model_2k.py "
                        "--stage 4a (1 thread)", OUT, SELECTIONS_AT_8_15_23, hyper_layers=("15", "30")),
    "5": forced_on_argv(4096, 20, 1, "1 torch thread pinned to one core; the other core ran scripts/bench_model_2k.py "
                        "--stage 4b, then scripts/bench_model_grid.py --stage 5a (1 thread each)", OUT, SELECTIONS_AT_8_15_23,
                        hyper_layers=("15", "30"), hyper_selections=True),
}

if __name__ == "__main__":
    sys.exit(main(stage_argv(STAGES, sys.argv[1:])))
