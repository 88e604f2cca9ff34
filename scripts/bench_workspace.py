"""Speed of the per-thread workspace (hf_sparse_attn/kernels/workspace.py) against the old process-wide one.

The old implementation (one module-level dict of buffers shared by every call of the process, which gave wrong
outputs when two threads ran at once) is re-created below and swapped in for the timed calls of "global"; "thread"
runs the library as it is. Both are timed alternately in the same run (median of --repeats after one warm-up
each), ``hyper`` and ``sparse_hyper`` with their default parameters, B=1, H=8, D=64, fp32, one torch thread.
Run it pinned to one core:

    hf-sparse-attn bench run eval/experiments/workspace_concurrency.toml   # the committed run (--repeats 7)

Writes eval/results/workspace_concurrency/{results.json, results.md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from hf_sparse_attn.kernels import workspace as thread_workspace
from hf_sparse_attn.methods import get_method
from hf_sparse_attn.methods import causal_recursion, single_pass, sparse_hyper, window

OUT_DIR = os.path.join("eval", "results", "workspace_concurrency")
MACHINE = "2-core CPU VM (AMD EPYC), no GPU, shared with other jobs; one torch thread pinned to one core"
DATE = "2026-12-01"
USERS = (causal_recursion, single_pass, window, sparse_hyper)  # the modules of hyper / sparse_hyper that call workspace()

_GLOBAL: dict[tuple, torch.Tensor] = {}


def global_workspace(name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """The old process-wide buffer store: one flat buffer per (name, dtype, device), shared by every thread."""
    numel = 1
    for size in shape:
        numel *= int(size)
    key = (name, like.dtype, like.device)
    buf = _GLOBAL.get(key)
    if buf is None or buf.numel() < numel:
        _GLOBAL.pop(key, None)
        buf = torch.empty(numel, dtype=like.dtype, device=like.device)
        _GLOBAL[key] = buf
    return buf[:numel].view(shape)


def use(implementation: str) -> None:
    """Route every workspace() call of the library to ``implementation`` ("global" or "thread")."""
    fn = global_workspace if implementation == "global" else thread_workspace.workspace
    for module in USERS:
        module.workspace = fn


def time_call(name: str, q, k, v, causal: bool) -> float:
    fn = get_method(name)
    start = time.perf_counter()
    fn(q, k, v, causal=causal, scale=0.125, generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - start


def main() -> int:
    global OUT_DIR
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=OUT_DIR, help="results directory")
    parser.add_argument("--report-only", action="store_true", help="rewrite results.md from results.json")
    args = parser.parse_args()
    OUT_DIR = args.out
    torch.set_num_threads(1)
    os.makedirs(OUT_DIR, exist_ok=True)
    if args.report_only:  # the table again from the saved cells
        with open(os.path.join(OUT_DIR, "results.json"), encoding="utf-8") as f:
            saved = json.load(f)
        cells, args.repeats = saved["cells"], saved["repeats"]
    else:
        cells = []
        for causal in (False, True):
            for n in args.ns:
                g = torch.Generator().manual_seed(n)
                q, k, v = (torch.randn(1, 8, n, 64, generator=g) for _ in range(3))
                for name in ("hyper", "sparse_hyper"):
                    times = {"global": [], "thread": []}
                    outputs = {}
                    for impl in ("global", "thread"):  # warm-up: buffers allocated once, outputs compared
                        use(impl)
                        outputs[impl] = get_method(name)(q, k, v, causal=causal, scale=0.125,
                                                         generator=torch.Generator().manual_seed(0))[0]
                    for _ in range(args.repeats):
                        for impl in ("global", "thread"):
                            use(impl)
                            times[impl].append(time_call(name, q, k, v, causal))
                    use("thread")
                    cell = {
                        "method": name, "n": n, "causal": causal,
                        "global_s": statistics.median(times["global"]), "thread_s": statistics.median(times["thread"]),
                        "global_all_s": times["global"], "thread_all_s": times["thread"],
                        "outputs_equal": bool(torch.equal(outputs["global"], outputs["thread"])),
                        "thread_workspace_mb": thread_workspace.workspace_bytes() / 2**20,
                    }
                    cell["ratio_thread_over_global"] = cell["thread_s"] / cell["global_s"]
                    cell["ratio_of_minima"] = min(times["thread"]) / min(times["global"])
                    cells.append(cell)
                    print(f"{name:12s} N={n:6d} causal={causal!s:5s} global {cell['global_s']:.3f}s thread "
                          f"{cell['thread_s']:.3f}s ratio {cell['ratio_thread_over_global']:.3f} "
                          f"equal={cell['outputs_equal']}", flush=True)
                    _GLOBAL.clear()
                    thread_workspace.clear_workspace()
    results = {"machine": MACHINE, "date": DATE, "torch": torch.__version__, "python": platform.python_version(),
               "threads": torch.get_num_threads(), "repeats": args.repeats, "script": "scripts/bench_workspace.py",
               "cells": cells}
    with open(os.path.join(OUT_DIR, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["# Per-thread workspace vs the old process-wide workspace", "",
             f"{MACHINE}. {DATE}. torch {torch.__version__}, 1 torch thread, B=1 H=8 D=64 fp32, default parameters, "
             f"median of {args.repeats} alternating calls after one warm-up each. Script: scripts/bench_workspace.py.",
             "", "| method | N | causal | global s | per-thread s | ratio of medians (per-thread / global) | ratio of minima | outputs equal |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['method']} | {c['n']} | {c['causal']} | {c['global_s']:.3f} | {c['thread_s']:.3f} | "
                     f"{c['ratio_thread_over_global']:.3f} | {c['ratio_of_minima']:.3f} | {c['outputs_equal']} |")
    lines.append("")
    for key, label in (("ratio_thread_over_global", "medians"), ("ratio_of_minima", "minima")):
        ratios = [c[key] for c in cells]
        lines.append(f"Geometric mean of the ratios of {label}: {statistics.geometric_mean(ratios):.3f} "
                     f"(min {min(ratios):.3f}, max {max(ratios):.3f}).")
    lines.append("The machine is shared: single calls vary (other jobs on the core); the minima are the least disturbed.")
    with open(os.path.join(OUT_DIR, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
