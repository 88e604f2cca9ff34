"""Kernel level on a GPU (issue 7: "to 128k on a GPU when one is lent"): hyper and sparse_hyper (Triton block
kernel) against torch SDPA on random inputs (B=1, H=8, D=64), N = 1k .. 128k, causal and bidirectional, fp32 and bf16,
through `hf-sparse-attn bench kernel --device cuda`. kmv, poly and feature_sketch run only where they are cheap (kmv samples on
the CPU; poly refuses random inputs, which are outside its bounded regime; feature_sketch and our chunked exact
reference are dense).

NOT RUN YET: no GPU was lent to the session that wrote it (2026-11-30). Sized for one call of the device tool
(about 5 minutes of an H200: SDPA alone is ~2 s per 128k bidirectional call in fp32). On the GPU machine, with a
CUDA build of torch and this package importable:

    PYTHONUNBUFFERED=1 python scripts/bench_kernels_gpu.py --out $OUT/kernels_gpu   # then copy into eval/results/
    python scripts/bench_kernels_gpu.py --report-only                                # rebuild results.md / plots
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hf_sparse_attn.cli import main  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "eval", "results", "kernels_gpu")
ARGV = ["bench", "kernel", "--device", "cuda", "--inputs", "random",
        "--ns", "1024", "4096", "16384", "32768", "65536", "131072", "--causal", "both", "--dtypes", "fp32", "bf16",
        "--repeats", "3", "--warmup", "2",
        "--max-n", "kmv=4096", "--max-n", "feature_sketch=4096", "--max-n", "exact=16384", "--max-n", "poly=4096",
        "--machine-note", "GPU run of scripts/bench_kernels_gpu.py"]

if __name__ == "__main__":
    extra = sys.argv[1:]
    sys.exit(main(ARGV + (extra if "--out" in extra else extra + ["--out", OUT])))
