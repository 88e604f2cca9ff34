"""What every adapter shares: the per-layer runtime that decides between the method and exact attention,
capture of attention inputs, and the adapter protocol (masks: :mod:`hf_sparse_attn.patches.masks`).

An adapter (one per architecture family) knows where a model's attention layers are, how to read their Q/K
weights for the ranking, and how to describe each attention call (:class:`AttentionCall`: shapes, mask form,
flags) and route it through :class:`LayerRuntime`. It decides nothing and never does attention math itself:
``LayerRuntime.decide`` is the one place where a call is given to the method or to exact attention (the order of its
rules: :mod:`hf_sparse_attn.patches.reasons`); the runtime then calls the method (tensors in, tensors out) or hands
back to the model's own exact attention.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import json
import weakref
from typing import Any, Optional, Protocol

import torch

from ..methods.common import expand_kv_heads
from ..kernels import needs_grad
from ..methods.decode import get_decode_spec
from ..methods.registry import get_spec
from .compiled import attend_compiled
from .static_index import StaticIndexes
from .reasons import (DECODE_COMPILE_REASON, DECODE_REASON, DROPOUT_REASON, FULL_MASK_REASON, NO_GRADIENT_REASON,
                      NO_INDEXED_CACHE_REASON, OUTPUT_ATTENTIONS_REASON, UNSUPPORTED_INPUT_REASON, min_seq_len_reason)


@dataclasses.dataclass
class CapturedAttention:
    """The inputs of one attention call, exactly as the model attends with them (after RoPE).

    query [B, H, Nq, D], key / value [B, Hkv, Nk, D] (KV heads not expanded), key_padding_mask [B, Nk] bool
    (True = attend) or None, causal: whether query i sees only keys j <= i. ``attend_mask`` [B, 1, Nq, Nk] bool is
    kept only when the mask is not of the causal + key-padding form.
    """

    layer_idx: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scale: float
    causal: bool
    key_padding_mask: Optional[torch.Tensor]
    attend_mask: Optional[torch.Tensor] = None


@dataclasses.dataclass
class QKWeights:
    """The Q/K projection of one attention layer, as the weight-norm ranking needs it.

    w_q [H, D, hidden], w_k [Hkv, D, hidden] (rows: head dims; columns: the normalized input), norm_gain [hidden]
    (the gain of the normalization whose output feeds the attention) or None where there is none to fold.
    """

    w_q: torch.Tensor
    w_k: torch.Tensor
    norm_gain: Optional[torch.Tensor]
    norm_name: str = ""


class Adapter(Protocol):
    """The protocol an architecture adapter follows (see docs/adapters.md)."""

    name: str
    # True when the model keeps its KV cache in transformers' Cache objects, so that generation_cache(model) may hand
    # it a GrowingCache (absent: False, the model's own cache serves; decode methods without an index still run)
    uses_transformers_cache: bool

    def matches(self, model: torch.nn.Module) -> bool: ...

    def attention_layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The attention modules, in layer order (index = layer_idx)."""

    def qk_weights(self, model: torch.nn.Module, layer_idx: int) -> QKWeights: ...

    def install(self, model: torch.nn.Module, runtimes: list["LayerRuntime"]) -> Any:
        """Route every attention layer through its runtime; return what ``uninstall`` needs to undo it exactly."""

    def uninstall(self, model: torch.nn.Module, token: Any) -> None: ...


_COUNT_LOCK = threading.Lock()


