"""Model level (issue 7), current code (sparse_hyper / hyper with 64 attention-sink keys by default): real
SmolLM2-135M-Instruct on 8 real Wikipedia articles cut to 8192 tokens; perplexity and prefill time per method x
replaced layers x layer selection, every speed-up against the exact model measured in the same run.

Cell order puts the question of issue 7 first: the 15-layer sparse_hyper cells of every selection (weight_norm, last,
first, measured, random x 3 seeds), then sparse_hyper by weight norm on 30, 8 and 23 layers, then hyper on 15 and 30.
One torch thread, pinned to one core (`taskset -c 1`), so that the other core can run the offline suite without
disturbing these timings much; resumable (finished cells in results.jsonl are skipped; a restart re-measures the
baseline, as every speed-up needs a baseline of its own run).

Machine: 2-core CPU VM (AMD EPYC, AVX2), no GPU. Date: 2026-11-22.

Five stages, the same results file (eval/results/model_bench_grid/results.jsonl):
1. (session 2) every cell on 8 articles;
2. (session 3, same date) the question of issue 7 on 20 articles: the exact baseline and the 15-layer sparse_hyper
   cells of every selection are extended from 8 to 20 articles (the 8 articles' losses reused, the 12 new ones
   computed and timed, the baseline timed on the same 12 in the same run; no re-profile: the profile of stage 1
   stays). The other cells stay on 8 articles; the report compares each cell with exact on its own articles.
3. (session 4, same date) every other cell of stage 1 extended to 20 articles the same way: sparse_hyper by weight
   norm on 30, 8 and 23 layers, hyper on 15 and 30 (the exact baseline re-timed on the 12 new articles).
4. (session 6, 2026-11-30) every selection at 8 and 23 layers as well (last, first, measured, random x 3 seeds), so
   that each selection has a curve at 8k as at 2k and 4k: 22-30 min of one core per cell, run as stages 4a and 4b
   side by side (below). Every 23-layer cell and 8 layers last / random seed 0 finished in session 6; the other
   8-layer cells (first, measured, random seeds 1 and 2) were stopped at its end and resumed from their article
   records in session 7 (same date), each run re-timing the exact baseline on all 20 articles.
5. (session 8, same date) plain `hyper` by the other selections at 15 layers (by weight_norm it ran in stages 1-3),
   as 5a (last, random seeds 0 and 1) and 5b (random seed 2, first, measured) side by side, about 30 min of one core
   per cell. Finished in session 8: last, random seeds 0 and 2. Resumed and finished in session 9 (same date), 5a
   and 5b side by side again: random seed 1 from its first 2 article records (5a; its baseline re-timed on the other
   18), first and measured (5b; baseline re-timed on all 20 articles).

    taskset -c 1 .venv/bin/python scripts/bench_model_grid.py --stage 1   # writes eval/results/model_bench_grid/
    taskset -c 1 .venv/bin/python scripts/bench_model_grid.py --stage 2
    taskset -c 1 .venv/bin/python scripts/bench_model_grid.py --stage 3   # about 95 min
    taskset -c 1 .venv/bin/python scripts/bench_model_grid.py --stage 4a  # last, first, measured at 23 then 8 layers
    taskset -c 0 .venv/bin/python scripts/bench_model_grid.py --stage 4b  # random x 3 seeds, the same, side by side
    taskset -c 0 .venv/bin/python scripts/bench_model_grid.py --stage 5a  # hyper: last, random 0-1
    taskset -c 1 .venv/bin/python scripts/bench_model_grid.py --stage 5b  # hyper: random 2, first, measured
    .venv/bin/python scripts/bench_model_grid.py --report-only            # rebuild results.md / json / plots
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from bench_model_2k import stage_argv  # noqa: E402

from hf_sparse_attn.cli import main  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "eval", "results", "model_bench_grid")
SELECTIONS = ["--selections", "weight_norm", "last", "first", "measured", "random", "--random-seeds", "0", "1", "2",
              "--compare-selections-at", "15", "--compare-methods", "sparse_hyper"]
# every stage from 2 on: 20 articles of 8192 tokens, one thread, no re-profile (the profile of stage 1 stays)
RUN_20_ARTICLES = ["bench", "model", "--tokens", "8192", "--articles", "20", "--threads", "1", "--no-profile"]
STAGE_4 = [*RUN_20_ARTICLES,
           "--methods", "sparse_hyper", "--layers", "0", "15", "8", "23",
           *SELECTIONS[:-4], "--compare-selections-at", "8", "15", "23", "--compare-methods", "sparse_hyper",
           "--machine-note", "1 torch thread pinned to one core; stage 4 ran as 4a and 4b side by side, one per core",
           "--out", OUT]
STAGE_4_SPLIT = ["--layers", "0", "23", "8", "--machine-note",
                 "1 torch thread pinned to one core; the other core ran the other half of stage 4 (1 thread)"]
STAGE_5 = [*RUN_20_ARTICLES,
           "--methods", "hyper", "--layers", "0", "15", "--selections", "weight_norm", "last", "random", "first",
           "measured", "--random-seeds", "0", "1", "2", "--compare-selections-at", "15",
           "--machine-note", "1 torch thread pinned to one core; stage 5 ran as 5a and 5b side by side, one per core, "
           "in sessions 8 and 9 (for about 10 min of session 8's last 5b cell the test suite took 5a's core; in "
           "session 9, once 5a had finished, scripts/bench_model_seed_methods.py --stage 2a ran beside 5b, 1 thread)",
           "--out", OUT]
STAGES = {
    "1": ["bench", "model", "--tokens", "8192", "--articles", "8", "--threads", "1",
          "--methods", "sparse_hyper", "hyper", "--layers", "0", "15", "30", "8", "23", "--method-layers", "hyper=15,30",
          *SELECTIONS, "--machine-note", "1 torch thread pinned to one core; the other core ran scripts/offline_suite.py",
          "--out", OUT],
    "2": [*RUN_20_ARTICLES,
          "--methods", "sparse_hyper", "--layers", "0", "15", *SELECTIONS,
          "--machine-note", "1 torch thread pinned to one core; the other core ran scripts/bench_model_4k.py, then "
          "scripts/bench_kernels_all.py --grid full (1 thread each)", "--out", OUT],
    "3": [*RUN_20_ARTICLES,
          "--methods", "sparse_hyper", "hyper", "--layers", "0", "15", "30", "8", "23", "--method-layers", "hyper=15,30",
          *SELECTIONS, "--machine-note", "1 torch thread pinned to one core; the other core ran "
          "scripts/bench_model_2k.py --stage 2 (1 thread)", "--out", OUT],
    # stage 4 as it was run (2026-11-30): two processes side by side, one per core, appending to the same results
    # file (each record one O_APPEND write); 23 layers first. Each times the exact baseline in its own run.
    "4a": STAGE_4 + ["--selections", "last", "first", "measured", *STAGE_4_SPLIT],
    "4b": STAGE_4 + ["--selections", "random", *STAGE_4_SPLIT],
    "4": STAGE_4,  # the whole of stage 4
    # stage 5 (session 8, 2026-11-30): plain hyper by the other selections at 15 layers (by weight_norm it ran in
    # stages 1-3), run as 5a and 5b side by side like stage 4; the question of issue 7 (last, random) first
    "5a": STAGE_5 + ["--selections", "last", "random", "--random-seeds", "0", "1", "--machine-note",
                     "1 torch thread pinned to one core; the other core ran scripts/bench_model_4k.py --stage 5, then "
                     "the other half of this stage (1 thread), in session 8; in session 9 (random seed 1 resumed) "
                     "the other half of this stage (1 thread)"],
    "5b": STAGE_5 + ["--selections", "random", "first", "measured", "--random-seeds", "2", "--machine-note",
                     "1 torch thread pinned to one core; the other core ran the other half of this stage, then for "
                     "about 10 min of session 8's last cell the test suite (bash .ci/run, 1 core); in session 9 "
                     "(first, measured) the other half of this stage, then scripts/bench_model_seed_methods.py "
                     "--stage 2a (1 thread each)"],
    "5": STAGE_5,  # the whole of stage 5, the last stage: the default of --report-only
}

if __name__ == "__main__":
    sys.exit(main(stage_argv(STAGES, sys.argv[1:])))
