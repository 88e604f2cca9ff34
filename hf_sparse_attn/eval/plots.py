"""Plots of the benchmarks (matplotlib, Agg backend, PNG next to the JSON they are drawn from)."""

from __future__ import annotations

import math
import os
from typing import Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str) -> str:
    """Lay out, write ``path`` as PNG (its folder created), close the figure; returns ``path``."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_demo(weight_norms: Sequence[float], patched_layers: Sequence[int], exact_losses: Sequence[float],
              patched_losses: Sequence[float], path: str, method: str, window: int = 512) -> str:
    """The demo's figure, two panels. Left: Q/K weight norm R per layer (bars), the patched layers highlighted.
    Right: the loss the patch adds, mean over each ``window``-token span of the text (patched minus exact, nats per
    token), against the token position: where in a long context the approximation costs; perplexities in the title.

    weight_norms [L]; exact_losses, patched_losses [N-1] natural-log losses of the same tokens."""
    if len(exact_losses) != len(patched_losses) or not exact_losses:
        raise ValueError(f"exact and patched losses must cover the same tokens: {len(exact_losses)} != {len(patched_losses)}")
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.0, 4.2), gridspec_kw={"width_ratios": [1, 1.3]})
    patched = set(patched_layers)
    left.bar(range(len(weight_norms)), weight_norms,
             color=["tab:red" if i in patched else "tab:gray" for i in range(len(weight_norms))])
    left.set_xlabel("layer")
    left.set_ylabel("Q/K weight norm R")
    left.set_title(f"{len(patched)} of {len(weight_norms)} layers patched with {method} (red)", fontsize=9)
    left.grid(alpha=0.3, axis="y")
    n = len(exact_losses)
    starts = list(range(0, n, window))
    gaps = [sum(p - e for p, e in zip(patched_losses[s:s + window], exact_losses[s:s + window])) / len(exact_losses[s:s + window])
            for s in starts]
    right.bar([s + min(window, n - s) / 2 for s in starts], gaps, width=0.8 * window,
              color=["tab:red" if g > 0 else "tab:green" for g in gaps])
    right.axhline(0.0, color="black", linewidth=0.8)
    ppl_exact, ppl_patched = (math.exp(sum(losses) / n) for losses in (exact_losses, patched_losses))
    right.set_xlabel(f"token position ({window}-token spans)")
    right.set_ylabel("loss added by the patch (nats / token)")
    right.set_title(f"perplexity {ppl_exact:.3f} exact -> {ppl_patched:.3f} patched ({100 * (ppl_patched / ppl_exact - 1):+.1f}%) "
                    f"over {n} tokens", fontsize=9)
    right.grid(alpha=0.3, axis="y")
    return _save(plt, fig, path)


def plot_perplexity_vs_speedup(rows: Sequence[dict], tokens: int, path: str, title: str = "") -> str:
    """One panel per method: perplexity (y) against prefill speed-up over exact (x) at ``tokens`` tokens, one curve
    per selection (random seeds: one marker each, joined by their mean), the exact baseline as a star at (1, ppl).

    rows: :func:`hf_sparse_attn.eval.bench.summarize` rows (keys method, tokens, layers, select, seed,
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
        ppls = [r["perplexity"] for r in mine + baseline]
        if max(ppls) > 10 * min(ppls):  # a method that breaks the model: keep the exact point readable
            ax.set_yscale("log")
            ax.set_ylabel("perplexity (exp mean NLL, log scale)")
        ax.set_title(f"{method}, {tokens} tokens (labels: layers replaced)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def plot_selection_articles(group: dict, path: str) -> str:
    """Heatmap of one :func:`hf_sparse_attn.eval.bench.selection_comparison` group: rows = layer selections
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
    return _save(plt, fig, path)


def plot_selections_vs_layers(overview: dict, path: str) -> str:
    """Perplexity change against exact (y, %) by number of layers replaced (x), one curve per layer selection: one
    :func:`hf_sparse_attn.eval.bench.selections_by_layer_count` entry (random: the mean over its seeds).
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
    return _save(plt, fig, path)


def plot_kernel_time_vs_n(cells: Sequence[dict], path: str, title: str = "") -> str:
    """Log-log time against N, one panel per (causal, dtype), one line per method plus SDPA.

    cells: :func:`hf_sparse_attn.eval.bench.kernel_suite.bench_on_inputs` results (all of one input kind)."""
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
    return _save(plt, fig, path)
