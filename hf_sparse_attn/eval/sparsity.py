"""The weight-norm claim of "Attention is Naturally Sparse with Gaussian Distributed Input" (Theorem 4.7), audited:
k-sparsity of attention rows per layer and head on real text, next to the weight norm R, with the Spearman rank
correlation between them over layers (and over all heads), as JSON and plots.

The definitions and the measuring (:func:`measure_sparsity`, :class:`SparsityCounts`, :func:`row_topk_mass`) live in
:mod:`hf_sparse_attn.row_sparsity`, below the public API, since ``select="measured"`` uses them too.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

# The measuring itself lives below the public API (select="measured" uses it); re-exported here for the audit.
from hf_sparse_attn.row_sparsity import (  # noqa: F401
    DEFAULT_EPSILONS, DEFAULT_KS, SparsityCounts, capture_qk, measure_sparsity, measured_sparsity_scores, model_forward,
    row_topk_mass,
)


# ---------------------------------------------------------------------------------------------------------
# Results: JSON, Spearman against R, plots
# ---------------------------------------------------------------------------------------------------------

def _nan_to_none(a: np.ndarray) -> Any:
    if isinstance(a, np.ndarray):
        return [_nan_to_none(x) for x in a]
    return None if not math.isfinite(float(a)) else float(a)


def spearman(x: Sequence[float], y: Sequence[float]) -> dict:
    """Spearman rank correlation (scipy) over the finite pairs: {rho, p_value, n}."""
    from scipy.stats import spearmanr

    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3 or len({p[1] for p in pairs}) < 2 or len({p[0] for p in pairs}) < 2:
        return {"rho": None, "p_value": None, "n": len(pairs)}
    result = spearmanr([p[0] for p in pairs], [p[1] for p in pairs])
    rho, p_value = float(result.statistic), float(result.pvalue)
    return {"rho": rho if math.isfinite(rho) else None, "p_value": p_value if math.isfinite(p_value) else None, "n": len(pairs)}


def sparsity_result(counts: dict[int, SparsityCounts], weight_norms: Sequence[float],
                    head_weight_norms: Sequence[Sequence[float]]) -> dict:
    """JSON-able result: probabilities per layer (and head), R, and the Spearman correlations between them."""
    layers = sorted(counts)
    first = counts[layers[0]]
    ks, epsilons = list(first.ks), list(first.epsilons)
    layer_prob = np.stack([counts[i].layer_probability() for i in layers])  # [L, K, E]
    head_prob = np.stack([counts[i].head_probability() for i in layers])  # [L, H, K, E]
    layer_mass = np.stack([counts[i].layer_mean_mass() for i in layers])  # [L, K]
    head_mass = np.stack([counts[i].head_mean_mass() for i in layers])  # [L, H, K]
    R = [float(weight_norms[i]) for i in layers]
    R_heads = [float(r) for i in layers for r in head_weight_norms[i]]
    correlations = []
    for ki, kk in enumerate(ks):
        correlations.append({"k": kk, "eps": None, "score": "mean top-k mass",
                             "layers": spearman(R, layer_mass[:, ki].tolist()),
                             "heads": spearman(R_heads, head_mass[:, :, ki].reshape(-1).tolist())})
        for ei, eps in enumerate(epsilons):
            correlations.append({"k": kk, "eps": eps, "score": "P(row is (k, eps)-sparse)",
                                 "layers": spearman(R, layer_prob[:, ki, ei].tolist()),
                                 "heads": spearman(R_heads, head_prob[:, :, ki, ei].reshape(-1).tolist())})
    return {
        "ks": ks,
        "epsilons": epsilons,
        "layers": layers,
        "rows_counted": [[int(counts[i].eligible[:, ki].sum()) for ki in range(len(ks))] for i in layers],
        "weight_norm_R": R,
        "head_weight_norm_R": [list(map(float, head_weight_norms[i])) for i in layers],
        "layer_probability": _nan_to_none(layer_prob),  # [layer][k][eps]
        "head_probability": _nan_to_none(head_prob),  # [layer][head][k][eps]
        "layer_mean_topk_mass": _nan_to_none(layer_mass),  # [layer][k]
        "head_mean_topk_mass": _nan_to_none(head_mass),  # [layer][head][k]
        "spearman": correlations,
    }


def write_sparsity_plots(result: dict, out_dir: str, title: str) -> list[str]:
    """sparsity_vs_R.png (layer sparsity against R, one panel per k, a line per eps, rho in the legend) and
    sparsity_heads.png (layer x head heatmaps of P((k, eps)-sparse) for each k at the middle eps)."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks, epsilons, R = result["ks"], result["epsilons"], result["weight_norm_R"]
    rho = {(c["k"], c["eps"]): c["layers"]["rho"] for c in result["spearman"]}
    lp = np.array([[[np.nan if v is None else v for v in e] for e in k] for k in result["layer_probability"]], dtype=float)
    paths = []
    fig, axes = plt.subplots(1, len(ks), figsize=(4 * len(ks), 3.6), squeeze=False)
    for ki, kk in enumerate(ks):
        ax = axes[0, ki]
        for ei, eps in enumerate(epsilons):
            r = rho.get((kk, eps))
            ax.plot(R, lp[:, ki, ei], "o", label=f"eps={eps} (rho={'n/a' if r is None else format(r, '.2f')})")
        for layer, (x, yv) in enumerate(zip(R, lp[:, ki, 0])):
            ax.annotate(str(result["layers"][layer]), (x, yv), fontsize=6, alpha=0.6)
        ax.set_xlabel("weight norm R")
        ax.set_ylabel(f"P(row is ({kk}, eps)-sparse)")
        ax.set_title(f"k = {kk}", fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: k-sparsity per layer vs weight norm R (Attention is Naturally Sparse)", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, "sparsity_vs_R.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    hp = np.array([[[[np.nan if v is None else v for v in e] for e in k] for k in h] for h in result["head_probability"]], dtype=float)
    mid = len(epsilons) // 2
    fig, axes = plt.subplots(1, len(ks), figsize=(4 * len(ks), max(3.0, 0.16 * hp.shape[0] + 2)), squeeze=False)
    for ki, kk in enumerate(ks):
        ax = axes[0, ki]
        image = ax.imshow(np.ma.masked_invalid(hp[:, :, ki, mid]), aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"P(({kk}, {epsilons[mid]})-sparse)", fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.suptitle(f"{title}: per-head k-sparsity", fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, "sparsity_heads.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths


def sparsity_summary(result: dict) -> str:
    """One screen: per layer R and P(sparse) for each k at the middle eps, and the Spearman correlations."""
    ks, epsilons = result["ks"], result["epsilons"]
    mid = len(epsilons) // 2
    lines = [f"sparsity: {result.get('model', '?')} on {result.get('corpus', '?')}, {result.get('sequences', '?')} sequences; "
             f"P(row is (k, {epsilons[mid]})-sparse) per layer"]
    lines.append(f"{'layer':>5} {'R':>9} " + " ".join(f"{'k=' + str(kk):>8}" for kk in ks))
    for li, layer in enumerate(result["layers"]):
        probs = [result["layer_probability"][li][ki][mid] for ki in range(len(ks))]
        lines.append(f"{layer:>5} {result['weight_norm_R'][li]:>9.4g} " + " ".join(
            f"{'n/a' if p is None else format(p, '.3f'):>8}" for p in probs))
        if len(lines) > 34:
            lines.append("  ... (see sparsity.json)")
            break
    lines.append("Spearman rho between R and sparsity (layers | heads):")
    for c in result["spearman"]:
        if c["eps"] not in (None, epsilons[mid]):
            continue  # the others are in sparsity.json
        label = f"k={c['k']}, " + ("mean top-k mass" if c["eps"] is None else f"eps={c['eps']}")
        fmt = lambda r: "n/a" if r is None else f"{r:+.2f}"  # noqa: E731
        lines.append(f"  {label:<24} {fmt(c['layers']['rho'])} (p={c['layers']['p_value'] if c['layers']['p_value'] is None else format(c['layers']['p_value'], '.2g')})"
                     f" | {fmt(c['heads']['rho'])}")
    return "\n".join(lines)
