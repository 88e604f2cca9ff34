"""Model level (issue 7) at 2048 tokens: real SmolLM2-135M-Instruct on the first 20 real Wikipedia articles with at
least 2048 tokens, exact vs sparse_hyper.

With its defaults sparse_hyper runs causal calls shorter than 8192 tokens exact (below that the causal recursion is
slower than SDPA on this CPU: eval/results/kernels_cpu), so a default-patched model at 2k *is* the exact model. This
run forces the method on: min_seq_len=512 (leaf size of the causal recursion) and causal_min_seq_len=1024, the
parameters of the offline suite (scripts/offline_suite.py), to show what it would cost and save at 2k.

One torch thread pinned to one core (taskset, as scripts/bench_model_grid.py), resumable. Stage 1 (session 2):
15 layers by weight_norm and last, and all 30 layers. Stage 2 (session 4): every selection (weight_norm, last, first,
measured, random x 3 seeds) at every sampled layer count (8, 15, 23, 30), so that each selection has a curve of
perplexity against speed-up, not one point; the 15-layer cells run first. Stage 3 (session 5, 2026-11-30): plain
`hyper` (sampled residual keys) forced on the same way, by weight_norm at 8, 15, 23 and 30 layers. Stage 4 (session
7, same date): plain `hyper` by every selection too (last, first, measured, random x 3 seeds), 15 layers first, then 8
and 23, run as 4a and 4b side by side (one per core), so that the "Attention is Naturally Sparse" paper's ranking is tested with a second method. 4a
finished; 4b (random x 3) was stopped at the end of the session after its 15-layer cells and resumed in session 8
(same date) for its 8- and 23-layer cells (a few article records of 8 layers, seed 0, were kept from session 7).
2k is the one length where the whole selection x layer-count grid fits in a session (a cell is about 4 min of one
core; at 8k it is about 25 min).
Machine: 2-core CPU VM (AMD EPYC, AVX2), no GPU. Date: 2026-11-22.

    taskset -c 1 .venv/bin/python scripts/bench_model_2k.py --stage 1   # writes eval/results/model_bench_2k/
    taskset -c 0 .venv/bin/python scripts/bench_model_2k.py --stage 2   # extends it (about 105 min at 1 thread)
    taskset -c 1 .venv/bin/python scripts/bench_model_2k.py --stage 3   # hyper (about 25 min)
    taskset -c 1 .venv/bin/python scripts/bench_model_2k.py --stage 4a  # hyper: last, first, measured (about 40 min)
    taskset -c 0 .venv/bin/python scripts/bench_model_2k.py --stage 4b  # hyper: random x 3 seeds, side by side
    .venv/bin/python scripts/bench_model_2k.py --stage 4 --report-only  # rebuild results.md / json / plots
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hf_sparse_attn.cli import main  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "eval", "results", "model_bench_2k")
FIRST_GRID = {"layers": ["0", "15", "30"], "selections": ["weight_norm", "last"]}
FULL_GRID = {"layers": ["0", "8", "15", "23", "30"],
             "selections": ["weight_norm", "last", "first", "measured", "random", "--random-seeds", "0", "1", "2"]}


def forced_on_argv(tokens: int, articles: int, threads: int, machine_note: str, out: str, grid: dict = FIRST_GRID,
                   hyper_layers: tuple[str, ...] = (), hyper_selections: bool = False) -> list[str]:
    """`hf-sparse-attn bench model` arguments: exact vs sparse_hyper on ``grid`` (layer counts; selections, compared
    at the layer counts ``compare_at``, default 15), the method forced on at short contexts (also used by
    scripts/bench_model_4k.py). ``hyper_layers``: plain hyper too, forced on the same way, at these layer counts, by
    weight_norm only or, with ``hyper_selections``, by every selection of ``grid`` as sparse_hyper."""
    methods = ["sparse_hyper", "hyper"] if hyper_layers else ["sparse_hyper"]
    argv = ["bench", "model", "--tokens", str(tokens), "--articles", str(articles), "--threads", str(threads),
            "--methods", *methods, "--layers", *grid["layers"], "--selections", *grid["selections"],
            "--compare-selections-at", *grid.get("compare_at", ["15"])]
    if hyper_layers:
        argv += ["--method-layers", "hyper=" + ",".join(hyper_layers)]
        if not hyper_selections:
            argv += ["--compare-methods", "sparse_hyper"]
    for method in methods:
        argv += ["--method-param", f"{method}.min_seq_len=512", "--method-param", f"{method}.causal_min_seq_len=1024"]
    return argv + ["--machine-note", machine_note, "--out", out]


def stage_argv(stages: dict[str, list[str]], argv: list[str]) -> list[str]:
    """``--stage S`` picks ``stages[S]`` (default: the last stage); the other arguments are passed on."""
    argv = list(argv)
    stage = list(stages)[-1]
    if "--stage" in argv:
        i = argv.index("--stage")
        stage = argv[i + 1]
        del argv[i: i + 2]
    return stages[stage] + argv


SELECTION_GRID = {"layers": ["0", "15", "8", "23", "30"],
                  "selections": ["weight_norm", "last", "first", "measured", "random", "--random-seeds", "0", "1", "2"],
                  "compare_at": ["8", "15", "23", "30"]}

# stage 4: plain hyper by every selection, split in two processes that differ only in the selections they run
HYPER_SELECTIONS_AT_15_8_23 = {"layers": ["0", "15", "8", "23"], "compare_at": ["15", "8", "23"]}
HYPER_SELECTIONS_A = {**HYPER_SELECTIONS_AT_15_8_23, "selections": ["weight_norm", "last", "first", "measured"]}
HYPER_SELECTIONS_B = {**HYPER_SELECTIONS_AT_15_8_23, "selections": ["weight_norm", "random", "--random-seeds", "0", "1", "2"]}

STAGES = {
    "1": forced_on_argv(2048, 20, 1, "1 torch thread pinned to one core; the other core ran scripts/offline_suite.py", OUT),
    "2": forced_on_argv(2048, 20, 1, "1 torch thread pinned to one core; the other core ran scripts/bench_model_grid.py "
                        "--stage 3 (1 thread)", OUT, SELECTION_GRID),
    "3": forced_on_argv(2048, 20, 1, "1 torch thread pinned to one core; the other core ran scripts/bench_model_4k.py "
                        "--stage 3 (1 thread)", OUT, SELECTION_GRID, hyper_layers=("8", "15", "23", "30")),
    # stage 4 as run (session 7, 2026-11-30): two processes side by side, one per core, on the same results file;
    # 15 layers first. The sparse_hyper cells of these grids are all done: only hyper's run.
    "4a": forced_on_argv(2048, 20, 1, "1 torch thread pinned to one core; the other core ran scripts/bench_model_4k.py "
                         "--stage 4, then the other half of this stage (1 thread)", OUT, HYPER_SELECTIONS_A,
                         hyper_layers=("15", "8", "23"), hyper_selections=True),
    "4b": forced_on_argv(2048, 20, 1, "1 torch thread pinned to one core; the other core ran the other half of this "
                         "stage (1 thread); the 8- and 23-layer cells were resumed in session 8 while the other core "
                         "ran scripts/bench_model_4k.py --stage 5 (1 thread)", OUT, HYPER_SELECTIONS_B,
                         hyper_layers=("15", "8", "23"), hyper_selections=True),
    # the whole of stage 4, the last stage: the default of --report-only
    "4": forced_on_argv(2048, 20, 1, "1 torch thread pinned to one core; stage 4 ran as 4a and 4b side by side, one per "
                        "core", OUT, SELECTION_GRID, hyper_layers=("15", "8", "23", "30"), hyper_selections=True),
}

if __name__ == "__main__":
    sys.exit(main(stage_argv(STAGES, sys.argv[1:])))
