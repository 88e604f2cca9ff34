"""Layer ranking by Q/K weight norm ("Attention is Naturally Sparse" §5.1, "weight-aware prioritized employment") and layer selection.

What R is. "Attention is Naturally Sparse" (Definitions 3.1-3.2, 4.2) takes the attention input X to be the output of layer normalization,
*including its gain*, and studies the scores X W_Q W_K^T X^T; larger R = ||W_Q W_K^T|| means sparser attention rows
(Theorem 4.7). For one head h of a real model with normalization gain g (so the input is diag(g) x̂ for the
normalized x̂), the bilinear form the scores are made of is

    M_h = diag(g) W_Q^(h)T W_K^(kv(h)) diag(g)          (hidden x hidden, rank <= D)

where W_Q^(h) [D, hidden] and W_K [D, hidden] are the head's rows of the projections and kv(h) is the KV head that
query head h reads under GQA / multi-query attention. R_h = ||M_h||_2 (spectral, default) or ||M_h||_F
(``norm="frobenius"``). It is computed in O(hidden * D^2) through QR: with A^T = Q_a R_a and B^T = Q_b R_b
(A = W_Q^(h) diag(g), B = W_K diag(g)), M_h = Q_a (R_a R_b^T) Q_b^T has the singular values of the D x D matrix
R_a R_b^T. A layer's R is the mean of its heads' R_h (``head_reduce="max"`` for the largest).

Not included: projection biases (they shift scores by terms linear in x, outside the bilinear form the theory is
about); RoPE (a position-dependent rotation between W_Q and W_K; R is the form at relative position 0, and the
rotation does not change ||W_Q^(h)|| or ||W_K|| individually); the attention scale 1/sqrt(D) (the same for every
layer of a model, so it does not change the ranking); the bias (beta) of LayerNorm. For post-LN BERT the gain is
that of the previous block's output LayerNorm (the embeddings' LayerNorm for layer 0).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import random
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .patches import find_adapter

SELECT_PRESETS = ("weight_norm", "last", "first", "even", "odd", "random", "measured", "retrieval")
NORMS = ("spectral", "frobenius")


@dataclasses.dataclass
class LayerRanking:
    """R per layer and per head of one model. ``order``: layer indices by descending R (ties: lower index first)."""

    weight_norms: list[float]
    head_weight_norms: list[list[float]]
    norm: str
    head_reduce: str
    norm_sources: list[str]

    @property
    def order(self) -> list[int]:
        return sorted(range(len(self.weight_norms)), key=lambda i: (-self.weight_norms[i], i))

    def __len__(self) -> int:
        return len(self.weight_norms)

    def __str__(self) -> str:
        order = self.order
        rank_of = {layer: r for r, layer in enumerate(order)}
        lines = [f"Layer ranking by Q/K weight norm R ({self.norm} norm of diag(g) W_Q^T W_K diag(g), {self.head_reduce} over heads)",
                 f"{'layer':>5} {'R':>10} {'rank':>4} {'min head R':>10} {'max head R':>10}  norm gain folded"]
        for i, r in enumerate(self.weight_norms):
            heads = self.head_weight_norms[i]
            lines.append(f"{i:>5} {r:>10.4g} {rank_of[i]:>4} {min(heads):>10.4g} {max(heads):>10.4g}  {self.norm_sources[i] or '(none)'}")
        return "\n".join(lines)

    __repr__ = __str__


def head_weight_norms(w_q: torch.Tensor, w_k: torch.Tensor, norm_gain: Optional[torch.Tensor], norm: str = "spectral") -> torch.Tensor:
    """R_h for every query head. w_q [H, D, hidden], w_k [Hkv, D, hidden], norm_gain [hidden] or None -> [H]."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    num_heads, num_kv = w_q.shape[0], w_k.shape[0]
    if num_heads % num_kv:
        raise ValueError(f"{num_heads} query heads cannot share {num_kv} KV heads evenly")
    w_q = w_q.double()
    w_k = w_k.double().repeat_interleave(num_heads // num_kv, dim=0)
    if norm_gain is not None:
        w_q = w_q * norm_gain.double()
        w_k = w_k * norm_gain.double()
    r_q = torch.linalg.qr(w_q.transpose(1, 2), mode="r").R  # [H, D, D]
    r_k = torch.linalg.qr(w_k.transpose(1, 2), mode="r").R
    core = r_q @ r_k.transpose(1, 2)  # same nonzero singular values as M_h
    if norm == "spectral":
        return torch.linalg.matrix_norm(core, ord=2).float()
    return torch.linalg.matrix_norm(core, ord="fro").float()


def rank_layers(model: torch.nn.Module, norm: str = "spectral", head_reduce: str = "mean",
                adapter_options: Optional[dict[str, Any]] = None, adapter: Any = None) -> LayerRanking:
    """R per layer (and head) of ``model``, without patching anything. Deterministic (float64 QR)."""
    if head_reduce not in ("mean", "max"):
        raise ValueError(f"head_reduce must be 'mean' or 'max', got {head_reduce!r}")
    adapter = adapter if adapter is not None else find_adapter(model, adapter_options)
    per_head, per_layer, sources = [], [], []
    for layer_idx in range(len(adapter.attention_layers(model))):
        weights = adapter.qk_weights(model, layer_idx)
        heads = head_weight_norms(weights.w_q, weights.w_k, weights.norm_gain, norm)
        per_head.append([float(x) for x in heads])
        per_layer.append(float(heads.mean() if head_reduce == "mean" else heads.max()))
        sources.append(weights.norm_name)
    return LayerRanking(per_layer, per_head, norm, head_reduce, sources)


LayersArg = Union[int, float, str, Sequence[int]]
SelectArg = Union[str, Sequence[int], Callable[[LayerRanking], Sequence[int]]]


def selection_order(ranking: LayerRanking, select: SelectArg, seed: int = 0,
                    measured_scores: Optional[Sequence[float]] = None,
                    retrieval_scores: Optional[Sequence[float]] = None) -> list[int]:
    """Every layer index, in the order layers are chosen.

    ``weight_norm``: descending R. ``last`` / ``first``: from the end / the start. ``even`` / ``odd``: those layers
    first (ascending), then the others (the HyperAttention presets). ``random``: shuffled with ``seed``.
    ``measured``: descending measured sparsity (``measured_scores``). ``retrieval``: ascending needle mass
    (``retrieval_scores``, :mod:`hf_sparse_attn.retrieval`): the layers that read the fact least first. A list:
    that order. A callable: called with
    the ranking, returns the order.
    """
    n = len(ranking)
    if callable(select):
        order = [int(i) for i in select(ranking)]
    elif isinstance(select, str):
        if select == "weight_norm":
            order = ranking.order
        elif select == "last":
            order = list(range(n - 1, -1, -1))
        elif select == "first":
            order = list(range(n))
        elif select in ("even", "odd"):
            start = 0 if select == "even" else 1
            order = list(range(start, n, 2)) + list(range(1 - start, n, 2))
        elif select == "random":
            order = list(range(n))
            random.Random(seed).shuffle(order)
        elif select == "measured":
            if measured_scores is None or len(measured_scores) != n:
                raise ValueError("select='measured' needs calibration inputs: patch_model(..., select='measured', calibration=input_ids)")
            order = sorted(range(n), key=lambda i: (-measured_scores[i], i))
        elif select == "retrieval":
            if retrieval_scores is None or len(retrieval_scores) != n:
                raise ValueError("select='retrieval' needs a retrieval probe: patch_model(..., select='retrieval', "
                                 "calibration=hf_sparse_attn.retrieval_probe(tokenizer))")
            order = sorted(range(n), key=lambda i: (retrieval_scores[i], i))
        else:
            raise ValueError(f"unknown select {select!r}; use one of {list(SELECT_PRESETS)}, a list of layer indices or a callable")
    else:
        order = [int(i) for i in select]
    bad = [i for i in order if not 0 <= i < n]
    if bad or len(set(order)) != len(order):
        raise ValueError(f"layer order {order} must hold distinct layer indices in 0..{n - 1}")
    return order


def describe_value(value: Any) -> str:
    """``value`` for an error message: its repr (cut at 80 characters) and its type."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def check_layers(layers: Any, num_layers: int) -> None:
    """``layers``: "all", an int count in 0..num_layers, a float fraction in (0, 1] that selects at least one layer
    (round(fraction x num_layers) >= 1), or a list/tuple/range of distinct int layer indices in 0..num_layers - 1.
    The one rule for ``layers``: :func:`resolve_layers` applies it too. Raises ValueError naming the valid values."""
    valid = (f"'all', an int count in 0..{num_layers}, a float fraction in (0, 1], or a list of distinct layer "
             f"indices in 0..{num_layers - 1}")
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be {valid}; got {describe_value(layers)}")
        return
    if isinstance(layers, bool) or layers is None:
        raise ValueError(f"layers must be {valid}; got {describe_value(layers)}")
    if isinstance(layers, numbers.Integral):
        if not 0 <= int(layers) <= num_layers:
            raise ValueError(f"layers={int(layers)} is not a layer count: the model has {num_layers} attention layers; "
                             f"layers must be {valid}")
        return
    if isinstance(layers, numbers.Real):
        value = float(layers)
        if not (math.isfinite(value) and 0.0 < value <= 1.0):
            raise ValueError(f"layers={layers!r} as a fraction must be in (0, 1] (use layers=0 for no layer); "
                             f"layers must be {valid}")
        if round(value * num_layers) == 0:  # resolve_layers takes round(fraction * num_layers) layers
            smallest = 1 / num_layers if num_layers else 1.0
            raise ValueError(f"layers={layers!r} selects no layer: round({value:g} x {num_layers} layers) = 0. Pass a "
                             f"fraction of at least {smallest:.4g} (one layer), a count such as layers=1, or layers=0 "
                             f"to patch no layer on purpose")
        return
    if not isinstance(layers, (list, tuple, range)):
        raise ValueError(f"layers must be {valid}; got {describe_value(layers)}")
    bad_type = [x for x in layers if isinstance(x, bool) or not isinstance(x, numbers.Integral)]
    if bad_type:
        raise ValueError(f"layer indices must be ints; got {bad_type[:5]!r} in layers. layers must be {valid}")
    indices = [int(x) for x in layers]
    outside = [i for i in indices if not 0 <= i < num_layers]
    if outside:
        raise ValueError(f"layer indices {outside[:10]} are outside 0..{num_layers - 1} (the model has {num_layers} "
                         f"attention layers)")
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise ValueError(f"layer indices {duplicates} appear more than once in layers; list each layer once")


def resolve_layers(layers: LayersArg, order: list[int], num_layers: int) -> list[int]:
    """The chosen layer indices, sorted: the first ``layers`` of ``order`` for a count (int), the first
    round(fraction x num_layers) for a fraction in (0, 1] (float), every layer for "all", the indices of a list.
    ``layers`` must pass :func:`check_layers` (checked here again: a ValueError names the valid values)."""
    check_layers(layers, num_layers)
    if isinstance(layers, str):
        return sorted(order)
    if isinstance(layers, numbers.Integral):
        return sorted(order[: int(layers)])
    if isinstance(layers, numbers.Real):
        return sorted(order[: int(round(float(layers) * num_layers))])
    return sorted(int(i) for i in layers)


SEED_MAX = 2**32 - 1  # per-layer generator seeds are seed * 1_000_003 + layer_idx: must stay within int64


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed``: an int in 0..2**32 - 1 (bools, floats, strings and None are refused). Returns it as an int."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"{name} must be an int in 0..{SEED_MAX}, got {describe_value(seed)}")
    seed = int(seed)
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{name}={seed} is out of range: it must be an int in 0..{SEED_MAX}")
    return seed
