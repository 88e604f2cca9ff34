"""Attention sinks (StreamingLLM, Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks"): every
query attends the first ``num_sink_tokens`` keys exactly, apart from the rest of its keys, and the two parts are merged
through their log-sum-exp values (merge.py). Shared by ``hyper``, ``sparse_hyper``, ``local``, ``block_select`` and
``kmv``; docs/methods/hyper.md "Attention sinks".
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels.sorted_blocks_torch import dense_attention_with_lse
from .merge import empty_rows_to_zero, merge_attention_into
from .padding import restore_leading_padding

NEG_INF = float("-inf")


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_sink_tokens: int, causal: bool,
                   scale: float, key_padding_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact attention of every query over the first ``num_sink_tokens`` = S keys (the "attention sinks").

    q [B, H, Nq, D], k/v [B, H, Nk, Dv] (any float dtype) with S <= Nk, key_padding_mask [B, Nk] bool or None.
    Returns out [B, H, Nq, Dv] float32, lse [B, H, Nq] (-inf and out 0 for a row with no attendable sink) and
    counts [B, H, Nq] float32 = number of sinks each query attended.

    One call of torch's fused attention with lse over the S sinks for all queries (O(Nq * S * D), no [Nq, S]
    score matrix kept); causal: the first min(S, Nq) rows, the only ones that may not see every sink, are then
    recomputed with the causal mask among the sinks (query i attends sink j only if j <= i). Padded sinks get
    bias -inf.
    """
    B, H, Nq, D = q.shape
    S = int(num_sink_tokens)
    Dv = v.shape[3]
    device = q.device
    qf = q.float().reshape(B * H, Nq, D)
    ks = k[:, :, :S].float().reshape(B * H, S, D)
    vs = v[:, :, :S].float().reshape(B * H, S, Dv)
    bias = None
    sink_valid = torch.ones(B, S, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        sink_valid = key_padding_mask[:, :S]
        if not bool(sink_valid.all()):
            bias = torch.zeros(B, 1, S, device=device).masked_fill_(~sink_valid[:, None, :], NEG_INF).expand(B, H, S).reshape(B * H, S)
    out, lse = dense_attention_with_lse(qf, ks, vs, scale, bias)  # [B*H, Nq, Dv], [B*H, Nq]: every sink
    counts = sink_valid.float().sum(-1)[:, None].expand(B, Nq)  # [B, Nq]
    if causal:
        head = min(S, Nq)
        out_head, lse_head = dense_attention_with_lse(qf[:, :head], ks[:, :head], vs[:, :head], scale,
                                                      None if bias is None else bias[:, :head], causal=True)
        if torch.is_grad_enabled() and out.requires_grad:  # the fused op keeps its output for backward
            out = torch.cat([out_head, out[:, head:]], dim=1)
            lse = torch.cat([lse_head, lse[:, head:]], dim=1)
        else:
            out[:, :head] = out_head
            lse[:, :head] = lse_head
        counts = torch.cat([sink_valid.float().cumsum(-1)[:, :head], counts[:, head:]], dim=1)
    out = out.view(B, H, Nq, Dv)
    lse = lse.view(B, H, Nq)
    counts = counts[:, None, :].expand(B, H, Nq)
    out, lse = empty_rows_to_zero(out, lse, counts == 0)  # no attendable sink (the fused kernel may leave NaN there)
    return out, lse, counts


def add_sinks_and_restore(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                          num_sinks: int, causal: bool, scale: float, key_padding_mask: Optional[torch.Tensor],
                          shift: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The common tail of the sink-aware methods: the sink part (keys 0..num_sinks-1, :func:`sink_attention`) merged
    into the rest's out [B, H, Nq, Dv] / lse [B, H, Nq] through their lse values, then left padding moved back
    (:func:`restore_leading_padding`; ``shift`` from :func:`leading_padding`, None when nothing was moved).
    q, k, v and key_padding_mask are the (rolled) inputs the rest was computed on."""
    if num_sinks > 0:
        sink_out, sink_lse, _ = sink_attention(q, k, v, num_sink_tokens=num_sinks, causal=causal, scale=scale,
                                               key_padding_mask=key_padding_mask)
        out, lse = merge_attention_into(out, lse, sink_out, sink_lse)
    if shift is not None:
        out, lse = restore_leading_padding(out, lse, shift, k.shape[2], causal)
    return out, lse


def split_sink_keys(k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor], num_sink_tokens: int,
                    causal: bool) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The keys left for the sorted blocks once the first ``num_sink_tokens`` = S keys are attended as sinks.

    k/v [B, H, Nk, D], key_padding_mask [B, Nk] bool or None, 0 <= S <= Nk. Returns (k_rest, v_rest, rest_mask):
      * non-causal: k[:, :, S:], v[:, :, S:] and mask[:, S:] (or None): the sinks are hashed, blocked and sampled
        nowhere and the key blocks are cut from the Nk - S other keys;
      * causal: k, v unchanged and rest_mask [B, Nk] = mask with positions < S set False: the recursion needs the
        keys aligned with the queries, so the sinks become invalid keys (sorted last, masked in their block, never
        sampled; the n of the n/s sample weight counts only the other keys).
    With S = 0 the inputs come back unchanged. Together with :func:`sink_attention` this splits every row's key set
    into two disjoint parts, sinks {j < S} and rest {j >= S}, merged through their lse values (merge.py).
    """
    S = int(num_sink_tokens)
    if S == 0:
        return k, v, key_padding_mask
    if causal:
        not_sink = torch.arange(k.shape[2], device=k.device) >= S
        rest_mask = not_sink[None, :] if key_padding_mask is None else key_padding_mask & not_sink[None, :]
        return k, v, rest_mask.expand(k.shape[0], -1).contiguous()
    return k[:, :, S:], v[:, :, S:], None if key_padding_mask is None else key_padding_mask[:, S:]

