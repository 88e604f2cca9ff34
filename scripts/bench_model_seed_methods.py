"""Model level (issue 7) for kmv (Indyk et al.), poly (Alman & Song) and feature_sketch (Deng, Mahadevan & Song): real
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

Two stages, the same results file (eval/results/model_bench_seed_methods/results.jsonl):
1. (2026-11-30, an earlier session) the cells above, by weight_norm;
2. (session 9, same date) issue 7's selection question for kmv, the one seed method that changes a real model's
   output here: kmv on 15 layers by last and by random (seeds 0, 1, 2), against its weight_norm cell of stage 1.
   Run as 2a (last, random seeds 0 and 1) and 2b (random seed 2) beside scripts/bench_model_grid.py --stage 5b / 5a,
   each process re-timing the exact baseline. About 29 min of one core per kmv cell, 11 min per baseline. poly and
   feature_sketch are left out: poly out of its regime ruins the model by any selection, and feature_sketch serves
   no call at d = 64.

One torch thread pinned to one core (taskset), resumable (finished articles are kept in results.jsonl).
Machine: 2-core CPU VM (AMD EPYC, AVX2), no GPU.

    taskset -c 1 .venv/bin/python scripts/bench_model_seed_methods.py --stage 1   # about 2.5 hours at 1 thread
    taskset -c 0 .venv/bin/python scripts/bench_model_seed_methods.py --stage 2a  # kmv by last, random 0, 1
    taskset -c 1 .venv/bin/python scripts/bench_model_seed_methods.py --stage 2b  # kmv by random 2
    .venv/bin/python scripts/bench_model_seed_methods.py --report-only            # rebuild results.md / json / plots
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_model_2k import stage_argv  # noqa: E402

from hf_sparse_attn.cli import main  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "eval", "results", "model_bench_seed_methods")
RUN_20_ARTICLES = ["bench", "model", "--tokens", "4096", "--articles", "20", "--threads", "1",
                   "--method-param", "poly.allow_out_of_regime=True", "--out", OUT]
STAGE_1_CELLS = ["--methods", "kmv", "poly", "feature_sketch", "--layers", "0", "8", "15",
                 "--method-layers", "kmv=8,15", "--method-layers", "poly=8", "--method-layers", "feature_sketch=15"]
# stage 2: kmv on 15 layers by the selections weight_norm is put against in issue 7; no re-profile (stage 1's stays)
KMV_AT_15 = ["--methods", "kmv", "--layers", "0", "15", "--no-profile"]
STAGES = {
    "1": [*RUN_20_ARTICLES, *STAGE_1_CELLS, "--selections", "weight_norm", "--machine-note",
          "1 torch thread pinned to one core; the other core ran scripts/bench_model_4k.py --stage 3 (1 thread)"],
    "2a": [*RUN_20_ARTICLES, *KMV_AT_15, "--selections", "last", "random", "--random-seeds", "0", "1", "--machine-note",
           "1 torch thread pinned to one core; the other core ran scripts/bench_model_grid.py --stage 5b, then "
           "this stage's 2b (1 thread each), then for about 10 min of the last cell (random seed 1) the test suite "
           "(bash .ci/run pinned to that core)"],
    "2b": [*RUN_20_ARTICLES, *KMV_AT_15, "--selections", "random", "--random-seeds", "2", "--machine-note",
           "1 torch thread pinned to one core; the other core ran this stage's 2a (1 thread)"],
    # the whole of stages 1 and 2, the default of --report-only
    "2": [*RUN_20_ARTICLES, *STAGE_1_CELLS, "--selections", "weight_norm", "last", "random",
          "--random-seeds", "0", "1", "2", "--compare-selections-at", "15", "--compare-methods", "kmv",
          "--machine-note",
          "1 torch thread pinned to one core; in stage 1 the other core ran scripts/bench_model_4k.py --stage 3, in "
          "stage 2 (kmv by last / random, session 9) scripts/bench_model_grid.py --stage 5a / 5b or the other half "
          "of stage 2 (1 thread each), and for about 10 min of random seed 1's cell the test suite"],
}

if __name__ == "__main__":
    sys.exit(main(stage_argv(STAGES, sys.argv[1:])))
