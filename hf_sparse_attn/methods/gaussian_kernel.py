"""Indyk et al., Lemma 4.1: softmax attention as a Gaussian kernel matrix with row factors.

Derivation (our copy of the paper's text garbles the scaling, so it is written out here). Let s be the attention
scale and M = max_j ||k_j||^2. Append one coordinate to every key and a zero to every query:

    k'_j = [k_j, sqrt(M - ||k_j||^2)],   q'_i = [q_i, 0]
    ||q'_i - k'_j||^2 = ||q_i||^2 + M - 2 <q_i, k_j>

so that

    exp(s <q_i, k_j>) = exp(s (||q_i||^2 + M) / 2) * exp(-(s / 2) ||q'_i - k'_j||^2).

Scaling the points by sqrt(s / 2), x_i = sqrt(s/2) q'_i and y_j = sqrt(s/2) k'_j, gives the unit-bandwidth
Gaussian kernel K_ij = exp(-||x_i - y_j||^2) and

    A_ij = exp(s <q_i, k_j>) = D_i * K_ij,   log D_i = s (||q_i||^2 + M) / 2.

The row factor D_i cancels in softmax: softmax(s Q K^T) V = diag(K 1)^-1 K V. Rows of K are the rows of A
divided by a per-row constant, so every per-row statistic (k-sparsity, ratios of entries within a row) is
the same for K and A; statistics that mix rows (Indyk et al.'s head-to-tail ratio over a whole prefix matrix) are
computed on K, as the paper does.
"""

from __future__ import annotations

import torch


def softmax_to_gaussian_kernel(q: torch.Tensor, k: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Points of the Gaussian kernel equal to exp(scale * q.k) up to row factors (Lemma 4.1).

    q [..., Nq, D], k [..., Nk, D] (float32 recommended). Returns x [..., Nq, D+1], y [..., Nk, D+1] with
    exp(scale * q_i.k_j) = exp(log_row_factor_i) * exp(-||x_i - y_j||^2), and log_row_factor [..., Nq].
    ``scale`` must be positive.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive for the Gaussian-kernel reduction, got {scale}")
    k_sq = k.pow(2).sum(-1)  # [..., Nk]
    max_sq = k_sq.amax(-1, keepdim=True)  # [..., 1]
    extra_sq = (max_sq - k_sq).clamp_min(0)
    # sqrt with a zero (not NaN) gradient at 0: the longest key has extra 0 and, while it is the longest,
    # extra^2 = max_sq - k_sq stays 0 around it, so 0 is the true derivative there
    positive = extra_sq > 0
    extra = torch.where(positive, torch.where(positive, extra_sq, 1.0).sqrt(), 0.0).unsqueeze(-1)  # [..., Nk, 1]
    half = (scale / 2.0) ** 0.5
    y = torch.cat([k, extra], dim=-1) * half
    x = torch.cat([q, torch.zeros_like(q[..., :1])], dim=-1) * half
    log_row_factor = scale * (q.pow(2).sum(-1) + max_sq) / 2.0
    return x, y, log_row_factor


def gaussian_kernel_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """K_ij = exp(-||x_i - y_j||^2). x [..., Nq, D], y [..., Nk, D] -> [..., Nq, Nk] (materialized: small n only)."""
    sq = (x.pow(2).sum(-1, keepdim=True) + y.pow(2).sum(-1).unsqueeze(-2) - 2 * x @ y.transpose(-1, -2)).clamp_min(0)
    return torch.exp(-sq)
