"""Merging partial attention results through their log-sum-exp values.

If out_a = softmax(s_a) V_a over a key set A with lse_a = log sum_A exp(s), and likewise for a disjoint set B,
then attention over A ∪ B is

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

(HyperAttention's merge of the block part and the sampled part). A row empty on both sides keeps lse = -inf
and out = 0, never NaN.
"""

from __future__ import annotations

import torch


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """out_* [B, H, N, D] (float32), lse_* [B, H, N] (float32) -> merged (out [B, H, N, D], lse [B, H, N])."""
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    w_a = torch.where(finite, torch.exp(lse_a - safe), torch.zeros_like(lse))
    w_b = torch.where(finite, torch.exp(lse_b - safe), torch.zeros_like(lse))
    out = out_a * w_a.unsqueeze(-1) + out_b * w_b.unsqueeze(-1)
    return out, lse
