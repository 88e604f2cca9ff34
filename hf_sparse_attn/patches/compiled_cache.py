"""Calls against a KV cache under ``torch.compile``: one opaque operator that decides and attends at run time.

A decode step (or a chunk of a prompt fed against a cache) cannot be traced the way a prefill is: which positions of
the cache are valid and which keys are padding must be read off the mask's values (decode_step.py), and the decode
methods read data-dependent sizes and keep Python state on the cache (an index). While torch.compile traces, the
attention-interface adapter therefore hands such a call to the custom operator ``hf_sparse_attn::attend_cache``:
Dynamo sees one node of known output shape, and at run time the operator does what the eager path does — the mask
reduced to key padding, the layer's decision and counters (``LayerRuntime.attend``: its decode method, its chunk
function, or a counted fallback), and, where the runtime declines the call, exact attention with the call's own mask
(what transformers' ``sdpa`` attention computes). Compiled and eager steps give the same outputs and the same counts,
with no graph break. A ``StaticCache`` keeps every shape fixed from step to step, so one graph serves every step.
Decode methods that keep an index with the cache (``lsh``, ``quest``) serve a ``StaticCache``: inductor writes its
update in place, so the operator gets the buffer whose index the layer's runtime keeps (static_index.py). A
``GrowingCache``'s keys reach the operator without their cache layer: those calls run exact attention, counted
(reasons.DECODE_COMPILE_REASON).

The operator names the layer's runtime by its integer token (``LayerRuntime.token``; a graph cannot hold the Python
object). It has no backward: the adapter takes this route only where no input needs a gradient (a call against a
cache under autograd runs exact attention, traced as before).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels import needs_grad
from .base import describe_call, runtime_of_token
from .decode_step import decode_mask_of_call


def exact_against_cache(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Optional[torch.Tensor], *, causal: bool, scale: float) -> torch.Tensor:
    """Exact attention of query [B, H, Nq, D] over key / value [B, Hkv, L, D] with transformers' mask of the call
    (None, or the dense [B, 1, Nq, L] bool mask, True = attend) -> [B, H, Nq, Dv]: ``sdpa``'s computation."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, is_causal=causal and attention_mask is None, scale=scale)


@torch.library.custom_op("hf_sparse_attn::attend_cache", mutates_args=())
def attend_cache_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Optional[torch.Tensor], causal: bool, scale: float, runtime_token: int,
                    cross_attention: bool, unsupported_inputs: str) -> torch.Tensor:
    """query [B, H, Nq, D], key / value [B, Hkv, L, D] (the cache, KV heads grouped), attention_mask None or
    [B, 1, Nq, L] bool -> out [B, H, Nq, Dv] in query's dtype. ``unsupported_inputs``: comma-separated names."""
    runtime = runtime_of_token(runtime_token)
    recognized, key_padding_mask, valid = decode_mask_of_call(attention_mask, query.shape[2], key.shape[2], causal)
    call = describe_call(query, key, value, scale=scale, causal=causal, mask_recognized=recognized,
                         cross_attention=cross_attention,
                         unsupported_inputs=tuple(n for n in unsupported_inputs.split(",") if n), kv_len=valid)
    out = runtime.attend(query, key, value, scale=scale, causal=causal, key_padding_mask=key_padding_mask, call=call,
                          traced=True)
    if out is None:
        out = exact_against_cache(query, key, value, attention_mask, causal=causal, scale=scale)
    out = out.to(query.dtype)
    inputs = {t.untyped_storage().data_ptr() for t in (query, key, value)}
    if out.untyped_storage().data_ptr() in inputs:  # a custom operator may not return a view of an input
        out = out.clone()
    return out.contiguous()


@attend_cache_op.register_fake
def _(query, key, value, attention_mask, causal, scale, runtime_token, cross_attention, unsupported_inputs):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def goes_to_operator(runtime, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                     dropout_in_training: bool) -> bool:
    """Whether an adapter hands this call to the operator: an active layer's call against a cache (Nq != Nk) while
    torch.compile traces, with nothing the operator does not take (attention captured, dropout in training, inputs
    that need a gradient: the operator has no backward). Every adapter asks this one rule."""
    return (runtime.active and query.shape[2] != key.shape[2] and torch.compiler.is_compiling()
            and runtime.capture is None and not dropout_in_training and not needs_grad(query, key, value))


def attend_cache_compiled(runtime_token: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Optional[torch.Tensor], *, causal: bool, scale: float,
                          cross_attention: bool, unsupported_inputs: tuple[str, ...]) -> torch.Tensor:
    """The layer's output [B, H, Nq, Dv] for a call against a cache, through the operator (used while tracing)."""
    return attend_cache_op(query, key, value, attention_mask, bool(causal), float(scale), int(runtime_token),
                           bool(cross_attention), ",".join(unsupported_inputs))
