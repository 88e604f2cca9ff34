"""``local``: attention sinks + an exact local window (StreamingLLM's pattern; MInference's "A-shape" head).

Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks": LLM heads put a large share of every
row's softmax mass on the first tokens, and most of the rest on the recent ones. Query i attends exactly

    causal:         the sinks {j < S, j <= i}  and the window {i - window < j <= i}      (j >= S)
    bidirectional:  the sinks {j < S}          and the window {|i - j| <= window}         (j >= S)

over the valid keys, the two disjoint parts merged through their log-sum-exp values (merge.py). Nothing is
estimated: it is exact attention restricted to that key set, and exact attention whenever the window covers the
sequence. It is the baseline a sorted-LSH method must beat at equal speed (docs/methods/local.md).

Implementation: window.window_attention (overlapping strided views of k/v, one fused call per group of
64-query chunks with a mask shared by the chunks) and sinks.sink_attention. A left-padded row is rolled
past its padding first, so its sinks are its first real tokens (as in hyper.py).

Tensors: q [B, H, N, D], k/v [B, H, N, D] (self-attention; GQA expanded), key_padding_mask [B, N] bool (True =
attend); out [B, H, N, D] in q's dtype (float32 accumulation), lse [B, H, N] float32 (-inf and out 0 for a row
with no key). No [N, N] tensor: the largest tile is [64, window + 64] per chunk (bidirectional: 2 window + 64).
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import check_inputs
from .decode import in_row_tiles, local_decode
from .defaults import LOCAL_MIN_SEQ_LEN, LOCAL_NUM_SINK_TOKENS, LOCAL_WINDOW
from .registry import MAX_TOKENS, Param, register_method, self_attention_only
from .padding import leading_padding, move_leading_padding_to_end
from .sinks import add_sinks_and_restore
from .window import window_attention

# Measured defaults (each with the result that chose it): defaults.py.
WINDOW = LOCAL_WINDOW
NUM_SINK_TOKENS = LOCAL_NUM_SINK_TOKENS
MIN_SEQ_LEN = LOCAL_MIN_SEQ_LEN


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    key_padding_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    window: int = WINDOW,
    num_sink_tokens: int = NUM_SINK_TOKENS,
    min_seq_len: int = MIN_SEQ_LEN,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sinks + local window. q [B, H, N, D], k/v [B, H, N, D] -> (out [B, H, N, D] q's dtype, lse [B, H, N] float32).

    ``generator`` is unused (deterministic). ``min_seq_len`` is applied by the adapter (exact attention below it);
    a direct call always runs the method.
    """
    check_inputs(q, k, v, causal, key_padding_mask)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"local: self-attention only (Nq == Nk), got {q.shape[2]} queries and {k.shape[2]} keys; "
                         "the adapter sends other calls to exact attention")
    if window < 0 or num_sink_tokens < 0:
        raise ValueError(f"local: window and num_sink_tokens must be >= 0, got {window}, {num_sink_tokens}")
    window = min(int(window), k.shape[2])  # a window of N or more holds every key: it runs as window N
    num_sinks = min(int(num_sink_tokens), k.shape[2])
    shift = leading_padding(key_padding_mask) if num_sinks > 0 else None
    if shift is not None:  # left padding: the sinks must be each row's first real tokens
        q, k, v, key_padding_mask = move_leading_padding_to_end(q, k, v, key_padding_mask, shift)
    out, lse, _ = window_attention(q.float(), k.float(), v.float(), window=window, scale=scale,
                                   key_valid=key_padding_mask, aligned=False, causal=causal, first_key=num_sinks)
    out, lse = add_sinks_and_restore(out, lse, q, k, v, num_sinks=num_sinks, causal=causal, scale=scale,
                                     key_padding_mask=key_padding_mask, shift=shift)
    return out.to(q.dtype), lse


def check_local(q: torch.Tensor, k: torch.Tensor, causal: bool, key_padding_mask: Optional[torch.Tensor],
                params: dict) -> Optional[str]:
    """Why ``local`` cannot serve a call: it serves self-attention only (q_len == kv_len). The adapter's decision
    sends every other call to exact attention before it asks this check; a direct ``spec.check`` gets the same
    words (registry.NOT_SELF_ATTENTION_REASON)."""
    return self_attention_only(q, k)


def local_chunk(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, scale: float, kv_len: int,
                key_padding_mask: Optional[torch.Tensor] = None, window: int = WINDOW,
                num_sink_tokens: int = NUM_SINK_TOKENS, min_seq_len: int = MIN_SEQ_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """A prompt chunk against a KV cache (the chunk contract, registry.py): q [B, Hq, C, D], the rows at positions
    kv_len - C ... kv_len - 1; k_cache / v_cache [B, Hkv, L, D] grouped heads, the first kv_len valid;
    key_padding_mask [B, kv_len] bool or None -> (out [B, Hq, C, D] q's dtype, lse [B, Hq, C] float32): the last C
    rows of :func:`local_attention`'s causal output over the kv_len keys, computed by local decode in row tiles."""
    return in_row_tiles(local_decode, q, k_cache, v_cache, scale=scale, kv_len=kv_len,
                        key_padding_mask=key_padding_mask, window=window, num_sink_tokens=num_sink_tokens)


register_method(
    "local",
    local_attention,
    params={
        "window": Param(kind=int, low=0, high=MAX_TOKENS, help="causal: each query attends the previous `window` positions (itself "
                                                "included); bidirectional: the positions within `window` on each side"),
        "num_sink_tokens": Param(kind=int, low=0, high=MAX_TOKENS,
                                 help="every query also attends the first num_sink_tokens real keys (attention sinks)"),
        "min_seq_len": Param(kind=int, low=1, high=MAX_TOKENS, help="the adapter runs exact attention below this length"),
    },
    check=check_local,
    chunk_fn=local_chunk,
    min_seq_len_param="min_seq_len",
    source="StreamingLLM (Xiao et al. 2023, attention sinks + window); MInference's A-shape pattern",
    summary="attention sinks + exact local window, merged via lse",
)
