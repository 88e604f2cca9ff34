"""Calls against a KV cache: the mask transformers hands a decode step (or a chunk of a prompt fed against a cache)
reduced to the key padding mask the decode methods take (hf_sparse_attn/methods/decode.py, docs/methods/decode.md).

Such a call has q_len queries at the end of the cache's ``kv_len`` valid positions: query row i sits at position
``kv_len - q_len + i`` and may see keys ``j <= kv_len - q_len + i``. transformers gives it no mask (nothing padded),
or the dense ``[B, 1, q_len, L]`` boolean mask of ``sdpa_mask`` (True = attend). ``L`` is ``kv_len`` for a cache that
grows (``DynamicCache``, ``GrowingCache``) and the preallocated length for a ``StaticCache``, whose slots after the
valid positions are masked for every row. A decode method honours exactly one form of mask: causal with respect to
the query positions, plus left padding (each batch row's first keys masked, the rest visible).
:func:`decode_key_padding_mask` recognises that form, and the number of valid positions; any other mask (a sliding
window that has started to drop keys mid-row, a packed batch, a custom mask) is not recognised and the call runs exact
attention.
"""

from __future__ import annotations

import threading
import weakref
from typing import NamedTuple, Optional

import torch


class DecodeMask(NamedTuple):
    """What a decode step's mask says. ``recognised``: causal + left padding over the first ``kv_len`` positions of
    the cache (the only form a decode method honours); ``key_padding_mask`` [B, kv_len] bool (True = a real key), or
    None where no key is masked; ``kv_len``: the valid positions (< the cache tensors' length for a StaticCache)."""

    recognised: bool
    key_padding_mask: Optional[torch.Tensor]
    kv_len: int


def decode_key_padding_mask(attention_mask: Optional[torch.Tensor], q_len: int, cache_len: int,
                            causal: bool = False) -> DecodeMask:
    """The :class:`DecodeMask` of a call of q_len queries against cache tensors of ``cache_len`` positions.

    No mask means what ``scaled_dot_product_attention`` makes of it: with ``causal`` (is_causal, q_len > 1; torch
    aligns its causal mask top-left) query i sees keys j <= i, i.e. a prefill over the first q_len positions
    (transformers hands a prefill into a ``StaticCache`` no mask); without, every query sees every key.

    attention_mask: None, a [B, cache_len] key padding mask (bool or 0/1, True = a real key), or a dense boolean
    [B, 1, q_len, cache_len] mask (True = attend). Recognised: None; a 2-D mask whose masked keys form a prefix of
    each row; a dense mask equal to causal (row i sees j <= kv_len - q_len + i) AND such a prefix-shaped key padding
    mask over the first kv_len positions, every later position masked in every row (a StaticCache's empty slots).
    O(B * q_len * cache_len) elementwise work.
    """
    if attention_mask is None:
        return DecodeMask(True, None, q_len if causal else cache_len)
    kv_len = cache_len
    if attention_mask.dim() == 2:
        if attention_mask.shape[-1] != cache_len:
            return DecodeMask(False, None, cache_len)
        padding = attention_mask.to(torch.bool)
    elif attention_mask.dim() == 4 and attention_mask.dtype == torch.bool \
            and tuple(attention_mask.shape[1:]) == (1, q_len, cache_len):
        last_row = attention_mask[:, 0, -1, :]  # the last query sees every key that is not padding nor an empty slot
        seen = last_row.any(dim=0)  # [cache_len]
        if not bool(seen.any()):
            return DecodeMask(False, None, cache_len)
        kv_len = int(seen.nonzero()[-1]) + 1
        if kv_len < q_len:
            return DecodeMask(False, None, cache_len)
        dense = attention_mask[:, 0]
        if kv_len < cache_len:
            if bool(dense[:, :, kv_len:].any()):
                return DecodeMask(False, None, cache_len)
            dense = dense[:, :, :kv_len]
        padding = last_row[:, :kv_len]
        if q_len > 1:
            rows = torch.arange(q_len, device=padding.device)[:, None]
            cols = torch.arange(kv_len, device=padding.device)[None, :]
            causal = cols <= rows + (kv_len - q_len)
            if not torch.equal(dense, causal[None] & padding[:, None, :]):
                return DecodeMask(False, None, cache_len)
    else:
        return DecodeMask(False, None, cache_len)
    if padding.shape[-1] > 1 and bool((padding[:, 1:] < padding[:, :-1]).any()):
        return DecodeMask(False, None, cache_len)  # a visible key before a masked one: not left padding
    if bool(padding.all()):
        return DecodeMask(True, None, kv_len)
    return DecodeMask(True, padding, kv_len)


_LAST = threading.local()


def decode_mask_of_call(attention_mask: Optional[torch.Tensor], q_len: int, cache_len: int,
                        causal: bool = False) -> DecodeMask:
    """:func:`decode_key_padding_mask`, computed once per mask: transformers hands the same mask tensor to every layer
    of one forward pass, so the layers after the first reuse the first one's result. Per thread (concurrent calls
    never share it); the mask is held by a weak reference and compared by identity and version."""
    if attention_mask is None:
        return decode_key_padding_mask(None, q_len, cache_len, causal)
    last = getattr(_LAST, "entry", None)
    if last is not None:
        ref, version, key, result = last
        if ref() is attention_mask and version == attention_mask._version and key == (q_len, cache_len):
            return result
    result = decode_key_padding_mask(attention_mask, q_len, cache_len)
    _LAST.entry = (weakref.ref(attention_mask), attention_mask._version, (q_len, cache_len), result)
    return result
