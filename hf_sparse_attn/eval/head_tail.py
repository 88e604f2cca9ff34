"""Indyk et al. §4 and A.1: head-to-tail ratio statistics of the Gaussian kernel matrices behind attention.

Setting (Indyk et al., §4, assumption (A)). For one sequence of n tokens, one layer and one head, take the queries
q_i and keys k_j exactly as the model attends with them (after RoPE) and apply the Lemma 4.1 reduction
(:func:`hf_sparse_attn.methods.gaussian_kernel.softmax_to_gaussian_kernel`, the code the ``kmv`` method uses):

    x_i = sqrt(s/2) [q_i, 0],  y_j = sqrt(s/2) [k_j, sqrt(M - ||k_j||^2)],  M = max_j ||k_j||^2
    K_ij = exp(-||x_i - y_j||^2) = exp(s <q_i, k_j>) / D_i,     log D_i = s (||q_i||^2 + M) / 2

With s = 1/sqrt(d) this is the paper's K_ij = exp(-||q'_i - k'_j||^2 / (2 sqrt d)).

Experiment (i). For every prefix length i in [min_prefix, n] let a_i be the sum of the i largest entries of the
principal sub-matrix K[:i, :i] and

    ratio_i = (||K[:i, :i]||_1 - a_i) / a_i            (tail over head)

The statistic of a sequence is max_i ratio_i; the audit reports, per layer x head, the max of that over all
sequences ("accumulated max ratio", Indyk et al. Figure 1/3; all <= 4.6 for BERT-base).

Experiment (ii). For the whole n x n matrix: K_(n) / K_(n+1) and K_(n) / K_(2n), where K_(r) is the r-th largest
entry; the median over sequences per layer x head (Indyk et al. Figure 2: ~1 and mostly <= 20). A ratio is infinite
when its denominator is 0. Here the order statistics are kept as log K (exact in float arithmetic, no underflow),
so a ratio is infinite only if it exceeds the float64 range; separately we count the sequences where the
denominator underflows to 0 in float32, which is what makes the paper's blank (infinite) cells.

A.1.3. For context lengths c = 50, 100, ... (every ``scaling_step``): per sequence with n >= c, the max of
ratio_c over all layers and heads; the mean and standard deviation over sequences, as a function of c.

Invariance used throughout. The ratios compare entries of one prefix matrix with each other, so a common factor
of all entries cancels. Replacing M (the max key norm of the whole sequence) by the max over the first i keys
multiplies every entry of K[:i, :i] by the same constant exp(s (M - M_i) / 2): the ratios of a prefix are the
same whether K is built from the prefix alone or from the whole sequence. We compute log K and shift it by a
running per-head maximum before exponentiating, which changes nothing in a ratio and avoids underflow.

Decoders (causal attention). A decoder attends only with j <= i; the entries above the diagonal are never
formed by the model. We define the statistics on the causal part: K[:i, :i] is replaced by its lower triangle
with the diagonal (i (i + 1) / 2 entries), a_i is the sum of its i largest entries, and the tail is the rest of
the lower triangle; experiment (ii) uses the n-th, (n+1)-th and 2n-th largest of the n (n + 1) / 2 causal
entries. A prefix of a decoder's causal matrix is exactly what the model sees on that prefix, so the scaling
curve of a decoder is the statistic of the model on shorter inputs.

Incremental computation (no re-sorting per prefix). Prefix boundaries b_0 = 0 < b_1 < ... < b_m = n are
visited in order; between b_{t-1} and b_t only the new "L-shaped" entries are formed (rows b_{t-1}:b_t against
columns :b_t, and rows :b_{t-1} against columns b_{t-1}:b_t; for decoders only the new rows, causally masked).
A running float64 sum gives ||K[:i, :i]||_1, and a candidate list keeps the top 2n values seen so far. Claim:
top_r(old + new) is contained in top_r(old) + new for every r, so a list holding top_{2n}(old) merged with the
new entries contains top_r of the current prefix for every r <= 2n; we keep its top 2n after each step, which
covers a_i for every later prefix (i <= n) and the 2n order statistics of experiment (ii). Each entry of K is
formed once, and the extra work per boundary is a top-k over 2n + (new entries) values. Memory is bounded by
``max_block_entries`` per call (rows are split further when an L-shape would be larger), so an 8k-token
sequence never needs an n x n tensor; the caller processes one layer (its heads together) at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from hf_sparse_attn.methods.common import expand_kv_heads
from hf_sparse_attn.methods.gaussian_kernel import softmax_to_gaussian_kernel


# ---------------------------------------------------------------------------------------------------------
# Kernel points and log-kernel blocks
# ---------------------------------------------------------------------------------------------------------

def kernel_points(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Lemma 4.1 points of one sequence: q [G, N, D], k [G, N, D] -> x [G, N, D+1], y [G, N, D+1] (float32 or float64).

    exp(scale * q_i.k_j) = D_i * exp(-||x_i - y_j||^2); the row factors D_i are dropped (see the module docstring).
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must be [G, N, D] with the same G and D; got {tuple(q.shape)} and {tuple(k.shape)}")
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    x, y, _ = softmax_to_gaussian_kernel(q.to(dtype), k.to(dtype), float(scale))
    return x, y


def log_kernel_block(x_rows: torch.Tensor, y_cols: torch.Tensor) -> torch.Tensor:
    """log K for a block: x_rows [G, R, D'], y_cols [G, C, D'] -> -||x_i - y_j||^2 as [G, R, C] (<= 0)."""
    sq = x_rows.pow(2).sum(-1, keepdim=True) + y_cols.pow(2).sum(-1).unsqueeze(-2) - 2.0 * (x_rows @ y_cols.transpose(-1, -2))
    return -sq.clamp_min(0)


# ---------------------------------------------------------------------------------------------------------
# One sequence: experiment (i) on every requested prefix, experiment (ii) on the whole matrix
# ---------------------------------------------------------------------------------------------------------

@dataclass
class SequenceHeadTail:
    """Statistics of one sequence for G heads (e.g. all heads of one layer).

    prefix_lengths [P]; ratios [G, P] float64 tail/head ratio of K[:i, :i] at each prefix length;
    ratio_n_n1 / ratio_n_2n [G] float64 (inf where the ratio exceeds float64 or the order statistic does not
    exist); float32_zero_n1 / float32_zero_2n [G] bool: K_(n+1) / K_(2n) is 0 in float32 (the paper's infinities).
    """

    n: int
    causal: bool
    prefix_lengths: list[int]
    ratios: torch.Tensor
    ratio_n_n1: torch.Tensor
    ratio_n_2n: torch.Tensor
    float32_zero_n1: torch.Tensor
    float32_zero_2n: torch.Tensor

    def max_ratio(self) -> Optional[torch.Tensor]:
        """[G] max over the prefixes of the tail/head ratio, or None when no prefix was evaluated."""
        return self.ratios.amax(-1) if self.ratios.shape[-1] else None


def prefix_grid(n: int, min_prefix: int = 50, prefix_step: int = 1, extra: Iterable[int] = ()) -> list[int]:
    """Prefix lengths of experiment (i) for a sequence of n tokens: min_prefix, min_prefix + step, ..., always n
    when n >= min_prefix, plus the ``extra`` lengths (e.g. the scaling curve's) that lie in [min_prefix, n]."""
    if min_prefix < 1 or prefix_step < 1:
        raise ValueError(f"min_prefix and prefix_step must be >= 1 (got {min_prefix}, {prefix_step})")
    if n < min_prefix:
        return []
    grid = set(range(min_prefix, n + 1, prefix_step)) | {n}
    grid |= {int(c) for c in extra if min_prefix <= int(c) <= n}
    return sorted(grid)


def head_tail_statistics(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    causal: bool,
    prefix_lengths: Sequence[int],
    max_block_entries: int = 1 << 24,
) -> SequenceHeadTail:
    """Experiments (i) and (ii) for one sequence, incrementally over the prefix boundaries.

    x, y [G, n, D'] Lemma 4.1 points (:func:`kernel_points`). ``prefix_lengths``: where to evaluate ratio_i
    (values outside [1, n] are an error). ``max_block_entries`` bounds G x (entries formed per step); larger
    steps are split into more boundaries (no ratio recorded there). Returns a :class:`SequenceHeadTail`.
    """
    if x.shape != y.shape or x.dim() != 3:
        raise ValueError(f"x and y must both be [G, n, D']; got {tuple(x.shape)} and {tuple(y.shape)}")
    G, n, _ = x.shape
    wanted = sorted(set(int(i) for i in prefix_lengths))
    if wanted and (wanted[0] < 1 or wanted[-1] > n):
        raise ValueError(f"prefix lengths must lie in [1, {n}]; got {wanted[0]}..{wanted[-1]}")
    device = x.device
    # Boundaries: the wanted prefixes, n, and extra cuts so that no step forms more than max_block_entries.
    rows_per_step = max(1, max_block_entries // max(1, G * 2 * n))
    boundaries = sorted(set(wanted) | {n} | set(range(rows_per_step, n, rows_per_step)))
    wanted_set = set(wanted)
    keep = 2 * n  # candidates: the top 2n log-kernel values seen so far (see the module docstring)

    # log K_ij = 2 x_i.y_j - ||x_i||^2 - ||y_j||^2: one bmm per block plus a per-row bias. By construction of the
    # reduction every ||y_j||^2 equals (s/2) M (the appended coordinate fills each key up to the max norm), so the
    # bias is a column [G, r, 1] and never a full block. Blocks are written into two reused buffers (fresh large
    # allocations cost page faults on every step).
    x2 = 2.0 * x
    row_bias = -(x.pow(2).sum(-1) + y.pow(2).sum(-1).mean(-1, keepdim=True))  # [G, n]
    y_t = y.transpose(-1, -2)  # [G, D', n]
    buffer_entries = G * rows_per_step * n
    block_buffer = torch.empty(buffer_entries, dtype=x.dtype, device=device)
    exp_buffer = torch.empty(buffer_entries, dtype=x.dtype, device=device)
    candidates = torch.empty(G, 0, dtype=x.dtype, device=device)
    total = torch.zeros(G, dtype=torch.float64, device=device)  # ||K[:i,:i]||_1 / exp(ref)
    ref = torch.full((G,), -math.inf, dtype=torch.float64, device=device)  # running max of log K

    def log_kernel(row_start: int, row_stop: int, col_start: int, col_stop: int) -> torch.Tensor:
        r, c = row_stop - row_start, col_stop - col_start
        out = block_buffer[: G * r * c].view(G, r, c)
        torch.bmm(x2[:, row_start:row_stop], y_t[:, :, col_start:col_stop], out=out)
        return out.add_(row_bias[:, row_start:row_stop, None])

    def absorb(block: torch.Tensor) -> None:
        """Fold a block of log K values [G, r, c] into the candidates and the running L1 sum (block is consumed)."""
        nonlocal candidates, total, ref
        if candidates.shape[1] < keep:  # still filling up: merge everything
            merged = torch.cat([candidates, block.reshape(G, -1)], dim=1)
            candidates = merged.topk(min(keep, merged.shape[1]), dim=1, sorted=True).values
        else:
            # Only entries above the current 2n-th largest value (tau) can enter the candidates, and only rows whose
            # maximum is above tau hold such entries (typically few rows: the cost is one pass for the row maxima).
            passing_rows = block.amax(-1) > candidates[:, -1:]  # [G, r]
            if bool(passing_rows.any()):
                tau = candidates[:, -1].tolist()
                picked = []
                for g in range(G):
                    values = block[g].index_select(0, passing_rows[g].nonzero().squeeze(1)).reshape(-1)
                    count = int((values > tau[g]).sum())  # exactly these can enter
                    picked.append(values.topk(min(count, keep), sorted=False).values)
                padded = torch.nn.utils.rnn.pad_sequence(picked, batch_first=True, padding_value=-math.inf)
                candidates = torch.cat([candidates, padded], dim=1).topk(keep, dim=1, sorted=True).values
        # The candidates hold the largest value seen so far: use it as the running shift.
        new_ref = torch.maximum(ref, candidates[:, 0].to(torch.float64))
        total = total * torch.exp(ref - new_ref).nan_to_num(nan=0.0)
        ref = new_ref
        block.sub_(ref[:, None, None].to(block.dtype))  # exponents <= 0 after the shift: no overflow
        exps = torch.exp(block, out=exp_buffer[: block.numel()].view(block.shape))
        # summed in the block's dtype (cascade summation, relative error ~1e-7 for float32), accumulated in float64
        total = total + exps.reshape(G, -1).sum(-1).to(torch.float64)

    ratios: list[torch.Tensor] = []
    prev = 0
    for stop in boundaries:
        rows = log_kernel(prev, stop, 0, stop)  # new rows prev:stop against columns :stop
        if causal:  # only the square rows prev:stop x cols prev:stop has entries above the diagonal
            upper = torch.arange(prev, stop, device=device)[None, :] > torch.arange(stop - prev, device=device)[:, None] + prev
            rows[:, :, prev:stop].masked_fill_(upper, -math.inf)
        absorb(rows)
        if not causal and prev > 0:  # old rows :prev against the new columns prev:stop
            absorb(log_kernel(0, prev, prev, stop))
        if stop in wanted_set:
            head = torch.exp(candidates[:, :stop].to(torch.float64) - ref[:, None]).sum(-1)
            ratios.append((total - head).clamp_min(0) / head)
        prev = stop

    ratio_tensor = torch.stack(ratios, dim=1) if ratios else torch.empty(G, 0, dtype=torch.float64, device=device)
    log_top = candidates.to(torch.float64)

    def order_stat(r: int) -> torch.Tensor:  # log of the r-th largest entry (1-based); -inf if it does not exist
        if r <= log_top.shape[1]:
            return log_top[:, r - 1]
        return torch.full((G,), -math.inf, dtype=torch.float64, device=device)

    l_n, l_n1, l_2n = order_stat(n), order_stat(n + 1), order_stat(2 * n)
    return SequenceHeadTail(
        n=n,
        causal=causal,
        prefix_lengths=wanted,
        ratios=ratio_tensor.cpu(),
        ratio_n_n1=torch.exp(l_n - l_n1).cpu(),
        ratio_n_2n=torch.exp(l_n - l_2n).cpu(),
        float32_zero_n1=(torch.exp(l_n1.float()) == 0).cpu(),
        float32_zero_2n=(torch.exp(l_2n.float()) == 0).cpu(),
    )


def head_tail_ratio_bruteforce(kernel: torch.Tensor, i: int, causal: bool = False) -> torch.Tensor:
    """Reference for tests: the tail/head ratio of K[:i, :i] straight from the definition.

    kernel [G, n, n] (materialized K); returns [G] float64. For causal, only the lower triangle (with diagonal)."""
    sub = kernel[:, :i, :i].to(torch.float64)
    if causal:
        sub = sub.masked_fill(torch.ones(i, i, dtype=torch.bool, device=sub.device).triu(1), 0.0)
    flat = sub.reshape(sub.shape[0], -1)
    head = flat.topk(i, dim=1).values.sum(-1)
    return (flat.sum(-1) - head) / head


# ---------------------------------------------------------------------------------------------------------
# From captured attention to per-layer statistics
# ---------------------------------------------------------------------------------------------------------

def sequence_points(capture, batch_index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel points of one sequence of a ``CapturedAttention`` record: x, y [H, n, D+1] over the unpadded tokens.

    capture.query [B, H, Nq, D], capture.key [B, Hkv, Nk, D] (GQA keys are expanded to the query heads),
    capture.key_padding_mask [B, Nk] bool or None. Self-attention only (Nq == Nk)."""
    q, k = capture.query[batch_index : batch_index + 1], capture.key[batch_index : batch_index + 1]
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"head-to-tail statistics need self-attention with Nq == Nk; got {q.shape[2]} and {k.shape[2]}")
    H, Hkv = q.shape[1], k.shape[1]
    if H % Hkv:
        raise ValueError(f"{H} query heads are not a multiple of {Hkv} key heads")
    k = expand_kv_heads(k, H // Hkv)
    q, k = q[0], k[0]
    mask = getattr(capture, "key_padding_mask", None)
    if mask is not None:
        keep = mask[batch_index].to(torch.bool)
        q, k = q[:, keep], k[:, keep]
    return kernel_points(q.detach(), k.detach(), float(capture.scale))


def scaling_lengths(max_length: int, step: int = 50, start: int = 50) -> list[int]:
    """Context lengths of the A.1.3 curve: start, start + step, ... <= max_length (50..500 for BERT)."""
    return list(range(start, max_length + 1, step))


# ---------------------------------------------------------------------------------------------------------
# Aggregation over sequences
# ---------------------------------------------------------------------------------------------------------

def _finite_or_none(value: float) -> Optional[float]:
    return float(value) if math.isfinite(value) else None


@dataclass
class HeadTailAccumulator:
    """Per layer x head aggregates over sequences, fed one sequence record (a JSON-able dict) at a time.

    A record (:func:`sequence_record`) holds, for one sequence: n, max_ratio [L][H] (None if n < min_prefix),
    ratio_n_n1 / ratio_n_2n [L][H] (None = infinite), float32_zero_n1 / float32_zero_2n [L][H] bools,
    scaling {context length: max over layers x heads of ratio_c}.
    """

    num_layers: int
    num_heads: int
    sequences: int = 0
    sequences_experiment_i: int = 0
    lengths: list[int] = field(default_factory=list)
    max_ratio: Optional[np.ndarray] = None
    n_n1: list[np.ndarray] = field(default_factory=list)
    n_2n: list[np.ndarray] = field(default_factory=list)
    zero32_n1: Optional[np.ndarray] = None
    zero32_2n: Optional[np.ndarray] = None
    scaling: dict[int, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = (self.num_layers, self.num_heads)
        self.max_ratio = np.full(shape, -np.inf)
        self.zero32_n1 = np.zeros(shape, dtype=np.int64)
        self.zero32_2n = np.zeros(shape, dtype=np.int64)

    @staticmethod
    def _array(rows: list[list[Optional[float]]], none_value: float) -> np.ndarray:
        return np.array([[none_value if v is None else float(v) for v in row] for row in rows], dtype=np.float64)

    def add(self, record: dict) -> None:
        self.sequences += 1
        self.lengths.append(int(record["n"]))
        if record.get("max_ratio") is not None:
            self.sequences_experiment_i += 1
            self.max_ratio = np.maximum(self.max_ratio, self._array(record["max_ratio"], -np.inf))
        self.n_n1.append(self._array(record["ratio_n_n1"], np.inf))
        self.n_2n.append(self._array(record["ratio_n_2n"], np.inf))
        self.zero32_n1 += np.array(record["float32_zero_n1"], dtype=np.int64)
        self.zero32_2n += np.array(record["float32_zero_2n"], dtype=np.int64)
        for length, value in record.get("scaling", {}).items():
            self.scaling.setdefault(int(length), []).append(float(value))

    def result(self) -> dict:
        """JSON-able summary: [layer][head] lists; None stands for +inf (counts of infinities are given beside)."""
        if not self.sequences:
            raise ValueError("no sequences were processed")
        n_n1 = np.stack(self.n_n1)  # [S, L, H]
        n_2n = np.stack(self.n_2n)
        med_n1, med_2n = np.median(n_n1, axis=0), np.median(n_2n, axis=0)
        as_list = lambda a: [[_finite_or_none(v) for v in row] for row in a]  # noqa: E731
        out: dict = {
            "sequences": self.sequences,
            "sequences_experiment_i": self.sequences_experiment_i,
            "token_length": {"min": int(min(self.lengths)), "median": float(np.median(self.lengths)), "max": int(max(self.lengths))},
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "max_ratio": as_list(self.max_ratio) if self.sequences_experiment_i else None,
            "median_n_n1": as_list(med_n1),
            "median_n_2n": as_list(med_2n),
            "inf_count_n_n1": np.isinf(n_n1).sum(0).tolist(),
            "inf_count_n_2n": np.isinf(n_2n).sum(0).tolist(),
            "float32_zero_count_n1": self.zero32_n1.tolist(),
            "float32_zero_count_n2n": self.zero32_2n.tolist(),
        }
        if self.sequences_experiment_i:
            layer, head = np.unravel_index(int(np.argmax(self.max_ratio)), self.max_ratio.shape)
            out["max_ratio_overall"] = float(self.max_ratio[layer, head])
            out["max_ratio_at"] = {"layer": int(layer), "head": int(head)}
        finite_2n = med_2n[np.isfinite(med_2n)]
        out["share_heads_median_n_2n_le_20"] = float((med_2n <= 20).mean())
        out["share_heads_median_n_n1_le_1_1"] = float((med_n1 <= 1.1).mean())
        out["median_n_2n_max_finite"] = float(finite_2n.max()) if finite_2n.size else None
        lengths = sorted(self.scaling)
        out["scaling"] = {
            "context_length": lengths,
            "mean": [float(np.mean(self.scaling[c])) for c in lengths],
            "std": [float(np.std(self.scaling[c])) for c in lengths],
            "sequences": [len(self.scaling[c]) for c in lengths],
        }
        return out


def sequence_record(per_layer: Sequence[SequenceHeadTail], scaling: Sequence[int] = ()) -> dict:
    """One sequence's statistics for all layers (list index = layer) as a JSON-able dict (see HeadTailAccumulator)."""
    n = per_layer[0].n
    have_i = per_layer[0].ratios.shape[-1] > 0
    record: dict = {
        "n": n,
        "max_ratio": [[float(v) for v in s.max_ratio()] for s in per_layer] if have_i else None,
        "ratio_n_n1": [[_finite_or_none(float(v)) for v in s.ratio_n_n1] for s in per_layer],
        "ratio_n_2n": [[_finite_or_none(float(v)) for v in s.ratio_n_2n] for s in per_layer],
        "float32_zero_n1": [[bool(v) for v in s.float32_zero_n1] for s in per_layer],
        "float32_zero_2n": [[bool(v) for v in s.float32_zero_2n] for s in per_layer],
        "scaling": {},
    }
    prefixes = per_layer[0].prefix_lengths
    for c in scaling:
        if c in prefixes:
            col = prefixes.index(c)
            record["scaling"][str(c)] = max(float(s.ratios[:, col].max()) for s in per_layer)
    return record


# ---------------------------------------------------------------------------------------------------------
# Plots and the text summary
# ---------------------------------------------------------------------------------------------------------

def _heatmap(ax, matrix: np.ndarray, title: str, fmt: str, log_color: bool = False) -> None:
    import matplotlib.colors as mcolors

    data = np.array(matrix, dtype=np.float64)
    finite = data[np.isfinite(data)]
    norm = None
    if log_color and finite.size and finite.min() > 0:
        norm = mcolors.LogNorm(vmin=finite.min(), vmax=max(finite.max(), finite.min() * 1.0001))
    masked = np.ma.masked_invalid(data)
    image = ax.imshow(masked, aspect="auto", cmap="viridis", norm=norm)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    L, H = data.shape
    if L * H <= 200:
        for layer in range(L):
            for head in range(H):
                v = data[layer, head]
                ax.text(head, layer, "inf" if np.isinf(v) else format(v, fmt), ha="center", va="center", fontsize=6, color="w")
    ax.figure.colorbar(image, ax=ax)


def write_plots(result: dict, out_dir: str, title: str) -> list[str]:
    """Heatmaps (layer x head) of max_ratio, median_n_n1, median_n_2n and the A.1.3 scaling plot, as PNG."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    none_inf = lambda rows: np.array([[np.inf if v is None else v for v in r] for r in rows], dtype=np.float64)  # noqa: E731
    paths = []
    panels = [
        ("max_ratio", "(i) max tail/head ratio over prefixes and sequences", ".2f", False),
        ("median_n_n1", "(ii) median K_(n) / K_(n+1)", ".2f", False),
        ("median_n_2n", "(ii) median K_(n) / K_(2n)  (log colour)", ".1f", True),
    ]
    for key, label, fmt, log_color in panels:
        if result.get(key) is None:
            continue
        data = none_inf(result[key])
        fig, ax = plt.subplots(figsize=(max(5, 0.5 * data.shape[1] + 2), max(3.5, 0.22 * data.shape[0] + 2)))
        _heatmap(ax, data, f"{title}\n{label}", fmt, log_color)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{key}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    scaling = result.get("scaling") or {}
    if scaling.get("context_length"):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.errorbar(scaling["context_length"], scaling["mean"], yerr=scaling["std"], fmt="o-", capsize=3)
        ax.set_xlabel("context length (prefix i)")
        ax.set_ylabel("max over layers x heads of tail/head ratio")
        ax.set_title(f"{title}\nA.1.3 scaling of c (mean +- std over sequences)", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, "scaling.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def summary_text(result: dict) -> str:
    """One screen of text: the headline numbers of both experiments and the scaling curve."""
    lines = [f"head-tail: {result.get('model', '?')} on {result.get('corpus', '?')}  ({result.get('statistic', '')})"]
    tl = result["token_length"]
    lines.append(f"sequences: {result['sequences']} (tokens min/median/max {tl['min']}/{tl['median']:.0f}/{tl['max']}); "
                 f"{result['sequences_experiment_i']} long enough for experiment (i) (n >= min_prefix)")
    if result.get("max_ratio") is not None:
        mr = np.array([[np.nan if v is None else v for v in r] for r in result["max_ratio"]], dtype=np.float64)
        at = result["max_ratio_at"]
        lines.append(f"(i)  max tail/head ratio c: {result['max_ratio_overall']:.3f} at layer {at['layer']} head {at['head']}; "
                     f"per-head median {np.nanmedian(mr):.3f}, 90th pct {np.nanpercentile(mr, 90):.3f}")
        lines.append("     per layer max: " + " ".join(f"{v:.2f}" for v in np.nanmax(mr, axis=1)))
    else:
        lines.append("(i)  no sequence reached min_prefix tokens: experiment (i) is empty")
    n1 = np.array([[np.inf if v is None else v for v in r] for r in result["median_n_n1"]])
    n2 = np.array([[np.inf if v is None else v for v in r] for r in result["median_n_2n"]])
    lines.append(f"(ii) median K_(n)/K_(n+1): range {n1.min():.3f}..{n1.max():.3f}; "
                 f"{100 * result['share_heads_median_n_n1_le_1_1']:.0f}% of heads <= 1.1")
    lines.append(f"     median K_(n)/K_(2n): range {n2.min():.2f}..{n2.max():.2f}; "
                 f"{100 * result['share_heads_median_n_2n_le_20']:.0f}% of heads <= 20")
    inf1, inf2 = int(np.sum(result["inf_count_n_n1"])), int(np.sum(result["inf_count_n_2n"]))
    z1, z2 = int(np.sum(result["float32_zero_count_n1"])), int(np.sum(result["float32_zero_count_n2n"]))
    lines.append(f"     infinite ratios (float64, log domain): {inf1} (n/n+1), {inf2} (n/2n) of "
                 f"{result['sequences'] * result['num_layers'] * result['num_heads']} head-sequences; "
                 f"denominator 0 in float32 (paper's blanks): {z1}, {z2}")
    scaling = result.get("scaling") or {}
    if scaling.get("context_length"):
        lines.append("A.1.3 c vs context length (mean +- std over sequences, #seq):")
        cs, means, stds, counts = scaling["context_length"], scaling["mean"], scaling["std"], scaling["sequences"]
        picks = sorted(set(np.linspace(0, len(cs) - 1, min(len(cs), 10)).round().astype(int).tolist()))
        lines.append("     " + "  ".join(f"{cs[p]}: {means[p]:.2f}+-{stds[p]:.2f} ({counts[p]})" for p in picks[:5]))
        if len(picks) > 5:
            lines.append("     " + "  ".join(f"{cs[p]}: {means[p]:.2f}+-{stds[p]:.2f} ({counts[p]})" for p in picks[5:]))
    return "\n".join(lines)
