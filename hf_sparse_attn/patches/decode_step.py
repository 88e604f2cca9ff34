"""Decode steps over a KV cache: the mask transformers hands a decode step, reduced to the key padding mask the
decode methods take (hf_sparse_attn/methods/decode.py, docs/methods/decode.md).

A decode step (or a chunk of a prompt fed against a cache) has q_len < kv_len: query row i sits at position
``kv_len - q_len + i`` and may see keys ``j <= kv_len - q_len + i``. transformers gives such a call no mask (nothing
padded), or the dense ``[B, 1, q_len, kv_len]`` boolean mask of ``sdpa_mask`` (True = attend). A decode method
honours exactly one form of mask: causal with respect to the query positions, plus left padding (each batch row's
first keys masked, the rest visible). :func:`decode_key_padding_mask` recognises that form and returns the
``[B, kv_len]`` key padding mask; any other mask (a sliding window that has started to drop keys mid-row, a packed
batch, a custom mask) is not recognised and the call runs exact attention.
"""

from __future__ import annotations

from typing import Optional

import torch


def decode_key_padding_mask(attention_mask: Optional[torch.Tensor], q_len: int,
                            kv_len: int) -> tuple[bool, Optional[torch.Tensor]]:
    """(recognised, key_padding_mask) for a call of q_len queries at the end of kv_len keys.

    attention_mask: None, a [B, kv_len] key padding mask (bool or 0/1, True = a real key), or a dense boolean
    [B, 1, q_len, kv_len] mask (True = attend). Recognised: None; a 2-D mask whose masked keys form a prefix of each
    row; a dense mask equal to causal (row i sees j <= kv_len - q_len + i) AND such a prefix-shaped key padding mask.
    key_padding_mask is [B, kv_len] bool, or None where no key is masked.
    """
    if attention_mask is None:
        return True, None
    if attention_mask.dim() == 2:
        if attention_mask.shape[-1] != kv_len:
            return False, None
        padding = attention_mask.to(torch.bool)
    elif attention_mask.dim() == 4 and attention_mask.dtype == torch.bool \
            and tuple(attention_mask.shape[1:]) == (1, q_len, kv_len):
        padding = attention_mask[:, 0, -1, :]  # the last row sees every key that is not padding
        if q_len > 1:
            rows = torch.arange(q_len, device=padding.device)[:, None]
            cols = torch.arange(kv_len, device=padding.device)[None, :]
            causal = cols <= rows + (kv_len - q_len)
            if not torch.equal(attention_mask[:, 0], causal[None] & padding[:, None, :]):
                return False, None
    else:
        return False, None
    if padding.shape[-1] > 1 and bool((padding[:, 1:] < padding[:, :-1]).any()):
        return False, None  # a visible key before a masked one: not left padding
    if bool(padding.all()):
        return True, None
    return True, padding
