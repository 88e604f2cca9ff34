"""Pieces every method shares: the argument checks of the method contract and the GQA head expansion (the
numeric helpers, the fully-masked-row rule among them, are in merge.py)."""

from __future__ import annotations

from typing import Optional

import torch


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, key_padding_mask: Optional[torch.Tensor]) -> None:
    """Validate the shapes of the method contract.

    q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv], key_padding_mask [B, Nk] bool or None.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Nq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:3] != k.shape[:3] or k.shape[3] != D:
        raise ValueError(
            f"k/v must be [B, H, Nk, D] with q's B, H and D (expand GQA heads first); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if causal and Nq != k.shape[2]:
        raise ValueError(f"causal attention needs Nq == Nk (got {Nq} and {k.shape[2]}); decode steps go to exact attention")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (B, k.shape[2]):
            raise ValueError(f"key_padding_mask must be a bool tensor [B, Nk] = [{B}, {k.shape[2]}], True = attend; got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")


def expand_kv_heads(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """[B, Hkv, N, D] -> [B, Hkv * num_groups, N, D], each KV head repeated for its query heads (GQA/MQA)."""
    if num_groups == 1:
        return x
    B, Hkv, N, D = x.shape
    return x[:, :, None].expand(B, Hkv, num_groups, N, D).reshape(B, Hkv * num_groups, N, D)
