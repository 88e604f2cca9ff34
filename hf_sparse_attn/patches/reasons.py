"""Why a patched layer ran exact attention instead of its method: one wording per reason, shared by every adapter and
the runtime's decision (:meth:`hf_sparse_attn.patches.base.LayerRuntime.decide`). A plan counts its fallbacks under
these words (``LayerPlan.fallbacks``), so they are part of what a saved plan says: change one only on purpose.

The rules that give them, in the order the decision applies them (the first that holds wins):

1. ``OUTPUT_ATTENTIONS_REASON``   the caller asked for the attention weights
2. ``DROPOUT_REASON``             attention dropout while training
3. ``DECODE_REASON``              not self-attention over a whole sequence: cross-attention, or a decode step
                                  or a chunked prefill against a KV cache in a layer without a decode method
4. ``FULL_MASK_REASON``           a mask that is neither None nor causal + key padding
5. ``UNSUPPORTED_INPUT_REASON``   a position bias, logit softcapping or a sliding window handed to the call
6. ``min_seq_len_reason(n)``      fewer keys than the method's declared threshold
7. ``NO_GRADIENT_REASON``         autograd needs a gradient the method cannot give
8. the method's own ``check``     its own words (``MethodSpec.why_not``)

For calls against a KV cache served by a decode method, rule 6 does not apply, rule 7 always holds when a gradient is
needed (decode methods have no backward), and the decode path adds:

- ``DECODE_COMPILE_REASON``       the call is traced by torch.compile and its decode method cannot serve it there: an
                                  index kept with a cache other than a StaticCache (a GrowingCache's layer is not
                                  reached from a compiled graph), or a call traced outside the run-time operator of
                                  compiled_cache.py (e.g. while attention is captured)
- ``NO_INDEXED_CACHE_REASON``     the decode method keeps an index with the cache, and the cache keeps none (neither a
                                  GrowingCache nor a preallocated StaticCache)
"""

from __future__ import annotations

from ..methods.registry import NO_GRADIENT_REASON, NOT_SELF_ATTENTION_REASON

OUTPUT_ATTENTIONS_REASON = "output_attentions=True"
DROPOUT_REASON = "attention dropout in training"
DECODE_REASON = NOT_SELF_ATTENTION_REASON
FULL_MASK_REASON = "mask is not causal + key padding (sliding window, packed sequences or a custom mask)"
UNSUPPORTED_INPUT_REASON = "position bias / softcap / sliding window"
DECODE_COMPILE_REASON = ("decode step under torch.compile without an index (compiled, this decode method reads its "
                         "index from a StaticCache only: generate(..., cache_implementation=\"static\"))")
NO_INDEXED_CACHE_REASON = ("the decode method keeps an index with the KV cache: pass "
                           "past_key_values=hf_sparse_attn.GrowingCache(model.config), or use a StaticCache")


def min_seq_len_reason(min_seq_len: int) -> str:
    """The reason for a call with fewer keys than ``min_seq_len``."""
    return f"seq_len < min_seq_len={min_seq_len}"


__all__ = [
    "DECODE_COMPILE_REASON", "DECODE_REASON", "DROPOUT_REASON", "NO_INDEXED_CACHE_REASON", "FULL_MASK_REASON", "NO_GRADIENT_REASON", "OUTPUT_ATTENTIONS_REASON",
    "UNSUPPORTED_INPUT_REASON", "min_seq_len_reason",
]
