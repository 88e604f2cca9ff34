"""What every adapter shares: the per-layer runtime that decides between the method and exact attention,
capture of attention inputs, and the adapter protocol (masks: :mod:`hf_sparse_attn.patches.masks`).

An adapter (one per architecture family) knows where a model's attention layers are, how to read their Q/K
weights for the ranking, and how to route a layer's attention call through :class:`LayerRuntime`. It never does
attention math itself; the runtime calls the method (tensors in, tensors out) or hands back to the model's own
exact attention.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import json
from typing import Any, Optional, Protocol

import torch

from ..methods.common import expand_kv_heads
from ..methods.registry import NO_GRADIENT_REASON, get_spec, needs_grad
from .compiled import attend_compiled


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
DECODE_REASON = "q_len != kv_len (decode step, cache or cross-attention)"


class LayerRuntime:
    """One attention layer at run time: its method (or None: not chosen), its counters, an optional capture list.

    ``attend(...)`` returns the method's output [B, H, Nq, D], or None when the call must run exact attention —
    then the reason is counted in the layer's plan entry.
    """

    def __init__(self, layer_idx: int, method: Optional[str], params: dict[str, Any], seed: int, layer_plan: Any = None):
        self.layer_idx = layer_idx
        self.method = method
        self.params = dict(params)
        self.seed = seed
        self.layer_plan = layer_plan  # a plan.LayerPlan whose counters we update, or None
        self.previous_implementation = "sdpa"  # set by the adapter: what the layer ran before patching
        self.capture: Optional[list[CapturedAttention]] = None
        if method is not None:
            self._spec = get_spec(method)
            self._fn = self._spec.fn
            self._min_seq_len = int(self.params.get("min_seq_len", 0) or 0)
            self._params_json = json.dumps(self.params, sort_keys=True)  # for the compiled path (compiled.py)

    # -- the counters live in the layer's plan entry (a runtime with a method always has one) --
    # (under a lock: one patched model may be called from several threads at once)
    def _count_fallback(self, reason: str) -> None:
        if self.layer_plan is not None:
            with _count_lock():
                self.layer_plan.fallbacks[reason] = self.layer_plan.fallbacks.get(reason, 0) + 1

    def _count_served(self) -> None:
        if self.layer_plan is not None:
            with _count_lock():
                self.layer_plan.served += 1

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

    def attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        scale: float,
        causal: bool,
        key_padding_mask: Optional[torch.Tensor],
        unsupported: Optional[str] = None,
    ) -> Optional[torch.Tensor]:
        """query [B, H, Nq, D], key/value [B, Hkv, Nk, D]. ``unsupported``: a reason the adapter already found
        (decode step, output_attentions, a mask of another form, dropout) -> exact attention."""
        if self.method is None:
            return None
        if unsupported is not None:
            self._count_fallback(unsupported)
            return None
        n_query, n_key = query.shape[2], key.shape[2]
        if n_query != n_key:
            self._count_fallback(DECODE_REASON)
            return None
        if n_key < self._min_seq_len:
            self._count_fallback(f"seq_len < min_seq_len={self._min_seq_len}")
            return None
        if not self._spec.supports_grad and needs_grad(query, key, value):
            self._count_fallback(NO_GRADIENT_REASON)  # exact attention: its backward is autograd's own
            return None
        groups = query.shape[1] // key.shape[1]
        key = expand_kv_heads(key, groups)
        value = expand_kv_heads(value, groups)
        reason = self._spec.why_not(query, key, causal, key_padding_mask, self.params, scale)
        if reason:
            self._count_fallback(reason)
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
