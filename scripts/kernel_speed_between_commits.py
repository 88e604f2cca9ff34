"""Kernel speed of the methods at two commits of the package, in one run: is a refactor's speed within noise?

    taskset -c 0 python scripts/kernel_speed_between_commits.py --before 6938e01 --after HEAD \
        --out eval/results/house_kernel_speed

Each commit is checked out into a temporary git worktree. For every round and method, one subprocess per commit
(alternating which goes first) imports the package from that worktree, builds the same random q/k/v (seeded), and
times the method and torch's SDPA on them, alternating, ``--repeats`` times each (one torch thread). The figure of a
commit is the median over rounds of (method median / SDPA median), so machine drift cancels within a subprocess;
the result is after / before (1.00 = unchanged), with the spread over rounds. Writes results.json and results.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile

METHODS = ("local", "block_select", "sparse_hyper", "hyper")

CHILD = r"""
import json, statistics, sys, time
import torch
torch.set_num_threads(1)
import hf_sparse_attn
from hf_sparse_attn.methods import get_method
method, n, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 9, n, 64, generator=g) for _ in range(3))
fn = get_method(method)
def run_method():
    return fn(q, k, v, causal=True, scale=64 ** -0.5, generator=torch.Generator().manual_seed(1))
def run_sdpa():
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
run_method(); run_sdpa()
tm, ts = [], []
for _ in range(repeats):
    t = time.perf_counter(); run_method(); tm.append(time.perf_counter() - t)
    t = time.perf_counter(); run_sdpa(); ts.append(time.perf_counter() - t)
print(json.dumps({"method_s": statistics.median(tm), "sdpa_s": statistics.median(ts), "file": hf_sparse_attn.__file__}))
"""


def worktree(commit: str, root: str) -> str:
    path = tempfile.mkdtemp(prefix="hf_sparse_attn_")
    subprocess.run(["git", "-C", root, "worktree", "add", "--detach", path, commit], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path


def measure(path: str, method: str, n: int, repeats: int) -> dict:
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(n), str(repeats)], env=env, cwd=path,
                         check=True, capture_output=True, text=True).stdout
    record = json.loads(out.strip().splitlines()[-1])
    if not record["file"].startswith(path):
        raise RuntimeError(f"imported {record['file']}, not the worktree {path}")
    return record


def write_report(out: str) -> None:
    """results.md from results.json (what --report-only rebuilds)."""
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        saved = json.load(f)
    meta, rows, commits = saved["meta"], saved["rows"], saved["meta"]["commits"]
    lines = ["# Kernel speed before and after a refactor", "",
             f"Written by `scripts/kernel_speed_between_commits.py` on {meta['date']}; machine: {meta['machine']}. "
             f"Command: `{meta['command']}`.", "",
             f"Commits: before `{commits['before']}`, after `{commits['after']}`. Random q/k/v [1, 9, {meta['tokens']}, "
             "64] fp32, causal, default parameters. Per round and commit, one subprocess times the method and SDPA "
             f"alternately ({meta['repeats']} repeats, median); its figure is method time / SDPA time. Rounds "
             "alternate which commit goes first. 'after / before' = median after / median before (1.00: unchanged); "
             "the ranges are min-max over rounds.", "",
             "| method | before (x SDPA time) | after (x SDPA time) | after / before |", "|---|---|---|---|"]
    for row in rows:
        b, a = row["before_rel_sdpa"], row["after_rel_sdpa"]
        lines.append(f"| {row['method']} | {statistics.median(b):.3f} [{min(b):.3f}, {max(b):.3f}] | "
                     f"{statistics.median(a):.3f} [{min(a):.3f}, {max(a):.3f}] | {row['ratio_after_over_before']:.3f} |")
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before")
    parser.add_argument("--after", default="HEAD")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--report-only", action="store_true", help="rewrite results.md from results.json")
    args = parser.parse_args(argv)
    if args.report_only:
        write_report(args.out)
        return 0
    if not args.before:
        parser.error("--before is required (except with --report-only)")
    root = subprocess.run(["git", "rev-parse", "--show-toplevel"], check=True, capture_output=True,
                          text=True).stdout.strip()
    commits = {side: subprocess.run(["git", "-C", root, "rev-parse", "--short", ref], check=True, capture_output=True,
                                    text=True).stdout.strip() for side, ref in (("before", args.before),
                                                                                ("after", args.after))}
    trees = {side: worktree(commit, root) for side, commit in commits.items()}
    rows = []
    try:
        for method in [m for m in args.methods.split(",") if m]:
            rel: dict[str, list[float]] = {"before": [], "after": []}
            for r in range(args.rounds):
                for side in (("before", "after") if r % 2 == 0 else ("after", "before")):
                    rec = measure(trees[side], method, args.tokens, args.repeats)
                    rel[side].append(rec["method_s"] / rec["sdpa_s"])
            before, after = statistics.median(rel["before"]), statistics.median(rel["after"])
            rows.append({"method": method, "tokens": args.tokens, "before_rel_sdpa": rel["before"],
                         "after_rel_sdpa": rel["after"], "ratio_after_over_before": after / before})
            print(f"{method}: before {before:.3f} x SDPA time, after {after:.3f}, after/before {after / before:.3f}",
                  flush=True)
    finally:
        for path in trees.values():
            subprocess.run(["git", "-C", root, "worktree", "remove", "--force", path], check=False)
    os.makedirs(args.out, exist_ok=True)
    meta = {"commits": commits, "command": " ".join(shlex.quote(a) for a in sys.argv),
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU; one torch thread",
            "python": platform.python_version(), "tokens": args.tokens, "repeats": args.repeats}
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    write_report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
