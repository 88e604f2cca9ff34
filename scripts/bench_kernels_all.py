"""Kernel level, every registered method vs torch SDPA (issue 7): random inputs and real q/k/v captured from SmolLM2
and MiniLM, causal and bidirectional, fp32 and bf16, medians of repeats with their spread.

Machine: 2-core CPU VM, no GPU, shared with other engineers' jobs (ratios measured side by side in the same cell are
the numbers to trust; each cell records the 1-minute load average). Date: 2026-11-22.

The grid, reduced to fit the shared 2-core machine in the time left after the model benchmark (everything runs
through `hf-sparse-attn bench kernel`; the issue's full range is N = 1k..32k for every kind and dtype):
  * random inputs (B=1, H=8, D=64), fp32, causal and bidirectional, N = 1k, 4k, 16k (32k not run here: SDPA alone
    takes 12.7 s per bidirectional call at 32k, see eval/results/kernels_cpu for hyper / sparse_hyper there);
  * SmolLM2 (layer with the largest weight norm, one Wikipedia article; shorter N are prefixes of the capture),
    fp32, causal and bidirectional, N = 1k, 4k;
  * MiniLM (largest-R layer, one 512-token window, bidirectional: its only real length), fp32 and bf16;
  * random inputs, bf16, causal and bidirectional, N = 4k.
Slow methods run only up to an N limit (--max-n below), measured once at 4k before this script was written:
``kmv`` took 63-80 s per call at N=4096 (SDPA 0.8-1.6 s), so it stops at 1024; ``exact`` (our chunked reference,
6-12x slower than SDPA: 6.5-9.4 s at 4096) and ``feature_sketch`` (which computes exact attention unless D >= 2N, i.e.
always here; 7-10 s at 4096) stop at 2048. ``poly`` refuses inputs outside its bounded-entry regime (Theorem 3.7): those rows say "failed".

Resumable: cells already in results.json are skipped. Writes eval/results/kernels_all/{results.json, results.md,
time_vs_n_random.png, time_vs_n_smollm2.png}.

    .venv/bin/python scripts/bench_kernels_all.py [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hf_sparse_attn.cli import main  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "eval", "results", "kernels_all")
MAX_N = ["--max-n", "kmv=1024", "--max-n", "exact=2048", "--max-n", "feature_sketch=2048"]
NOTE = "a VM shared with other engineers' jobs (see load_avg_1min per cell in results.json)"

STAGES = [  # (inputs, ns, causal, dtypes)
    (["random"], [1024, 4096, 16384], "both", ["fp32"]),
    (["smollm2"], [1024, 4096], "both", ["fp32"]),
    (["minilm"], [512], "bidirectional", ["fp32", "bf16"]),
    (["random"], [4096], "both", ["bf16"]),
]


def run(repeats: int, quick: bool) -> int:
    for inputs, ns, causal, dtypes in STAGES:
        if quick:  # a smoke run of the script itself: small N, one repeat, into a scratch directory
            ns = [n for n in ns if n <= 2048] or ns[:1]
        argv = ["bench", "kernel", "--inputs", *inputs, "--ns", *map(str, ns), "--causal", causal, "--dtypes", *dtypes,
                "--repeats", str(1 if quick else repeats), *MAX_N, "--machine-note", NOTE,
                "--out", "/tmp/kernels_all_quick" if quick else OUT]
        rc = main(argv)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: N <= 2048, one repeat, output in /tmp/kernels_all_quick")
    args = parser.parse_args()
    sys.exit(run(args.repeats, args.quick))
