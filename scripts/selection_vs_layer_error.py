"""Why do `hyper` and `sparse_hyper` prefer different layers? (The layer-selection test.) No new model run: this
script joins two committed results.

- Per-layer attention error on real SmolLM2 activations (eval/results/smollm2_layer_error/results.json, made by
  scripts/smollm2_layer_error.py: one article, 4096 tokens, causal, method code of 2026-11-22 with 64 sink keys as
  now): relative Frobenius error ||out - exact||_F / ||exact||_F of "hyper +64 sinks" and "sparse_hyper (theory)
  +64 sinks" (sparse_hyper's default scale) for each of the 30 layers, and each layer's sink mass (the mean softmax
  mass of a row on its first 64 keys).
- The selection cells of the model benchmarks at 2k / 4k / 8k tokens (eval/results/model_bench_{2k,4k,grid}/
  results.jsonl, made by eval/experiments/model_bench_{2k,4k,grid}.toml): for each finished cell, the layers it patched and its
  perplexity change against the exact model of its run.

For each cell the *error sum* is the sum of the per-layer errors of the layers it patched (the method's own error
column). If a method's perplexity cost comes from its per-layer attention error, the selections should rank by error
sum the way they rank by perplexity change. Reported per (method, tokens, layer count) group with at least four
selections: Spearman's rank correlation between error sum and perplexity change, and which selection has the lowest
of each. Also the mean error of each method in the layers whose rows put little mass on the sink keys (sink mass
< 0.2, the "denser" layers) and in the others: the reason the README gives for hyper's reversed order (its sampled
residual covers the dense layers that sparse_hyper's blocks miss) predicts a much larger gap in the first group.

Caveats: the per-layer errors are one article at 4096 tokens with min_seq_len 512; the benchmarks are 20 articles at
2k / 4k (min_seq_len 512, causal_min_seq_len 1024) and 8k (defaults); a layer's error also changes what later layers
see, which a sum ignores.

Machine: 2-core CPU VM, no GPU (this script reads JSON only; seconds). Date: 2026-11-30.

    hf-sparse-attn bench run eval/experiments/selection_vs_layer_error.toml   # writes eval/results/selection_vs_layer_error/
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from hf_sparse_attn.eval.bench import latest_cells, read_jsonl
from hf_sparse_attn.eval.sparsity import spearman

RESULTS = os.path.join("eval", "results")
OUT = os.path.join(RESULTS, "selection_vs_layer_error")
ERROR_COLUMNS = {"hyper": "hyper +64 sinks", "sparse_hyper": "sparse_hyper (theory) +64 sinks"}
BENCHES = {2048: "model_bench_2k", 4096: "model_bench_4k", 8192: "model_bench_grid"}
DENSE_SINK_MASS = 0.2  # layers whose rows put less than this mass on their first 64 keys


def main(keep_date: bool = False) -> None:
    """Write results.json, results.md and the plots into OUT; ``keep_date``: state the date stored in OUT's
    results.json (a rebuild) instead of today's."""
    with open(os.path.join(RESULTS, "smollm2_layer_error", "results.json"), encoding="utf-8") as f:
        layer_error = json.load(f)
    num_layers = len(layer_error["layers"])
    errors = {method: [layer_error["layers"][str(i)]["errors"][column] for i in range(num_layers)]
              for method, column in ERROR_COLUMNS.items()}
    sink_mass = [layer_error["layers"][str(i)]["sink_mass"]["64"] for i in range(num_layers)]
    dense = [i for i in range(num_layers) if sink_mass[i] < DENSE_SINK_MASS]
    other = [i for i in range(num_layers) if i not in dense]
    by_layer_group = {method: {"dense_layers_mean_error": float(np.mean([errors[method][i] for i in dense])),
                               "other_layers_mean_error": float(np.mean([errors[method][i] for i in other]))}
                      for method in ERROR_COLUMNS}

    groups: dict[tuple[str, int, int], list[dict]] = defaultdict(list)
    for tokens, directory in BENCHES.items():
        for cell in latest_cells(read_jsonl(os.path.join(RESULTS, directory, "results.jsonl"))).values():
            if cell["method"] not in ERROR_COLUMNS or cell["layers"] in (0, num_layers):
                continue
            groups[(cell["method"], tokens, cell["layers"])].append({
                "select": cell["select"], "seed": cell["seed"], "patched_layers": cell["patched_layers"],
                "error_sum": float(sum(errors[cell["method"]][i] for i in cell["patched_layers"])),
                "perplexity_change": 100.0 * (cell["perplexity"] / cell["baseline_perplexity"] - 1.0),
                "articles": cell["articles"]})
    compared = []
    for (method, tokens, layers), rows in sorted(groups.items()):
        if len(rows) < 4:
            continue
        rows.sort(key=lambda r: r["error_sum"])
        x = [r["error_sum"] for r in rows]
        y = [r["perplexity_change"] for r in rows]
        lowest_cost = min(rows, key=lambda r: r["perplexity_change"])
        compared.append({"method": method, "tokens": tokens, "layers": layers, "cells": rows,
                         "spearman": spearman(x, y)["rho"],
                         "lowest_error_sum": f"{rows[0]['select']} {rows[0]['seed']}",
                         "lowest_perplexity_change": f"{lowest_cost['select']} {lowest_cost['seed']}"})

    os.makedirs(OUT, exist_ok=True)
    date = datetime.date.today().isoformat()
    stored = os.path.join(OUT, "results.json")
    if keep_date and os.path.exists(stored):  # --report-only: the rebuilt report keeps the date of the one it rewrites
        date = json.load(open(stored, encoding="utf-8")).get("date", date)
    result = {"script": "scripts/selection_vs_layer_error.py", "date": date,
              "machine": "2-core CPU VM, no GPU (reads committed JSON only)",
              "layer_error_source": "eval/results/smollm2_layer_error/results.json",
              "error_columns": ERROR_COLUMNS, "dense_sink_mass_below": DENSE_SINK_MASS, "dense_layers": dense,
              "per_layer": {"errors": errors, "sink_mass_64": sink_mass}, "by_layer_group": by_layer_group,
              "groups": compared}
    with open(os.path.join(OUT, "results.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    write_plots(errors, sink_mass, compared)
    write_markdown(result)


def label(row: dict) -> str:
    return f"random {row['seed']}" if row["select"] == "random" else row["select"]


def write_plots(errors: dict[str, list[float]], sink_mass: list[float], compared: list[dict]) -> None:
    fig, ax = plt.subplots(figsize=(9, 3.6))
    layers = np.arange(len(sink_mass))
    for method, color in (("hyper", "tab:blue"), ("sparse_hyper", "tab:orange")):
        ax.plot(layers, errors[method], marker="o", color=color, label=f"{ERROR_COLUMNS[method]}: relative error")
    ax.plot(layers, sink_mass, ls="--", color="gray", label="sink mass (first 64 keys)")
    ax.set_xlabel("layer")
    ax.set_ylabel("relative error / mass")
    ax.set_title("SmolLM2, one article, 4096 tokens: per-layer error and sink mass")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "error_by_layer.png"), dpi=120)
    plt.close(fig)

    token_lengths = sorted({g["tokens"] for g in compared})
    fig, axes = plt.subplots(2, len(token_lengths), figsize=(4.2 * len(token_lengths), 7), squeeze=False)
    for row_index, method in enumerate(("sparse_hyper", "hyper")):
        for col, tokens in enumerate(token_lengths):
            ax = axes[row_index][col]
            for group, marker in zip([g for g in compared if g["method"] == method and g["tokens"] == tokens], "osD^"):
                x = [c["error_sum"] for c in group["cells"]]
                y = [c["perplexity_change"] for c in group["cells"]]
                ax.scatter(x, y, marker=marker, label=f"{group['layers']} layers (rho {group['spearman']:+.2f})")
                for c in group["cells"]:
                    ax.annotate(label(c), (c["error_sum"], c["perplexity_change"]), fontsize=6)
            ax.set_title(f"{method}, {tokens} tokens", fontsize=9)
            ax.set_xlabel("sum of per-layer errors of the patched layers", fontsize=8)
            ax.set_ylabel("perplexity change %", fontsize=8)
            if ax.has_data():
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "error_sum_vs_perplexity.png"), dpi=120)
    plt.close(fig)


