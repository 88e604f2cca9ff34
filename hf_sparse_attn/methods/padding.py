"""Left padding moved behind each row's last key and back, so that the first positions a sink-aware method
attends exactly (the attention sinks) are real tokens. Tensors: q [B, H, Nq, D], k/v [B, H, Nk, D], key_padding_mask
[B, Nk] bool (True = attend), shift [B] int64.
"""

from __future__ import annotations

from typing import Optional

import torch

NEG_INF = float("-inf")


def leading_padding(key_padding_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """shift [B] int64: the position of each row's first attendable key (0 for a row with none), or None when no
    row starts with padding. key_padding_mask [B, Nk] bool (True = attend) or None."""
    if key_padding_mask is None or bool(key_padding_mask[:, 0].all()):
        return None
    return key_padding_mask.int().argmax(dim=-1)  # argmax returns the first maximal position


def _roll_rows(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x [B, N] or [B, H, N] or [B, H, N, D], shift [B] int64 -> x rolled left by shift[b] along N in row b
    (element i of row b = element (i + shift[b]) mod N); a negative shift rolls right (the inverse)."""
    N = x.shape[1 if x.dim() == 2 else 2]
    index = (torch.arange(N, device=x.device)[None, :] + shift[:, None]) % N  # [B, N]
    if x.dim() == 2:
        return torch.gather(x, 1, index)
    index = index[:, None, :] if x.dim() == 3 else index[:, None, :, None]
    return torch.gather(x, 2, index.expand(*x.shape))


def move_leading_padding_to_end(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor,
                                shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left padding moved behind each row's last key, so that the first positions (the attention sinks) are real
    tokens. q [B, H, Nq, D], k/v [B, H, Nk, D], key_padding_mask [B, Nk] bool, shift [B] from :func:`leading_padding`.

    Every key before position shift[b] is padding, so rolling row b left by shift[b] keeps the order of its real
    keys and the set each query may attend. Self-attention (Nq = Nk): the queries move with the keys, so a causal
    query still sees exactly the real keys at or before it, and a left-padded row is computed as its right-padded
    copy (same hashing order, same blocks). Returns (q, k, v, mask) in the rolled order; :func:`restore_leading_padding`
    puts the output back."""
    if q.shape[2] == k.shape[2]:
        q = _roll_rows(q, shift)
    return q, _roll_rows(k, shift), _roll_rows(v, shift), _roll_rows(key_padding_mask, shift)


def restore_leading_padding(out: torch.Tensor, lse: torch.Tensor, shift: torch.Tensor, num_keys: int,
                            causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo :func:`move_leading_padding_to_end` on out [B, H, Nq, Dv] and lse [B, H, Nq] (nothing to undo when the
    queries did not move: Nq != num_keys). Causal: the padding queries before a row's first real token attend no
    key in place, so they get out 0 and lse -inf, as they would without the move."""
    if out.shape[2] != num_keys:
        return out, lse
    out, lse = _roll_rows(out, -shift), _roll_rows(lse, -shift)
    if causal:
        before_first = torch.arange(out.shape[2], device=out.device)[None, :] < shift[:, None]  # [B, Nq]
        out = out.masked_fill(before_first[:, None, :, None], 0.0)
        lse = lse.masked_fill(before_first[:, None, :], NEG_INF)
    return out, lse

