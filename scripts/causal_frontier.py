"""Perplexity change against prefill speed-up at 8k on SmolLM2-135M, weight_norm layers: frontier_8192.png and
frontier.md in --out (eval/results/model_bench_causal), one point per cell of that directory's results.json (each
against the exact model of its own run) and, for reference, the recursive-mode hyper / sparse_hyper cells of
eval/results/model_bench_grid and the local cells at other windows (eval/results/model_bench_local_w512, _w256),
each from another run with its own exact baseline. The calibrated plans (eval/results/calibrate_smollm2*) are drawn
as stars: they are scored on the 16 held-out articles of the 20 (the first 4 calibrate), so their points sit on
that subset's frontier (the calibration reports redraw every fixed plan on the same 16).

The report step of eval/experiments/model_bench_causal.toml (`hf-sparse-attn bench run` runs it after the cells and
with --report-only); it reads JSON only.

    python scripts/causal_frontier.py --out eval/results/model_bench_causal
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def rows(path: str, label: str) -> list[dict]:
    """The 8192-token weight_norm cells at 15 and 30 layers of one results.json, tagged with ``label``."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return [dict(r, source=label) for r in data["rows"] if r["tokens"] == 8192 and r["layers"] in (15, 30)
            and r["select"] == "weight_norm"]


def calibrated_rows(path: str) -> list[dict]:
    """The calibrated plans with a held-out check in one calibration report (results.json of
    scripts/calibrate_smollm2.py): [{budget, search, layers, heldout_change_pct, heldout_speedup, articles}]."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    search = data["meta"].get("search", "prefix")
    return [{"budget": r["budget"], "search": search, "layers": r["patched_layers"],
             "heldout_change_pct": 100 * r["heldout_change"], "heldout_speedup": r["heldout_speedup"],
             "articles": r["heldout_articles"]} for r in data["budgets"] if r.get("heldout_speedup") is not None]


def frontier(out: str, grid: str, extra: list[str], calibrated: list[str]) -> None:
    points = rows(os.path.join(out, "results.json"), "this run")
    if os.path.exists(grid):
        points += [r for r in rows(grid, "8k grid, causal_mode=recursive") if r["method"] in ("hyper", "sparse_hyper")]
    for path in extra:
        if os.path.exists(path):
            points += rows(path, os.path.basename(os.path.dirname(path)))
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter([1.0], [0.0], marker="*", s=150, color="black", label="exact")
    lines = ["| source | method | layers | articles | perplexity change | prefill speed-up | params |", "|---|---|---|---|---|---|---|"]
    for r in points:
        if r["method"] in ("hyper", "sparse_hyper"):
            name = f"{r['method']} {r['params'].get('causal_mode', 'recursive')}"
        elif r["method"] == "kmv":
            name = f"kmv {r['params'].get('engine', 'blocks')} eps {r['params'].get('eps')}"
        elif r["method"] == "local" and "window" in r["params"]:
            name = f"local w{r['params']['window']}"
        else:
            name = r["method"]
        marker = {"local": "s", "kmv": "D"}.get(r["method"], "o" if r["source"] == "this run" else "^")
        ax.scatter(r["speedup"], r["ppl_change_pct"], marker=marker)
        ax.annotate(f"{name} {r['layers']}L ({r['articles']} art.)", (r["speedup"], r["ppl_change_pct"]), fontsize=7)
        lines.append(f"| {r['source']} | {name} | {r['layers']} | {r['articles']} | {r['ppl_change_pct']:+.1f}% | "
                     f"{r['speedup']:.2f}x | {json.dumps(r['params'], sort_keys=True)} |")
    cal_lines = []
    for path in calibrated:
        if not os.path.exists(path):
            continue
        for c in calibrated_rows(path):
            name = f"calibrated {100 * c['budget']:g}% ({c['search']})"
            ax.scatter(c["heldout_speedup"], c["heldout_change_pct"], marker="*", s=120, color="tab:red")
            ax.annotate(f"{name}, {c['layers']}L", (c["heldout_speedup"], c["heldout_change_pct"]), fontsize=7,
                        color="tab:red")
            cal_lines.append(f"| {os.path.basename(os.path.dirname(path))} | {name} | {c['layers']} | {c['articles']} "
                             f"(held out) | {c['heldout_change_pct']:+.1f}% | {c['heldout_speedup']:.2f}x |")
    ax.set_xlabel("prefill speed-up over exact (same run)")
    ax.set_ylabel("perplexity change vs exact, %")
    ax.set_title("SmolLM2-135M, 8192 tokens, weight_norm layers (squares: local; diamonds: kmv; triangles: earlier\n"
                 "grid run; red stars: calibrated plans, on the 16 held-out articles)")
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "frontier_8192.png"), dpi=110)
    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        result = json.load(f)
    with open(os.path.join(out, "frontier.md"), "w", encoding="utf-8") as f:
        f.write("# Perplexity change against prefill speed-up at 8k (SmolLM2-135M, weight_norm layers)\n\n"
                "Written by `scripts/causal_frontier.py` (the report step of eval/experiments/model_bench_causal.toml) "
                "from results.json of this folder and of eval/results/model_bench_grid (recursive mode, an earlier run "
                f"with its own exact baseline). Machine of the cells: {result.get('machine', 'see results.md')}.\n\n"
                + "\n".join(lines) + "\n")
        if cal_lines:
            f.write("\nCalibrated plans (scripts/calibrate_smollm2.py), scored on the 16 held-out articles of these 20, "
                    "each against the exact model timed in the calibration's own run:\n\n"
                    "| source | plan | layers | articles | perplexity change | prefill speed-up |\n"
                    "|---|---|---|---|---|---|\n" + "\n".join(cal_lines) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("eval", "results", "model_bench_causal"))
    parser.add_argument("--grid", default=os.path.join("eval", "results", "model_bench_grid", "results.json"),
                        help="results.json of the recursive-mode 8k grid")
    parser.add_argument("--extra", nargs="*", metavar="JSON",
                        default=[os.path.join("eval", "results", f"model_bench_local_w{w}", "results.json") for w in (512, 256)],
                        help="more model-benchmark results.json to draw (default: local at windows 512 and 256)")
    parser.add_argument("--calibrated", nargs="*", metavar="JSON",
                        default=[os.path.join("eval", "results", d, "results.json")
                                 for d in ("calibrate_smollm2", "calibrate_smollm2_windows")],
                        help="calibration reports whose plans to draw (default: both SmolLM2 calibrations)")
    args = parser.parse_args()
    frontier(args.out, args.grid, args.extra, args.calibrated)
