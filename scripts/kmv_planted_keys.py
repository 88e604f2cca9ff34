"""Indyk et al. Lemma 3.4 as it survives in kmv's blocks engine: the probability that a planted heavy key is found.

Lemma 3.4 ("every heavy key is found") becomes "found with the LSH's probability" in the blocks engine
(docs/methods/kmv.md, "Which guarantee survives"). Setting: q, k [1, H, N, D] standard normal (H = --heads 4,
D = --head-dim 64) with --pairs 256 planted pairs per head, key k[kj] at cosine c to its query q[qi] with norm
1.5 sqrt(D) (``hf_sparse_attn.eval.bench.kernel_suite.planted_heavy_pairs``, one problem per (N, c), --problem-seed 0).
``kmv.heavy_key_found`` (7 hyperplanes, blocks of 256: the engine's defaults) says for each pair whether the
engine attends it exactly in its key block; the probability is the fraction of the H x P pairs found, for hash
seeds 0 .. --seeds - 1, and the table gives its mean (and min) over those seeds. Chance = block_size / N: the
probability that a random block of the N / block_size holds the key.

Cells (N, c) are written to --out/results.json as they finish; a run again skips the cells already there.
Writes --out/{results.json, results.md, found_vs_n.png}. Full measurement (the defaults): about 10 seconds on one
core (hashing and sorting only; no attention is computed).

    taskset -c 0 .venv/bin/python scripts/kmv_planted_keys.py --out eval/results/kmv_planted_keys
    .venv/bin/python scripts/kmv_planted_keys.py --out eval/results/kmv_planted_keys --report-only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys

import torch
from tqdm import tqdm

from hf_sparse_attn.eval.bench.kernel_suite import planted_heavy_pairs
from hf_sparse_attn.eval.store import write_json
from hf_sparse_attn.methods import kmv

OUT_DIR = os.path.join("eval", "results", "kmv_planted_keys")
MACHINE = "2-core CPU VM, no GPU"
SETTING_KEYS = ("heads", "pairs", "head_dim", "lsh_num_projs", "block_size", "problem_seed")


def cell_key(n: int, cos: float) -> str:
    return f"N={n} c={cos:g}"


def measure_cell(n: int, cos: float, setting: dict, seeds: int) -> dict:
    """The found fraction of the planted pairs of one problem (N, c) for hash seeds 0 .. seeds - 1."""
    q, k, qi, kj = planted_heavy_pairs(n, heads=setting["heads"], pairs=setting["pairs"], head_dim=setting["head_dim"],
                                       cos=cos, seed=setting["problem_seed"])
    rates = [float(kmv.heavy_key_found(q, k, qi, kj, lsh_num_projs=setting["lsh_num_projs"],
                                       block_size=setting["block_size"], seed=s).float().mean()) for s in range(seeds)]
    return {"n": n, "cos": cos, "rates": rates, "mean": sum(rates) / len(rates), "min": min(rates),
            "chance": min(1.0, setting["block_size"] / n)}


def write_report(results: dict, out_dir: str) -> None:
    s = results["setting"]
    cells = list(results["cells"].values())
    ns = sorted({c["n"] for c in cells})
    coss = sorted({c["cos"] for c in cells})
    by = {(c["n"], c["cos"]): c for c in cells}
    config = os.path.join("eval", "experiments", os.path.basename(os.path.normpath(out_dir)) + ".toml")
    lines = ["# kmv blocks engine: probability that a planted heavy key is found (Lemma 3.4 as it survives)", "",
             f"Machine: {results['machine']}. Date: {results['date']}. torch {results['torch']}, "
             f"{results['threads']} torch thread, 1-min load average {results['loadavg_1min']:.2f} at the start of "
             "the run that measured.",
             f"Command: `{results['command']}`" + (f" (experiment `{config}`)." if os.path.exists(config) else "."), "",
             f"Setting: q, k [1, {s['heads']}, N, {s['head_dim']}] standard normal, {s['pairs']} planted pairs per head "
             f"(key at cosine c to its query, norm 1.5 sqrt(D); `planted_heavy_pairs`, problem seed {s['problem_seed']}); "
             f"`kmv.heavy_key_found` with {s['lsh_num_projs']} hyperplanes and blocks of {s['block_size']}. Each entry: "
             f"the fraction of the {s['heads']} x {s['pairs']} pairs found, mean over hash seeds "
             f"0-{results['seeds'] - 1} (min in parentheses). Chance = block_size / N (a random block).", "",
             "| N | " + " | ".join(f"c = {c:g}" for c in coss) + " | chance |",
             "|---|" + "---|" * (len(coss) + 1)]
    for n in ns:
        row = [by.get((n, c)) for c in coss]
        lines.append(f"| {n} | " + " | ".join("-" if e is None else f"{e['mean']:.2f} ({e['min']:.2f})" for e in row)
                     + f" | {min(1.0, s['block_size'] / n):.3f} |")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, c in enumerate(coss):
        pts = [(n, by[(n, c)]["mean"]) for n in ns if (n, c) in by]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o", color=f"C{i}", label=f"c = {c:g}")
    ax.plot(ns, [min(1.0, s["block_size"] / n) for n in ns], "--", color="gray", label="chance (block_size / N)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (keys)")
    ax.set_ylabel("P(planted heavy key found)")
    ax.set_ylim(0, None)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"kmv blocks: {s['lsh_num_projs']} hyperplanes, blocks of {s['block_size']}, D={s['head_dim']}; "
                 f"{results['machine']}, {results['date']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "found_vs_n.png"), dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[4096, 8192, 16384], help="key counts N")
    parser.add_argument("--cos", type=float, nargs="+", default=[0.6, 0.8, 0.9],
                        help="cosine c between a planted key and its query")
    parser.add_argument("--seeds", type=int, default=5, help="hash seeds 0 .. seeds - 1 per cell")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=256, help="planted pairs per head")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--lsh-num-projs", type=int, default=7, help="hyperplanes of the sort LSH")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--problem-seed", type=int, default=0, help="seed of the planted problem of each cell")
    parser.add_argument("--out", default=OUT_DIR)
    parser.add_argument("--report-only", action="store_true", help="rewrite results.md and the plot from results.json")
    parser.add_argument("--shard", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.shard is not None:
        parser.error("kmv_planted_keys.py cannot shard (the whole grid takes seconds); run it without --shard")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if any(not 0 < c <= 1 for c in args.cos):
        parser.error("--cos values must lie in (0, 1]")
    if any(n < args.pairs for n in args.ns):
        parser.error(f"every --ns value must be at least --pairs ({args.pairs}): the planted pairs are distinct positions")
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    setting = {key: getattr(args, key) for key in SETTING_KEYS}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
        if not args.report_only and (results["setting"] != setting or results["seeds"] != args.seeds):
            raise SystemExit(f"{path} was measured with {results['setting']}, seeds={results['seeds']}; this run asks "
                             f"for {setting}, seeds={args.seeds}: pass another --out, or delete that file")
    elif args.report_only:
        raise SystemExit(f"--report-only: no {path} to report; run without --report-only first")
    else:
        results = {"machine": MACHINE, "setting": setting, "seeds": args.seeds, "cells": {}}
    todo = [] if args.report_only else [(n, c) for n in args.ns for c in args.cos
                                        if cell_key(n, c) not in results["cells"]]
    if todo:  # something new is measured: the run's date, command and machine state
        results.update(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                       command=shlex.join(["scripts/kmv_planted_keys.py"] + (sys.argv[1:] if argv is None else argv)),
                       torch=torch.__version__, threads=torch.get_num_threads(),
                       loadavg_1min=round(os.getloadavg()[0], 2))
    for n, c in tqdm(todo, desc="cells (N, c)"):
        results["cells"][cell_key(n, c)] = measure_cell(n, c, setting, args.seeds)
        write_json(path, results)
    write_report(results, args.out)
    print(open(os.path.join(args.out, "results.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
