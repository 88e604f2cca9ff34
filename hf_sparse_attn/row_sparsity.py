"""Attention-row sparsity measured on real input: what ``select="measured"`` ranks layers by.

Definition ("Attention is Naturally Sparse with Gaussian Distributed Input", Definitions 3.4-3.5; the extracted
formulas are lost, reconstructed here). A row of the softmax attention matrix, p_i = softmax(s q_i K^T) over the
keys query i may attend to, is (k, eps)-sparse when its k largest entries hold at least 1 - eps of the mass:

    sum of the k largest p_ij  >=  1 - eps

and the probability of (k, eps)-sparsity is the share of rows that are. The paper's Theorem 4.7 says this
probability grows with the layer's weight norm R = ||W_Q W_K^T|| (:func:`hf_sparse_attn.rank_layers`), which is
why ``patch_model`` approximates the largest-R layers first.

Conventions. Rows are the unpadded query positions of each sequence. A row with at most k keys (early rows of a
causal decoder, or a sequence shorter than k + 1 tokens) is trivially k-sparse and is *not counted* for that k:
the reported probability is over rows that have more than k keys. Besides the probability we keep the mean
top-k mass per head (a continuous score, useful when probabilities saturate at 0 or 1).

Memory: scores are formed for ``row_chunk`` query rows at a time ([H, row_chunk, N]), so long sequences never
need an H x N x N tensor.

This module sits in the selection layer (below the public API); the audit that compares the measured sparsity
with R over layers and heads, with its JSON, plots and CLI, is :mod:`hf_sparse_attn.eval.sparsity`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

from .methods.common import expand_kv_heads
from .patches import capture_attention, find_adapter

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
