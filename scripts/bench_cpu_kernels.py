"""CPU kernel benchmark of ``hyper`` and ``sparse_hyper`` against torch SDPA (issue 3 "Performance").

B=1, H=8, D=64, fp32, N in {1k, 2k, 4k, 8k, 16k, 32k}, causal and bidirectional; every cell times the methods
and SDPA alternately in the same run (medians of --repeats). Machine: 2-core CPU VM, no GPU (shared with other
jobs: ratios, measured side by side, are the numbers to trust). Date: 2026-11-22.

Resumable: cells already in results.json are skipped; the JSON is rewritten after every cell.
Before every cell with N >= --quiet-from the script waits (60 s steps, at most --max-wait s) for the 1-minute
load average to fall below --max-load; the load average before and after each cell is recorded.
Memory: "peak extra" is the RSS growth during a timed call; the reused workspace buffers of the sorted-block
kernel (allocated in the warm-up call, kept between calls) are reported separately ("workspace MB").
Writes eval/results/kernels_cpu/{results.json, results.md, time_vs_n.png}.

    .venv/bin/python scripts/bench_cpu_kernels.py [--ns 1024 2048 ...] [--repeats 3] [--redo]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from hf_sparse_attn.eval.kernel_bench import bench_kernels  # noqa: E402
from hf_sparse_attn.methods import get_method  # noqa: E402
from hf_sparse_attn.methods.sorted_blocks import clear_workspace, workspace_bytes  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(__file__), "..", "eval", "results", "kernels_cpu")
METHODS = ("hyper", "sparse_hyper")
TARGETS = {  # (method, causal) -> minimum speed-up over SDPA at N = 32768 (issue 3)
    ("hyper", False): 30.0, ("sparse_hyper", False): 40.0, ("hyper", True): 10.0, ("sparse_hyper", True): 10.0,
}
MACHINE = "2-core CPU VM, no GPU (shared with other jobs)"
DATE = "2026-11-22"


def workspace_of(name: str, n: int, causal: bool) -> float:
    """MB of reused workspace buffers one call of ``name`` leaves behind on a cleared workspace (then cleared)."""
    clear_workspace()
    q, k, v = (torch.randn(1, 8, n, 64) for _ in range(3))
    get_method(name)(q, k, v, causal=causal, scale=0.125)
    held = workspace_bytes() / 2**20
    clear_workspace()
    return held


def cell_key(n: int, causal: bool) -> str:
    return f"n={n}|causal={causal}"


def write_report(results: dict) -> None:
    cells = results["cells"]
    lines = [
        "# CPU kernel benchmark: hyper and sparse_hyper vs torch SDPA",
        "",
        f"Machine: {MACHINE}; torch {torch.__version__}, {results['threads']} threads. Date: {DATE}.",
        "Script: `scripts/bench_cpu_kernels.py` (B=1, H=8, D=64, fp32, default method parameters; every cell",
        "times the methods and SDPA alternately in the same run, medians of the repeats). Useful GFLOP/s =",
        "4*B*H*N^2*D (halved for causal) / time for every column. Peak extra memory = max RSS during the call",
        "minus RSS before it.",
        "",
        "| N | causal | repeats | load avg (before/after) | SDPA s | SDPA GFLOP/s | method | time s | useful GFLOP/s | speed-up | peak extra MB | workspace MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(cells, key=lambda k: (cells[k]["causal"], cells[k]["n"])):
        c = cells[key]
        for name in METHODS:
            m = c["methods"][name]
            load = c.get("loadavg")
            load_s = f"{load[0]:.1f} / {load[1]:.1f}" if load else "not recorded"
            ws = m.get("workspace_mb")
            lines.append(f"| {c['n']} | {c['causal']} | {c['repeats']} | {load_s} | {c['sdpa']['time_s']:.3f} | {c['sdpa']['useful_gflops']:.0f} | {name} | "
                         f"{m['time_s']:.3f} | {m['useful_gflops']:.0f} | {m['speedup_vs_sdpa']:.2f}x | {m['peak_extra_mb']:.0f} | "
                         f"{'-' if ws is None else f'{ws:.0f}'} |")
    lines += ["", "## Crossover (smallest measured N from which the method stays faster than SDPA)", ""]
    for causal in (False, True):
        for name in METHODS:
            ns = sorted(c["n"] for c in cells.values() if c["causal"] == causal)
            faster = [n for n in ns if cells[cell_key(n, causal)]["methods"][name]["speedup_vs_sdpa"] > 1.0]
            cross = next((n for n in ns if all(m in faster for m in ns if m >= n)), None)
            lines.append(f"- {name}, causal={causal}: {cross if cross is not None else 'not reached'}")
    lines += ["", "## Targets of issue 3 at N = 32768", ""]
    for (name, causal), target in TARGETS.items():
        c = cells.get(cell_key(32768, causal))
        if c is None:
            lines.append(f"- {name} causal={causal}: not measured")
            continue
        m = c["methods"][name]
        ok = m["speedup_vs_sdpa"] >= target
        mem = m["peak_extra_mb"] + (m.get("workspace_mb") or 0.0)
        lines.append(f"- {name} causal={causal}: {m['speedup_vs_sdpa']:.1f}x vs target {target:.0f}x -> "
                     f"{'MET' if ok else 'NOT MET'}; peak extra memory + workspace {mem:.0f} MB "
                     f"({'under' if mem < 1024 else 'OVER'} 1 GB)")
    lines.append("")
    lines += results.get("notes", [])
    with open(os.path.join(OUT_DIR, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, causal in zip(axes, (False, True)):
        cells = sorted((c for c in results["cells"].values() if c["causal"] == causal), key=lambda c: c["n"])
        if not cells:
            continue
        ns = [c["n"] for c in cells]
        ax.plot(ns, [c["sdpa"]["time_s"] for c in cells], "k-o", label="torch SDPA")
        for name, style in zip(METHODS, ("C0-s", "C1-^")):
            ax.plot(ns, [c["methods"][name]["time_s"] for c in cells], style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("seconds (median)")
        ax.set_title(f"{'causal' if causal else 'bidirectional'}, B=1 H=8 D=64 fp32")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{MACHINE}, {DATE}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT_DIR, "time_vs_n.png"), dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--redo", action="store_true", help="re-measure cells already in results.json")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--quiet-from", type=int, default=16384, help="wait for a low load average before cells with N >= this")
    parser.add_argument("--max-load", type=float, default=3.0)
    parser.add_argument("--max-wait", type=float, default=1200.0)
    args = parser.parse_args()
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, "results.json")
    results = {"machine": MACHINE, "date": DATE, "torch": torch.__version__, "python": platform.python_version(),
               "threads": torch.get_num_threads(), "script": "scripts/bench_cpu_kernels.py", "cells": {}}
    if os.path.exists(path):
        with open(path) as f:
            results.update({k: v for k, v in json.load(f).items() if k in ("cells", "notes")})
    modes = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    todo = [(n, causal) for causal in modes for n in args.ns
            if args.redo or cell_key(n, causal) not in results["cells"]]
    if not args.report_only:
        for n, causal in tqdm(todo, desc="cells"):
            if n >= args.quiet_from:
                waited = 0.0
                while os.getloadavg()[0] >= args.max_load and waited < args.max_wait:
                    tqdm.write(f"load average {os.getloadavg()[0]:.1f} >= {args.max_load}: waiting 60 s")
                    time.sleep(60)
                    waited += 60
            before = os.getloadavg()[0]
            clear_workspace()
            cell = bench_kernels(METHODS, n, causal, torch.float32, repeats=args.repeats)
            workspace = {name: workspace_of(name, n, causal) for name in METHODS}
            for name in METHODS:
                cell["methods"][name]["workspace_mb"] = workspace[name]
            cell["loadavg"] = [before, os.getloadavg()[0]]
            results["cells"][cell_key(n, causal)] = cell
            with open(path + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(path + ".tmp", path)
            m = cell["methods"]
            tqdm.write(f"N={n} causal={causal}: sdpa {cell['sdpa']['time_s']:.3f}s, " + ", ".join(
                f"{k} {v['time_s']:.3f}s ({v['speedup_vs_sdpa']:.1f}x)" for k, v in m.items()))
    write_report(results)
    plot(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
