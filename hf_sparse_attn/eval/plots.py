"""Plots of the benchmarks (matplotlib, Agg backend, PNG next to the JSON they are drawn from)."""

from __future__ import annotations

import os
from typing import Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_perplexity_vs_speedup(rows: Sequence[dict], tokens: int, path: str, title: str = "") -> str:
    """One panel per method: perplexity (y) against prefill speed-up over exact (x) at ``tokens`` tokens, one curve
    per selection (random seeds: one marker each, joined by their mean), the exact baseline as a star at (1, ppl).

    rows: :func:`hf_sparse_attn.eval.model_bench.summarize` rows (keys method, tokens, layers, select, seed,
    perplexity, speedup)."""
    plt = _pyplot()
    rows = [r for r in rows if r["tokens"] == tokens and r.get("speedup") is not None]
    baseline = [r for r in rows if r["layers"] == 0]
    methods = sorted({r["method"] for r in rows if r["layers"] > 0})
    if not methods:
        raise ValueError(f"no patched cells at {tokens} tokens to plot")
    fig, axes = plt.subplots(1, len(methods), figsize=(5.5 * len(methods), 4.2), squeeze=False)
    for ax, method in zip(axes[0], methods):
        mine = [r for r in rows if r["method"] == method and r["layers"] > 0]
        for select in sorted({r["select"] for r in mine}):
            pts = [r for r in mine if r["select"] == select]
            if select == "random":
                by_layers: dict[int, list[dict]] = {}
                for r in pts:
                    by_layers.setdefault(r["layers"], []).append(r)
                ax.scatter([r["speedup"] for r in pts], [r["perplexity"] for r in pts], s=14, alpha=0.5, color="gray")
                xs = [sum(r["speedup"] for r in g) / len(g) for _, g in sorted(by_layers.items())]
                ys = [sum(r["perplexity"] for r in g) / len(g) for _, g in sorted(by_layers.items())]
                ax.plot(xs, ys, "o--", color="gray", label=f"random (mean of {max(len(g) for g in by_layers.values())} seeds)")
            else:
                pts.sort(key=lambda r: r["layers"])
                ax.plot([r["speedup"] for r in pts], [r["perplexity"] for r in pts], "o-", label=select)
                for r in pts:
                    ax.annotate(str(r["layers"]), (r["speedup"], r["perplexity"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for r in baseline:
            ax.plot([1.0], [r["perplexity"]], "k*", markersize=11, label="exact (0 layers)")
        ax.set_xlabel("prefill speed-up over exact (same run)")
        ax.set_ylabel("perplexity (exp mean NLL)")
        ax.set_title(f"{method}, {tokens} tokens (labels: layers replaced)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_selection_articles(group: dict, path: str) -> str:
    """Heatmap of one :func:`hf_sparse_attn.eval.model_bench.selection_comparison` group: rows = layer selections
    (random: one row per seed), columns = articles, colour and label = perplexity change against the exact model
    on that article (%)."""
    plt = _pyplot()
    rows = group["rows"]
    labels = [r["select"] + (f" (seed {r['seed']})" if r["select"] == "random" else "") for r in rows]
    values = [r["article_change_pct"] for r in rows]
    width = max(6.0, 0.9 * len(group["titles"]) + 2.5)
    fig, ax = plt.subplots(figsize=(width, 0.45 * len(rows) + 2.2))
    image = ax.imshow(values, cmap="Reds", aspect="auto", vmin=0.0)
    top = max((v for row in values for v in row), default=0.0)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:+.1f}", ha="center", va="center", fontsize=7, color="white" if v > 0.6 * top else "black")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.set_xticks(range(len(group["titles"])), [t[:18] for t in group["titles"]], rotation=40, ha="right", fontsize=7)
    fig.colorbar(image, ax=ax, label="perplexity change vs exact (%)")
    ax.set_title(f"{group['method']}, {group['layers']} layers replaced, {group['tokens']} tokens: change per article", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_selections_vs_layers(overview: dict, path: str) -> str:
    """Perplexity change against exact (y, %) by number of layers replaced (x), one curve per layer selection: one
    :func:`hf_sparse_attn.eval.model_bench.selections_by_layer_count` entry (random: the mean over its seeds).
    At equal layer count the work is equal, so the curves compare selections at equal speed-up."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    selects = []
    for select, _ in overview["cells"]:
        if select not in selects:
            selects.append(select)
    for select in selects:
        pts = sorted((layers, c) for (s, layers), c in overview["cells"].items() if s == select)
        seeds = max(c["seeds"] for _, c in pts)
        label = select + (f" (mean of {seeds} seeds)" if select == "random" else "")
        style = dict(color="gray", linestyle="--") if select == "random" else {}
        ax.plot([l for l, _ in pts], [c["ppl_change_pct"] for _, c in pts], marker="o", label=label, **style)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(overview["layers"])
    ax.set_xlabel("layers replaced (equal work at equal count)")
    ax.set_ylabel("perplexity change vs exact (%)")
    ax.set_title(f"{overview['method']}, {overview['tokens']} tokens: layer selections", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_kernel_time_vs_n(cells: Sequence[dict], path: str, title: str = "") -> str:
    """Log-log time against N, one panel per (causal, dtype), one line per method plus SDPA.

    cells: :func:`hf_sparse_attn.eval.kernel_suite.bench_on_inputs` results (all of one input kind)."""
    plt = _pyplot()
    panels = sorted({(c["causal"], c["dtype"]) for c in cells})
    if not panels:
        raise ValueError("no kernel cells to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (causal, dtype) in zip(axes[0], panels):
        mine = sorted([c for c in cells if c["causal"] == causal and c["dtype"] == dtype], key=lambda c: c["n"])
        ax.loglog([c["n"] for c in mine], [c["sdpa"]["time_s"] for c in mine], "k-o", label="torch SDPA")
        names = sorted({m for c in mine for m in c["methods"]})
        for name in names:
            pts = [(c["n"], c["methods"][name]["time_s"]) for c in mine if "time_s" in c["methods"].get(name, {})]
            if pts:
                ax.loglog([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel("time (s), median")
        ax.set_title(f"{'causal' if causal else 'bidirectional'}, {dtype}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