def write_markdown(result: dict) -> None:
    g = result["by_layer_group"]
    lines = ["# Selections against per-layer attention error (hyper vs sparse_hyper)", "",
             f"Script: `{result['script']}`. Machine: {result['machine']}. Date: {result['date']}. Sources: "
             f"`{result['layer_error_source']}` (one article, 4096 tokens) and the selection cells of "
             "`model_bench_2k/`, `model_bench_4k/`, `model_bench_grid/` (20 articles each).", "",
             "![per-layer error](error_by_layer.png)", "",
             "![error sum vs perplexity](error_sum_vs_perplexity.png)", "",
             "## Per-layer error where rows put little mass on the sink keys", "",
             f"Layers with sink mass < {result['dense_sink_mass_below']} (first 64 keys): "
             f"{result['dense_layers']}.", "",
             "| method (error column) | mean error, those layers | mean error, other layers |", "|---|---|---|"]
    for method, column in result["error_columns"].items():
        lines.append(f"| {method} ({column}) | {g[method]['dense_layers_mean_error']:.3f} | "
                     f"{g[method]['other_layers_mean_error']:.3f} |")
    lines += ["", "Summary:"]
    for method in result["error_columns"]:
        ratio = g[method]["dense_layers_mean_error"] / g[method]["other_layers_mean_error"]
        rhos = ", ".join(f"{grp['tokens']} tokens / {grp['layers']} layers {grp['spearman']:+.2f}"
                         for grp in result["groups"] if grp["method"] == method)
        lines.append(f"- {method}: mean error in those layers {ratio:.2f}x its mean in the others; rank correlation "
                     f"of error sum and perplexity change: {rhos}.")
    lines += ["", "## Does the error sum of a selection order the selections as perplexity does?", "",
              "Error sum = the sum of the method's per-layer errors over the layers a cell patched. "
              "rho = Spearman's rank correlation between error sum and perplexity change over the selections of "
              "the group.", "",
              "| method | tokens | layers | selections | rho | lowest error sum | lowest perplexity change | "
              "cells (error sum -> perplexity change) |", "|---|---|---|---|---|---|---|---|"]
    for group in result["groups"]:
        cells = "; ".join(f"{label(c)} {c['error_sum']:.2f} -> {c['perplexity_change']:+.1f}%" for c in group["cells"])
        lines.append(f"| {group['method']} | {group['tokens']} | {group['layers']} | {len(group['cells'])} | "
                     f"{group['spearman']:+.2f} | {group['lowest_error_sum']} | {group['lowest_perplexity_change']} | "
                     f"{cells} |")
    with open(os.path.join(OUT, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=OUT, help="results directory")
    parser.add_argument("--results", default=RESULTS, help="the results directories it reads (eval/results)")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the report keeping the date stored in --out's results.json (this script only reads JSON)")
    args = parser.parse_args()
    OUT, RESULTS = args.out, args.results
    main(keep_date=args.report_only)
