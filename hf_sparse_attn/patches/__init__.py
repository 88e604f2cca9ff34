"""Architecture adapters: one per family. ``find_adapter(model)`` picks the one that fits or says how to add one."""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator, Optional, Sequence

import torch

from .attention_interface import AttentionInterfaceAdapter
from .base import Adapter, AttentionCall, CapturedAttention, Decision, LayerRuntime, QKWeights, describe_call
from .chatglm import ChatGLMAdapter
from .masks import split_attend_mask
from .runtime import install_runtimes, state_of, uninstall_runtimes

# Tried in order; ChatGLM first, since its remote code does not use the attention interface.
ADAPTER_CLASSES: list[type] = [ChatGLMAdapter, AttentionInterfaceAdapter]


def register_adapter(adapter_class: type, first: bool = True) -> None:
    """Add an adapter class following :class:`hf_sparse_attn.patches.base.Adapter` (see docs/adapters.md)."""
    if first:
        ADAPTER_CLASSES.insert(0, adapter_class)
    else:
        ADAPTER_CLASSES.append(adapter_class)


def supported_families() -> list[str]:
    return [getattr(cls, "families", cls.__name__) for cls in ADAPTER_CLASSES]


def find_adapter(model: torch.nn.Module, adapter_options: Optional[dict[str, Any]] = None) -> Adapter:
    """The adapter for ``model``; a clear error naming the supported families otherwise."""
    adapter_options = dict(adapter_options or {})
    known = {name for cls in ADAPTER_CLASSES for name in inspect.signature(cls).parameters}
    unknown = sorted(set(adapter_options) - known)
    if unknown:
        raise ValueError(f"unknown adapter option(s) {unknown}; adapter options are: {sorted(known) or '(none)'}")
    for cls in ADAPTER_CLASSES:
        accepted = inspect.signature(cls).parameters
        adapter = cls(**{k: v for k, v in adapter_options.items() if k in accepted})
        if adapter.matches(model):
            return adapter
    raise TypeError(
        f"hf_sparse_attn cannot patch {type(model).__name__}: no adapter recognizes its attention layers. Supported: "
        f"{'; '.join(supported_families())}. To add a family, write an adapter following the protocol in "
        "hf_sparse_attn/patches/base.py (attention_layers, qk_weights, install, uninstall; see docs/adapters.md) and "
        "register it with hf_sparse_attn.patches.register_adapter(MyAdapter)."
    )


@contextlib.contextmanager
def capture_attention(model: torch.nn.Module, layers: Optional[Sequence[int]] = None) -> Iterator[dict[int, list[CapturedAttention]]]:
    """Record the inputs of every attention call of ``layers`` (default: all) while the block runs.

    Yields a dict layer_idx -> list of :class:`CapturedAttention` (query/key/value after RoPE, exactly as the model
    attends). Works on a patched model (capturing what the patched layers receive) and on an unpatched one (it is
    routed through the exact, unchanged path for the duration of the block).
    """
    state = state_of(model)
    temporary = None
    if state is None:
        adapter = find_adapter(model)
        runtimes = [LayerRuntime(i, None, {}, 0) for i in range(len(adapter.attention_layers(model)))]
        temporary = install_runtimes(model, adapter, runtimes)
    else:
        runtimes = state.runtimes
    chosen = range(len(runtimes)) if layers is None else list(layers)
    captured: dict[int, list[CapturedAttention]] = {i: [] for i in chosen}
    for i in chosen:
        runtimes[i].capture = captured[i]
    try:
        yield captured
    finally:
        for runtime in runtimes:
            runtime.capture = None
        if temporary is not None:
            uninstall_runtimes(model, temporary)


__all__ = [
    "Adapter", "AttentionCall", "AttentionInterfaceAdapter", "CapturedAttention", "ChatGLMAdapter", "Decision",
    "LayerRuntime", "QKWeights", "capture_attention", "describe_call", "find_adapter", "register_adapter",
    "split_attend_mask", "supported_families",
]
