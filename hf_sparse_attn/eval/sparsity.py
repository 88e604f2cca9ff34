"""Seed 002's claim, measured: k-sparsity of attention rows per layer and head, next to the weight norm R.

Definition (seed 002, Definitions 3.4-3.5; the extracted formulas are lost, reconstructed here). A row of the
softmax attention matrix, p_i = softmax(s q_i K^T) over the keys query i may attend to, is (k, eps)-sparse when
its k largest entries hold at least 1 - eps of the mass:

    sum of the k largest p_ij  >=  1 - eps

and the probability of (k, eps)-sparsity is the share of rows that are. Seed 002 Theorem 4.7 says this
probability grows with the layer's weight norm R = ||W_Q W_K^T|| (:func:`hf_sparse_attn.rank_layers`), which is
why ``patch_model`` approximates the largest-R layers first. Here we measure the probability on real text and
report the Spearman rank correlation between R and the measured sparsity, over layers (and over all heads).

Conventions. Rows are the unpadded query positions of each sequence. A row with at most k keys (early rows of a
causal decoder, or a sequence shorter than k + 1 tokens) is trivially k-sparse and is *not counted* for that k:
the reported probability is over rows that have more than k keys. Besides the probability we keep the mean
top-k mass per head (a continuous score, useful when probabilities saturate at 0 or 1).

Memory: scores are formed for ``row_chunk`` query rows at a time ([H, row_chunk, N]), so long sequences never
need an H x N x N tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from hf_sparse_attn.methods.common import expand_kv_heads

DEFAULT_KS = (1, 4, 16, 64)
DEFAULT_EPSILONS = (0.1, 0.25, 0.5)


def row_topk_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    *,
    causal: bool,
    ks: Sequence[int] = DEFAULT_KS,
    max_block_entries: int = 1 << 23,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax mass of the k largest entries of every attention row, for each k in ``ks``.

    q [H, N, D], k [H, N, D] (one sequence, padding removed, GQA expanded). Returns
    mass [H, N, len(ks)] float32 (row i, the top-k mass of softmax(scale q_i K^T) over its keys; 1 when the row
    has <= k keys) and keys_per_row [N] int64 (N, or i + 1 when causal).
    """
    if q.dim() != 3 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [H, N, D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    H, N, _ = q.shape
    q32, k32 = q.float(), k.float()
    k_max = min(max(ks), N)
    row_chunk = max(1, max_block_entries // max(1, H * N))
    masses = []
    for start in range(0, N, row_chunk):
        stop = min(N, start + row_chunk)
        scores = torch.matmul(q32[:, start:stop], k32.transpose(-1, -2)).mul_(scale)  # [H, r, N]
        if causal:
            rows = torch.arange(start, stop, device=q.device)[:, None]
            cols = torch.arange(N, device=q.device)[None, :]
            scores.masked_fill_(cols > rows, -math.inf)
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        top = torch.exp(scores.topk(k_max, dim=-1).values - lse)  # [H, r, k_max] (0 for masked)
        cumulative = top.cumsum(-1)
        cols = [cumulative[..., min(kk, k_max) - 1] for kk in ks]
        masses.append(torch.stack(cols, dim=-1))
    keys_per_row = torch.arange(1, N + 1) if causal else torch.full((N,), N, dtype=torch.int64)
    return torch.cat(masses, dim=1).clamp_max_(1.0), keys_per_row


def capture_qk(capture, batch_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [H, n, D] of one sequence of a ``CapturedAttention`` record: padding removed, KV heads expanded."""
    q, k = capture.query[batch_index : batch_index + 1], capture.key[batch_index : batch_index + 1]
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"sparsity needs self-attention with Nq == Nk; got {q.shape[2]} and {k.shape[2]}")
    if getattr(capture, "attend_mask", None) is not None:
        raise ValueError("this layer's mask is neither causal nor key padding; the sparsity audit supports only those")
    H, Hkv = q.shape[1], k.shape[1]
    k = expand_kv_heads(k, H // Hkv)[0]
    q = q[0]
    mask = getattr(capture, "key_padding_mask", None)
    if mask is not None:
        keep = mask[batch_index].to(torch.bool)
        q, k = q[:, keep], k[:, keep]
    return q.detach(), k.detach()


@dataclass
class SparsityCounts:
    """Counts for one layer over many sequences. eligible [H, K]: rows with more than k keys; sparse [H, K, E]:
    of those, rows whose top-k mass >= 1 - eps; mass_sum [H, K]: summed top-k mass of the eligible rows."""

    ks: tuple[int, ...]
    epsilons: tuple[float, ...]
    num_heads: int
    eligible: np.ndarray = field(init=False)
    sparse: np.ndarray = field(init=False)
    mass_sum: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.eligible = np.zeros((self.num_heads, len(self.ks)), dtype=np.int64)
        self.sparse = np.zeros((self.num_heads, len(self.ks), len(self.epsilons)), dtype=np.int64)
        self.mass_sum = np.zeros((self.num_heads, len(self.ks)), dtype=np.float64)

    def add(self, mass: torch.Tensor, keys_per_row: torch.Tensor) -> None:
        """mass [H, N, K] and keys_per_row [N] from :func:`row_topk_mass`."""
        for ki, kk in enumerate(self.ks):
            rows = keys_per_row > kk  # [N]
            if not bool(rows.any()):
                continue
            m = mass[:, rows, ki].double()  # [H, n_eligible]
            self.eligible[:, ki] += int(rows.sum())
            self.mass_sum[:, ki] += m.sum(-1).numpy()
            for ei, eps in enumerate(self.epsilons):
                self.sparse[:, ki, ei] += (m >= 1.0 - eps).sum(-1).numpy()

    def head_probability(self) -> np.ndarray:
        """[H, K, E] probability that a row is (k, eps)-sparse (nan where no row has more than k keys)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sparse / self.eligible[:, :, None]

    def layer_probability(self) -> np.ndarray:
        """[K, E] pooled over heads."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.sparse.sum(0) / self.eligible.sum(0)[:, None]

    def head_mean_mass(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.mass_sum / self.eligible

    def layer_mean_mass(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.mass_sum.sum(0) / self.eligible.sum(0)


# ---------------------------------------------------------------------------------------------------------
# Running a model
# ---------------------------------------------------------------------------------------------------------

def model_forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> None:
    """One forward pass for the attention only: the base model (no LM head: 8k tokens x 49k vocab of logits would
    cost gigabytes), no gradients, no cache."""
    base = getattr(model, "base_model", model)
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    with torch.no_grad():
        base(**kwargs)


def _calibration_batches(calibration_inputs: Any) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Normalize calibration inputs: input_ids [B, N] or [N] tensor, a dict / BatchEncoding with input_ids (and
    attention_mask), or a list of those -> list of (input_ids [B, N], attention_mask [B, N] or None)."""
    if isinstance(calibration_inputs, (list, tuple)):
        if calibration_inputs and all(isinstance(x, int) for x in calibration_inputs):
            return [(torch.tensor([list(calibration_inputs)]), None)]
        out = []
        for item in calibration_inputs:
            out.extend(_calibration_batches(item))
        return out
    if isinstance(calibration_inputs, torch.Tensor):
        ids = calibration_inputs if calibration_inputs.dim() == 2 else calibration_inputs.reshape(1, -1)
        return [(ids.long(), None)]
    if hasattr(calibration_inputs, "keys") and "input_ids" in calibration_inputs:
        ids = torch.as_tensor(calibration_inputs["input_ids"])
        mask = calibration_inputs.get("attention_mask")
        ids = ids if ids.dim() == 2 else ids.reshape(1, -1)
        mask = None if mask is None else torch.as_tensor(mask).reshape(ids.shape)
        return [(ids.long(), mask)]
    raise TypeError("calibration inputs must be input_ids (a [B, N] tensor), a tokenizer output with input_ids, or a "
                    f"list of those; got {type(calibration_inputs).__name__}")


def measure_sparsity(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, Optional[torch.Tensor]]],
    ks: Sequence[int] = DEFAULT_KS,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    counts: Optional[dict[int, SparsityCounts]] = None,
    max_block_entries: int = 1 << 23,
) -> dict[int, SparsityCounts]:
    """Run ``model`` on each (input_ids [B, N], attention_mask or None) and count (k, eps)-sparse rows per layer.

    Returns layer_idx -> :class:`SparsityCounts` (adding to ``counts`` when given, so callers can resume)."""
    from hf_sparse_attn.patches import capture_attention

    counts = {} if counts is None else counts
    for input_ids, attention_mask in batches:
        with capture_attention(model) as captured:
            model_forward(model, input_ids, attention_mask)
        for layer_idx in sorted(captured):
            for capture in captured[layer_idx]:
                for b in range(capture.query.shape[0]):
                    q, k = capture_qk(capture, b)
                    mass, keys_per_row = row_topk_mass(q, k, capture.scale, causal=capture.causal, ks=ks,
                                                       max_block_entries=max_block_entries)
                    if layer_idx not in counts:
                        counts[layer_idx] = SparsityCounts(tuple(ks), tuple(epsilons), q.shape[0])
                    counts[layer_idx].add(mass, keys_per_row)
            captured[layer_idx].clear()  # free this layer's q/k/v before the next
    return counts


def measured_sparsity_scores(model: torch.nn.Module, calibration_inputs: Any, k: int = 16, eps: float = 0.1) -> list[float]:
    """Per layer (index order), the share of attention rows that are (k, eps)-sparse on ``calibration_inputs``.

    The score ``select="measured"`` ranks layers by (higher = sparser = approximated first). calibration_inputs:
    input_ids [B, N] (or [N]), a tokenizer output with input_ids / attention_mask, or a list of those; use real text
    with more than k tokens per sequence. Rows with at most k keys are not counted (see the module docstring). Ties
    between layers (e.g. all 1.0) are broken by the mean top-k mass, added as a fraction below 1e-6.
    A layer without any row of more than k keys gets 0.
    """
    if k < 1 or not 0.0 <= eps < 1.0:
        raise ValueError(f"need k >= 1 and 0 <= eps < 1; got k={k}, eps={eps}")
    from hf_sparse_attn.patches import find_adapter

    num_layers = len(find_adapter(model).attention_layers(model))
    counts = measure_sparsity(model, _calibration_batches(calibration_inputs), ks=(k,), epsilons=(eps,))
    scores = []
    for layer_idx in range(num_layers):
        c = counts.get(layer_idx)
        if c is None or int(c.eligible.sum()) == 0:
            scores.append(0.0)
            continue
        probability = float(c.layer_probability()[0, 0])
        mean_mass = float(c.layer_mean_mass()[0])
        scores.append(probability + 1e-6 * mean_mass)
    return scores


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
    fig.suptitle(f"{title}: k-sparsity per layer vs weight norm R (seed 002)", fontsize=9)
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