def _count_lock():
    """The counters' lock; none while torch.compile traces (Dynamo cannot trace a lock, and replays the counter
    updates of the compiled code as plain Python side effects after each call)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else _COUNT_LOCK


# What kind of call an attention call is (AttentionCall.kind).
PREFILL = "prefill"  # self-attention over a whole sequence (q_len == kv_len): the calls a method serves
DECODE = "decode"  # a few queries (q_len <= DECODE_MAX_QUERIES) against a longer KV cache
CHUNKED_PREFILL = "chunked_prefill"  # more queries than a decode step against a cache (a prompt fed in chunks)
CROSS_ATTENTION = "cross_attention"  # queries of one sequence, keys of another
# A decode step feeds one token; speculative decoding verifies a handful of drafted ones. More queries than this
# against a cache are a prompt fed in chunks.
DECODE_MAX_QUERIES = 16

# Which path serves a call (Decision.path).
SERVE_METHOD = "method"  # the layer's prefill method
SERVE_DECODE = "decode"  # the layer's decode method, over the KV cache
SERVE_CHUNK = "chunk"  # the layer's prefill method, for a prompt chunk against the KV cache (MethodSpec.chunk_fn)
SERVE_EXACT = "exact"  # the model's own attention


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """What an adapter knows about one attention call, before anything is decided: shapes and flags, no tensors.

    The tensors it describes: query [batch, num_heads, q_len, head_dim], key / value [batch, num_kv_heads, L,
    head_dim] of which the first ``kv_len`` positions are valid (L > kv_len only for a preallocated cache, e.g. a
    ``StaticCache``). ``mask_recognized``: the mask is None or causal + key padding (the only forms a method honours).
    ``unsupported_inputs``: names of inputs of the call no method honours (``"position_bias"``, ``"softcap"``,
    ``"sliding_window"``). Build one with :func:`describe_call`.
    """

    batch: int
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    scale: float
    causal: bool
    mask_recognized: bool = True
    output_attentions: bool = False
    dropout_in_training: bool = False
    needs_grad: bool = False
    cross_attention: bool = False
    unsupported_inputs: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        """PREFILL, DECODE, CHUNKED_PREFILL or CROSS_ATTENTION. A self-attention call with q_len != kv_len reads a
        KV cache (the keys of earlier steps, or the empty slots of a preallocated cache)."""
        if self.cross_attention:
            return CROSS_ATTENTION
        if self.q_len == self.kv_len:
            return PREFILL
        if self.q_len < self.kv_len and self.q_len <= DECODE_MAX_QUERIES:
            return DECODE
        return CHUNKED_PREFILL


def describe_call(
    query: torch.Tensor,
    key: torch.Tensor,
    value: Optional[torch.Tensor] = None,
    *,
    scale: float,
    causal: bool,
    mask_recognized: bool = True,
    output_attentions: bool = False,
    dropout_in_training: bool = False,
    cross_attention: bool = False,
    unsupported_inputs: tuple[str, ...] = (),
    kv_len: Optional[int] = None,
) -> AttentionCall:
    """The :class:`AttentionCall` of query [B, H, Nq, D], key / value [B, Hkv, L, D] (KV heads not expanded), of which
    the first ``kv_len`` positions are valid (default: all L); ``needs_grad`` is read off the tensors (autograd
    recording and one of them requiring a gradient)."""
    batch, num_heads, q_len, head_dim = query.shape
    return AttentionCall(
        batch=batch, num_heads=num_heads, num_kv_heads=key.shape[1], q_len=q_len,
        kv_len=key.shape[2] if kv_len is None else int(kv_len),
        head_dim=head_dim, scale=float(scale), causal=bool(causal), mask_recognized=bool(mask_recognized),
        output_attentions=bool(output_attentions), dropout_in_training=bool(dropout_in_training),
        needs_grad=needs_grad(query, key, value), cross_attention=bool(cross_attention),
        unsupported_inputs=tuple(unsupported_inputs),
    )


@dataclasses.dataclass(frozen=True)
class Decision:
    """Which path serves one call: ``path`` SERVE_METHOD, SERVE_CHUNK, SERVE_DECODE or SERVE_EXACT, and for SERVE_EXACT the
    ``reason`` the plan counts (None where the layer has no method for that kind of call: nothing to count)."""

    path: str
    reason: Optional[str] = None


def exact_reason(call: AttentionCall, *, min_seq_len: int = 0, supports_grad: bool = True,
                 serves_cache: bool = False) -> Optional[str]:
    """The rules every method shares, in their one fixed order (patches/reasons.py lists them): the reason ``call``
    must run exact attention, or None when the method's own check decides. ``min_seq_len``: the prefill method's
    declared threshold (``MethodSpec.min_seq_len``); ``supports_grad``: whether the method that would serve the call
    has a backward; ``serves_cache``: the layer has a decode method for decode steps and chunked prefills (calls
    against a KV cache)."""
    if call.output_attentions:
        return OUTPUT_ATTENTIONS_REASON
    if call.dropout_in_training:
        return DROPOUT_REASON
    against_cache = call.kind in (DECODE, CHUNKED_PREFILL)
    if call.kind != PREFILL and not (against_cache and serves_cache):
        return DECODE_REASON
    if not call.mask_recognized:
        return FULL_MASK_REASON
    if call.unsupported_inputs:
        return UNSUPPORTED_INPUT_REASON
    if not against_cache and call.kv_len < min_seq_len:
        return min_seq_len_reason(min_seq_len)
    if call.needs_grad and not supports_grad:
        return NO_GRADIENT_REASON  # exact attention: its backward is autograd's own
    return None


_RUNTIMES: "weakref.WeakValueDictionary[int, LayerRuntime]" = weakref.WeakValueDictionary()
_RUNTIME_TOKENS = itertools.count()


def runtime_of_token(token: int) -> "LayerRuntime":
    """The live :class:`LayerRuntime` whose ``token`` is ``token`` (how a compiled graph names a layer's runtime:
    compiled_cache.py)."""
    runtime = _RUNTIMES.get(int(token))
    if runtime is None:
        raise RuntimeError(f"no patched layer has runtime token {token}: the model was unpatched after this graph was "
                           "compiled; compile it again (torch._dynamo.reset())")
    return runtime


class LayerRuntime:
    """One attention layer at run time: its prefill method and its decode method (either may be None: not chosen),
    its counters, an optional capture list.

    ``decide(call, ...)`` is the one place where a call is given to a method or to exact attention; ``attend(...)``
    applies it: the method's output [B, H, Nq, D], or None when the call must run exact attention — then the reason
    is counted in the layer's plan entry. Prefill calls (self-attention over the whole sequence) go to the prefill
    method; chunked prefills (a prompt fed in chunks against a KV cache) to the prefill method when it serves chunks
    (``MethodSpec.chunk_fn``; exact attention where its prefill would run exact), else with decode steps to the
    decode method (methods/decode.py).
    """

    def __init__(self, layer_idx: int, method: Optional[str], params: dict[str, Any], seed: int, layer_plan: Any = None,
                 decode_method: Optional[str] = None, decode_params: Optional[dict[str, Any]] = None):
        self.layer_idx = layer_idx
        self.method = method
        self.params = dict(params)
        self.seed = seed
        self.layer_plan = layer_plan  # a plan.LayerPlan whose counters we update, or None
        self.previous_implementation = "sdpa"  # set by the adapter: what the layer ran before patching
        self.capture: Optional[list[CapturedAttention]] = None
        self.token = next(_RUNTIME_TOKENS)  # names this runtime inside a compiled graph (compiled_cache.py)
        _RUNTIMES[self.token] = self
        if method is not None:
            self._spec = get_spec(method)
            self._fn = self._spec.fn
            self._min_seq_len = self._spec.min_seq_len(self.params)
            self._params_json = json.dumps(self.params, sort_keys=True)  # for the compiled path (compiled.py)
        self.decode_method = decode_method
        self.decode_params: dict[str, Any] = {}
        if decode_method is not None:
            self._decode_spec = get_decode_spec(decode_method)
            self.decode_params = self._decode_spec.resolve_params(dict(decode_params or {}))
            self._decode_fn = self._decode_spec.fn
            self._index_slot = (decode_method, json.dumps(self.decode_params, sort_keys=True))
            self._static_indexes = StaticIndexes()  # the index of a StaticCache's buffer (static_index.py)

    @property
    def active(self) -> bool:
        """Whether the layer has a method for some kind of call (else every call runs the model's own attention)."""
        return self.method is not None or self.decode_method is not None

    # -- the counters live in the layer's plan entry (a runtime with a method always has one) --
    # (under a lock: one patched model may be called from several threads at once)
    def _count_fallback(self, reason: str, against_cache: bool = False) -> None:
        """One call that ran exact attention, under ``reason``: a prefill call, or (``against_cache``) a decode step
        or chunked prefill (``LayerPlan.decode_fallbacks``)."""
        if self.layer_plan is not None:
            counts = self.layer_plan.decode_fallbacks if against_cache else self.layer_plan.fallbacks
            with _count_lock():
                counts[reason] = counts.get(reason, 0) + 1

    def _count_served(self) -> None:
        if self.layer_plan is not None:
            with _count_lock():
                self.layer_plan.served += 1

    def _count_decode_served(self) -> None:
        if self.layer_plan is not None:
            with _count_lock():
                self.layer_plan.decode_served += 1

    def generator_seed(self) -> int:
        return self.seed * 1_000_003 + self.layer_idx

    def generator(self, device: torch.device) -> torch.Generator:
        """A generator seeded from the plan seed and the layer index alone, so a recompute under gradient
        checkpointing hashes and samples exactly as the first pass did."""
        return torch.Generator(device=device).manual_seed(self.generator_seed())

    def record(self, query, key, value, scale, causal, key_padding_mask, attend_mask=None) -> None:
        if self.capture is not None:
            self.capture.append(CapturedAttention(
                self.layer_idx, query.detach(), key.detach(), value.detach(), float(scale), bool(causal),
                None if key_padding_mask is None else key_padding_mask.detach(),
                None if attend_mask is None else attend_mask.detach(),
            ))

    def decide(
        self,
        call: AttentionCall,
        query: Optional[torch.Tensor] = None,
        key: Optional[torch.Tensor] = None,
        key_padding_mask: Optional[torch.Tensor] = None,
    ) -> Decision:
        """Which path serves ``call``: the rules every method shares in their fixed order (:func:`exact_reason`),
        then the serving method's own check — for a prefill call the prefill method's check, only when ``query``
        [B, H, Nq, D] and ``key`` [B, H, Nk, D] (KV heads expanded) are given, since it may read them; for a call
        against a cache, that decode steps do not run under torch.compile. Counts nothing."""
        against_cache = call.kind in (DECODE, CHUNKED_PREFILL)
        if call.kind == CHUNKED_PREFILL and self.method is not None and self._spec.chunk_fn is not None:
            return self._chunk_decision(call)
        if against_cache and self.decode_method is not None:
            reason = exact_reason(call, supports_grad=False, serves_cache=True)  # decode methods have no backward
            if reason is None and torch.compiler.is_compiling():
                reason = DECODE_COMPILE_REASON
            return Decision(SERVE_EXACT, reason) if reason else Decision(SERVE_DECODE)
        if self.method is None:
            return Decision(SERVE_EXACT)
        reason = exact_reason(call, min_seq_len=self._min_seq_len, supports_grad=self._spec.supports_grad)
        if reason is None and query is not None and key is not None:
            reason = self._spec.why_not(query, key, call.causal, key_padding_mask, self.params, call.scale)
        return Decision(SERVE_EXACT, reason) if reason else Decision(SERVE_METHOD)

    def _chunk_decision(self, call: AttentionCall) -> Decision:
        """A chunked prefill in a layer whose prefill method serves chunks (``MethodSpec.chunk_fn``): served as the
        method would serve the whole prompt up to the chunk's end: by the method, or by exact attention where the
        shared rules say so (no backward), below the method's ``min_seq_len`` (where its prefill runs exact too) or
        under torch.compile (the chunk functions read data-dependent sizes)."""
        reason = exact_reason(call, supports_grad=False, serves_cache=True)
        if reason is None and call.kv_len < self._min_seq_len:
            reason = min_seq_len_reason(self._min_seq_len)
        if reason is None and torch.compiler.is_compiling():
            reason = DECODE_COMPILE_REASON
        return Decision(SERVE_EXACT, reason) if reason else Decision(SERVE_CHUNK)

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        scale: float,
        causal: bool,
        key_padding_mask: Optional[torch.Tensor],
        call: Optional[AttentionCall] = None,
        traced: bool = False,
    ) -> Optional[torch.Tensor]:
        """query [B, H, Nq, D], key/value [B, Hkv, L, D] (the first ``call.kv_len`` positions valid),
        key_padding_mask [B, kv_len] bool or None. ``call``: the adapter's description of the call
        (:func:`describe_call`); None describes plain self-attention with this mask. ``traced``: the call comes from
        a compiled graph's operator (compiled_cache.py), whose keys lead to no GrowingCache layer. Returns the
        method's output [B, H, Nq, D], or None (exact attention; the reason is counted)."""
        if not self.active:
            return None
        if call is None:
            call = describe_call(query, key, value, scale=scale, causal=causal)
        decision = self.decide(call)  # the shared rules first: no KV-head expansion for a call that runs exact
        if decision.path == SERVE_DECODE:
            return self._attend_cache(query, key, value, call, key_padding_mask, traced)
        if self.decode_method is not None and not torch.compiler.is_compiling():
            self._static_indexes.forget(key)  # this call writes the cache without its index
        if decision.path == SERVE_CHUNK:
            out, _lse = self._spec.chunk_fn(query, key, value, scale=call.scale, kv_len=call.kv_len,
                                            key_padding_mask=key_padding_mask, **self.params)
            self._count_served()
            return out
        if decision.path == SERVE_METHOD:
            if key.shape[2] != call.kv_len:  # a prefill into a preallocated cache: its valid positions only
                key, value = key[:, :, :call.kv_len].contiguous(), value[:, :, :call.kv_len].contiguous()
            groups = query.shape[1] // key.shape[1]
            key = expand_kv_heads(key, groups)
            value = expand_kv_heads(value, groups)
            reason = self._spec.why_not(query, key, call.causal, key_padding_mask, self.params, call.scale)
            if reason:  # the shared rules passed above: only the method's own check is left
                decision = Decision(SERVE_EXACT, reason)
        if decision.path != SERVE_METHOD:
            if decision.reason is not None:
                self._count_fallback(decision.reason, against_cache=call.kind in (DECODE, CHUNKED_PREFILL))
            return None
        if torch.compiler.is_compiling():  # a Generator cannot be traced: one opaque operator, same seed (compiled.py)
            out = attend_compiled(self.method, self._params_json, self.generator_seed(), query, key, value,
                                  causal=causal, scale=scale, key_padding_mask=key_padding_mask)
        else:
            out, _lse = self._fn(
                query, key, value, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                generator=self.generator(query.device), **self.params,
            )
        self._count_served()
        return out

    def _attend_cache(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: AttentionCall,
                      key_padding_mask: Optional[torch.Tensor], traced: bool = False) -> Optional[torch.Tensor]:
        """The decode method over the cache: query [B, H, Nq, D], key / value [B, Hkv, L, D] (grouped heads, first
        call.kv_len valid). A method with an index (``lsh``, ``quest``) finds it on the cache layer (decode_cache.py)
        or, for a StaticCache, here (static_index.py), and brings it up to date; for keys of another cache the call
        runs exact attention, counted (the compile reason for a compiled graph's call, ``traced``)."""
        index = None
        if self._decode_spec.uses_index:
            index = self._cache_index(key, call, key_padding_mask)
            if index is None:
                self._count_fallback(DECODE_COMPILE_REASON if traced else NO_INDEXED_CACHE_REASON, against_cache=True)
                return None
        out, _lse = self._decode_fn(query, key, value, scale=call.scale, kv_len=call.kv_len,
                                    key_padding_mask=key_padding_mask, index=index, **self.decode_params)
        self._count_decode_served()
        return out

    def _cache_index(self, key: torch.Tensor, call: AttentionCall, key_padding_mask: Optional[torch.Tensor]) -> Any:
        """The decode method's index of this layer's cached keys, kept on the cache layer (GrowingCache) or, for a
        preallocated cache (StaticCache), by this runtime (static_index.py), and describing positions [0, kv_len) on
        return: built over the positions before this call's queries the first time, then extended by the keys each
        call brings. None for keys of any other cache (a DynamicCache, or a GrowingCache under torch.compile)."""
        from .decode_cache import cache_layer_of

        layer = cache_layer_of(key)
        if layer is None:
            return self._static_indexes.index(
                key, call.kv_len, call.q_len, key_padding_mask,
                lambda k, n, mask: self._decode_spec.build_index(k, n, mask, **self.decode_params))
        if layer.get_seq_length() != call.kv_len:
            return None
        prior = call.kv_len - call.q_len
        index = layer.decode_indexes.get(self._index_slot)
        if index is None or not (index.matches(prior, call.batch) or index.matches(call.kv_len, call.batch)):
            mask = None if key_padding_mask is None else key_padding_mask[:, :prior]
            index = self._decode_spec.build_index(key, prior, mask, **self.decode_params)
            layer.decode_indexes[self._index_slot] = index
        if index.length == prior:
            index.append(key[:, :, prior:call.kv_len])
        return index
