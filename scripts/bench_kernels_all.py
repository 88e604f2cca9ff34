"""Kernel level, every registered method vs torch SDPA (issue 7): random inputs and real q/k/v captured from SmolLM2
and MiniLM, causal and bidirectional, fp32 and bf16, medians of repeats with their spread.

Machine: 2-core CPU VM (AMD EPYC, AVX2), no GPU. Date: 2026-11-22. Everything runs through `hf-sparse-attn bench kernel`.
Two grids:

``--grid reduced`` (session 2, eval/results/kernels_all/; superseded by the full grid): 2 threads on a VM shared with
other engineers' jobs (load average 2.7-5 per cell), the range cut to fit: random fp32 N = 1k, 4k, 16k; SmolLM2 fp32
1k, 4k; MiniLM fp32 / bf16; random bf16 4k.

``--grid full`` (session 3, eval/results/kernels_full/): the issue's range, one torch thread pinned to one core
(`taskset -c 0`) while the other core ran the 8k model benchmark (1 thread): random inputs (B=1, H=8, D=64) N = 1k,
2k, 4k, 8k, 16k, 32k; SmolLM2 (the layer with the largest weight norm, one Wikipedia article; shorter N are prefixes
of one 8192-token capture, its position limit) N = 1k .. 8k; MiniLM (largest-R layer, one 512-token window,
bidirectional: its only real length); causal and bidirectional, fp32 and bf16 for every kind.

Slow methods run only up to an N limit (--max-n below), measured once at 4k before this script was written:
``kmv`` took 63-80 s per call at N=4096 (SDPA 0.8-1.6 s), so it stops at 1024; ``exact`` (our chunked reference,
6-12x slower than SDPA: 6.5-9.4 s at 4096) and ``feature_sketch`` (which computes exact attention unless D >= 2N, i.e.
always here; 7-10 s at 4096) stop at 2048. ``poly`` refuses inputs outside its bounded-entry regime (Theorem 3.7): those rows say "failed".

Resumable: cells already in results.json are skipped. Writes {results.json, results.md, time_vs_n_random.png,
time_vs_n_smollm2.png} into the grid's directory.

    taskset -c 0 .venv/bin/python scripts/bench_kernels_all.py --grid full [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hf_sparse_attn.cli import main  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "..", "eval", "results")
MAX_N = ["--max-n", "kmv=1024", "--max-n", "exact=2048", "--max-n", "feature_sketch=2048"]
GRIDS = {  # name: (output directory, threads, machine note, stages: (inputs, ns, causal, dtypes))
    "reduced": ("kernels_all", 2, "a VM shared with other engineers' jobs (see load_avg_1min per cell in results.json)", [
        (["random"], [1024, 4096, 16384], "both", ["fp32"]),
        (["smollm2"], [1024, 4096], "both", ["fp32"]),
        (["minilm"], [512], "bidirectional", ["fp32", "bf16"]),
        (["random"], [4096], "both", ["bf16"]),
    ]),
    "full": ("kernels_full", 1, "1 torch thread pinned to one core; the other core ran scripts/bench_model_grid.py (1 thread)", [
        (["random", "smollm2", "minilm"], [1024, 2048, 4096, 8192, 16384, 32768], "both", ["fp32", "bf16"]),
    ]),
}


def run(grid: str, repeats: int, quick: bool) -> int:
    out_name, threads, note, stages = GRIDS[grid]
    for inputs, ns, causal, dtypes in stages:
        if quick:  # a smoke run of the script itself: small N, one repeat, into a scratch directory
            ns = [n for n in ns if n <= 2048] or ns[:1]
        argv = ["bench", "kernel", "--inputs", *inputs, "--ns", *map(str, ns), "--causal", causal, "--dtypes", *dtypes,
                "--repeats", str(1 if quick else repeats), "--threads", str(threads), *MAX_N, "--machine-note", note,
                "--out", f"/tmp/{out_name}_quick" if quick else os.path.join(RESULTS, out_name)]
        rc = main(argv)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full", help="which grid (see the docstring)")
    parser.add_argument("--quick", action="store_true", help="smoke run: N <= 2048, one repeat, output in /tmp/<grid dir>_quick")
    args = parser.parse_args()
    sys.exit(run(args.grid, args.repeats, args.quick))
