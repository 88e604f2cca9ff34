"""Masks: the compact mask function registered with transformers, and the dense-mask recognition ChatGLM needs.

transformers builds each layer's mask through the mask function registered for the attention implementation
(``AttentionMaskInterface``). Its ``sdpa_mask`` materializes a dense boolean ``[B, 1, N, N]`` mask for every padded
batch — gigabytes at 32k tokens, before any sub-quadratic method runs. :func:`compact_mask` does what transformers'
flash-attention path does instead (``masking_utils.flash_attention_mask``): for plain causal or bidirectional
attention it hands over only the ``[B, N]`` key padding mask (True = attend), or None when nothing is padded. Every
other mask (sliding window, chunked, packed sequences, or/and overlays, decode steps with a cache, a decoder run
bidirectionally) is handed over in full, as ``sdpa_mask`` builds it; the adapter then runs exact attention with it
and records why.

Where a layer runs exact attention on a compact mask, :func:`dense_mask` builds the dense mask ``sdpa_mask`` would
have built, so exact layers compute exactly what they computed under ``sdpa``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch

from .reasons import FULL_MASK_REASON  # noqa: F401  (the reason an unrecognised mask is counted under)


def _plain_kind(mask_function: Callable, config: Any) -> Optional[str]:
    """"causal" / "bidirectional" for transformers' two plain mask functions, None for any other."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    if mask_function is causal_mask_function:
        return "causal"
    # a decoder run bidirectionally (config.is_causal = False) keeps is_causal = True on its modules: hand over the
    # full mask so that the adapter never takes such a layer for causal
    if mask_function is bidirectional_mask_function and getattr(config, "is_causal", None) is not False:
        return "bidirectional"
    return None


def compact_mask(
    batch_size: int,
    kv_length: int,
    kv_offset: int = 0,
    mask_function: Optional[Callable] = None,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs: Any,
) -> Optional[torch.Tensor]:
    """The mask function registered for ``hf_sparse_attn`` (same keyword arguments as ``masking_utils.sdpa_mask``,
    transformers 5.0 and later: ``q_length`` / ``q_offset`` from 5.x releases that pass them, ``cache_position`` in 5.0).

    attention_mask: the 2-D padding mask [B, >= kv_length] (True / 1 = a real token) or None. Returns, for plain
    causal or bidirectional self-attention over the whole sequence, the key padding mask [B, kv_length] bool or None
    (no padding); otherwise the dense [B, 1, q_length, kv_length] bool mask of ``sdpa_mask`` (or its None).
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = causal_mask_function if mask_function is None else mask_function
    if "q_length" in kwargs:
        q_length = int(kwargs["q_length"])
    else:  # transformers 5.0: the queries' positions
        q_length = int(kwargs["cache_position"].shape[0])
    plain = (
        _plain_kind(mask_function, kwargs.get("config")) is not None
        and q_length == kv_length and _is_zero(kwargs.get("q_offset", 0)) and kv_offset == 0
        and (attention_mask is None or (attention_mask.dim() == 2 and tuple(attention_mask.shape) == (batch_size, kv_length)))
    )
    if not plain:
        return sdpa_mask(batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset, mask_function=mask_function,
                         attention_mask=attention_mask, **kwargs)
    if attention_mask is None:
        return None
    key_padding_mask = attention_mask.to(torch.bool)
    # reading the values cannot be traced: under torch.compile an unpadded batch keeps its all-True mask
    if not torch.compiler.is_compiling() and bool(key_padding_mask.all()):
        return None
    return key_padding_mask


def _is_zero(offset: Any) -> bool:
    """Whether the queries' offset in the cache is 0. A StaticCache gives it as a tensor (transformers 5.x), whose
    value cannot be read while torch.compile traces: there it counts as non-zero (sdpa_mask's dense mask is exact for
    every offset)."""
    if offset is None:
        return True
    if isinstance(offset, torch.Tensor):
        return not torch.compiler.is_compiling() and int(offset) == 0
    return int(offset) == 0


_SDPA_MASK_TAKES_Q_LENGTH: Optional[bool] = None


def dense_mask(key_padding_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """key_padding_mask [B, N] bool (True = attend) -> the dense [B, 1, N, N] bool mask transformers' ``sdpa_mask``
    builds for the same padding (causal: query i sees valid keys j <= i; else: every valid key)."""
    global _SDPA_MASK_TAKES_Q_LENGTH
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    if _SDPA_MASK_TAKES_Q_LENGTH is None:
        _SDPA_MASK_TAKES_Q_LENGTH = "q_length" in inspect.signature(sdpa_mask).parameters
    batch_size, n = key_padding_mask.shape
    kwargs: dict[str, Any] = dict(
        batch_size=batch_size, kv_length=n, attention_mask=key_padding_mask,
        mask_function=causal_mask_function if causal else bidirectional_mask_function,
        allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
    )
    if _SDPA_MASK_TAKES_Q_LENGTH:
        kwargs.update(q_length=n, device=key_padding_mask.device)
    else:  # transformers 5.0
        kwargs.update(cache_position=torch.arange(n, device=key_padding_mask.device))
    return sdpa_mask(**kwargs)


def split_attend_mask(attend_mask: Optional[torch.Tensor], causal: bool, n_query: int) -> tuple[bool, Optional[torch.Tensor], bool]:
    """Recognize a dense boolean mask [B, 1|H, Nq, Nk] (True = attend) as causal and/or key padding.

    Used where a model builds its own dense masks outside transformers' mask interface (ChatGLM's remote code).
    Returns (causal, key_padding_mask [B, Nk] or None, recognized). ``recognized`` is False when the mask has
    any other form (sliding window, packed sequences, a custom mask): the caller must then run exact attention
    with the mask itself, never drop it.
    """
    if attend_mask is None:
        return causal, None, True
    if attend_mask.dtype != torch.bool or attend_mask.dim() != 4 or attend_mask.shape[2] != n_query:
        return causal, None, False
    n_key = attend_mask.shape[-1]
    if n_query != n_key:
        return causal, None, False
    first = attend_mask[:, :1]
    if attend_mask.shape[1] > 1 and not torch.equal(attend_mask, first.expand_as(attend_mask)):
        return causal, None, False
    first = first[:, 0]  # [B, Nq, Nk]
    if causal:
        key_padding_mask = first[:, -1, :]  # the last query sees every valid key
        lower = torch.ones(n_query, n_key, dtype=torch.bool, device=first.device).tril_()
        expected = lower[None] & key_padding_mask[:, None, :]
    else:
        key_padding_mask = first.diagonal(dim1=1, dim2=2)  # a real token attends itself
        expected = key_padding_mask[:, None, :].expand_as(first)
    # Rows of padding queries are compared too loosely on purpose: models fill them differently (ChatGLM lets them
    # attend everything, sdpa_mask masks them), and their outputs never reach a real token.
    mismatch = (first ^ expected) & key_padding_mask[:, :, None]
    if bool(mismatch.any()):
        return causal, None, False
    if bool(key_padding_mask.all()):
        key_padding_mask = None
    return causal, key_padding_mask, True
