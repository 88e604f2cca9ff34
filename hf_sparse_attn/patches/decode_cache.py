"""A KV cache for ``generate()`` that appends without copying the cached tokens: :class:`GrowingCache`.

transformers' ``DynamicCache`` appends each step's keys and values with ``torch.cat``, a copy of the layer's whole
cache per decode step (one thread, SmolLM2's shapes: 0.56 ms per layer at 8k, 3.2 ms at 32k; docs/methods/decode.md).
:class:`GrowingCache` stores each layer's keys and values in a preallocated buffer
(:class:`hf_sparse_attn.methods.kv_buffer.KVBuffer`) whose capacity doubles when an append does not fit: ``n`` one-token
appends copy O(n) elements in all (amortised O(1) per step) instead of O(n^2), and the keys / values handed to
attention are views of the buffer (no copy).

```python
from hf_sparse_attn.decode_cache import GrowingCache
out = model.generate(**inputs, past_key_values=GrowingCache(model.config), max_new_tokens=64)
```

It is a ``DynamicCache`` (subclass) whose full-attention layers are :class:`GrowingLayer`: greedy and sampled
decoding, batches with left padding, beam search (``reorder_cache``), ``crop``, ``batch_select_indices`` and
``batch_repeat_interleave`` give what ``DynamicCache`` gives (tests/test_decode_cache.py compares them bit for bit).
Layers of other kinds (sliding-window layers, whose cache is bounded by the window) keep transformers' own layer.
Works with transformers 5.0 through 5.25 (the layer API changed between them: ``get_mask_sizes`` takes the cache
positions in 5.0 and the query length later; ``crop`` keeps its caller's convention, being transformers' own).

A layer also keeps the index a decode method builds over its keys (``GrowingLayer.decode_indexes``: the ``lsh`` decode
method's :class:`~hf_sparse_attn.methods.decode_index.DecodeIndex`), so the index lives and dies with the cache and
follows its ``crop``, beam reorders and batch selections; a ``reset`` drops it. The patched attention finds the layer
from the keys it is handed (:func:`cache_layer_of`).

Memory: up to ``growth`` times the cached tokens (the spare capacity after a doubling); pass
``max_cache_len`` (prompt + new tokens) to allocate once. Tensors returned by an earlier ``update`` are views of the
buffer: after a ``crop``, later appends overwrite the positions they showed beyond the cropped length.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Optional

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..methods.kv_buffer import KVBuffer


class GrowingLayer(DynamicLayer):
    """One layer's keys and values, ``[B, Hkv, L, D]`` each, in a buffer that grows by doubling.

    ``keys`` / ``values`` are views of the first ``L`` positions of the buffer (``buffer.key_storage`` /
    ``buffer.value_storage`` are the whole preallocated tensors, capacity >= L along dim 2).
    """

    def __init__(self, max_cache_len: Optional[int] = None, growth: float = 2.0, **kwargs: Any):
        """``max_cache_len``: positions reserved at the first update (default: the first update's length);
        ``growth``: capacity factor when an append does not fit (> 1)."""
        super().__init__()
        if growth <= 1.0:
            raise ValueError(f"growth must be > 1, got {growth}")
        self.max_cache_len = None if max_cache_len is None else int(max_cache_len)
        self.growth = float(growth)
        self.buffer: Optional[KVBuffer] = None
        self.decode_indexes: dict[Any, Any] = {}  # a decode method's index over these keys (DecodeIndex), by method

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Record dtype and device; the buffer is allocated by the first update that brings positions."""
        self.dtype, self.device = key_states.dtype, key_states.device
        self.buffer = None
        self.keys, self.values = key_states[:, :, :0], value_states[:, :, :0]
        self.is_initialized = True

    def _sync(self) -> None:
        self.keys, self.values = self.buffer.keys, self.buffer.values
        self._tag()

    def _tag(self) -> None:
        """Mark the keys view handed to attention as this layer's (:func:`cache_layer_of`)."""
        self.keys._hf_sparse_attn_cache_layer = weakref.ref(self)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key_states [B, Hkv, A, D] / value_states [B, Hkv, A, Dv]; returns the (keys, values) views
        [B, Hkv, L, D] of every cached position (no copy of the earlier ones unless the buffer had to grow)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.buffer is None:  # one allocation of max(A, max_cache_len) positions
            self.buffer = KVBuffer(key_states, value_states, capacity=self.max_cache_len or 0, growth=self.growth)
            self._sync()
        else:
            self.keys, self.values = self.buffer.append(key_states, value_states)
            self._tag()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0 if self.buffer is None else self.buffer.length

    def get_mask_sizes(self, query: Any) -> tuple[int, int]:
        """(kv_length, kv_offset) for the mask of the next call: ``query`` is its length (transformers >= 5.1) or its
        cache positions [q_len] (5.0)."""
        q_len = query.shape[0] if isinstance(query, torch.Tensor) else int(query)
        return self.get_seq_length() + q_len, 0

    @property
    def capacity(self) -> int:
        """Positions the buffer holds without growing (0 before the first update)."""
        return 0 if self.buffer is None else self.buffer.capacity

    def crop(self, length: int) -> None:
        """transformers' ``DynamicLayer.crop`` of the installed version (its argument's meaning changed between
        releases), done on views of the buffer: no copy."""
        if self.buffer is None:
            return
        super().crop(length)  # slices self.keys / self.values
        self.buffer.crop(self.keys.shape[-2])
        self._sync()
        for index in self.decode_indexes.values():
            if index.length > self.buffer.length:
                index.crop(self.buffer.length)

    def _select_batch(self, index: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self.buffer.reorder(index.to(self.buffer.key_storage.device))
            self._sync()
            for decode_index in self.decode_indexes.values():
                decode_index.reorder(index)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: batch row i becomes row ``beam_idx[i]``."""
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch rows ``indices`` (integer indices or a boolean mask over the rows)."""
        indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times in place (row order 0, 0, ..., 1, 1, ...)."""
        if self.get_seq_length() > 0:
            self._select_batch(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))

    def reset(self) -> None:
        """Drop the buffer; the next update starts afresh."""
        self.buffer = None
        self.keys = self.values = None
        self.is_initialized = False
        self.decode_indexes = {}

    def offload(self) -> None:
        raise NotImplementedError("GrowingCache does not offload layers; use DynamicCache(offloading=True)")

    def prefetch(self) -> None:
        raise NotImplementedError("GrowingCache does not offload layers; use DynamicCache(offloading=True)")


def cache_layer_of(keys: torch.Tensor) -> Optional[GrowingLayer]:
    """The :class:`GrowingLayer` whose ``update`` returned ``keys`` (the [B, Hkv, L, D] view handed to attention), or
    None for keys of any other cache (or of a layer that no longer exists)."""
    ref = getattr(keys, "_hf_sparse_attn_cache_layer", None)
    return None if ref is None else ref()


def cache_keyword(model: torch.nn.Module) -> str:
    """The keyword a model's forward and ``generate`` take the KV cache by: ``cache`` (transformers releases after
    5.x renamed it; ``past_key_values`` still works there with a FutureWarning) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` whose full-attention layers append into buffers that grow by doubling (:class:`GrowingLayer`)
    instead of ``torch.cat`` (a copy of the whole layer per step).

    ``GrowingCache(model.config)`` (or ``GrowingCache()``: layers made as they are first updated, all of them
    :class:`GrowingLayer`); pass it as ``model.generate(..., past_key_values=cache)`` or to a forward.
    """

    def __init__(self, config: Any = None, *, max_cache_len: Optional[int] = None, growth: float = 2.0):
        """``config``: the model's config (layer kinds from it, as ``DynamicCache(config=...)``); ``max_cache_len``:
        positions to reserve per layer at the first update (e.g. prompt + max_new_tokens; default: grow as needed);
        ``growth``: capacity factor of a buffer that is full (> 1)."""
        make = functools.partial(GrowingLayer, max_cache_len=max_cache_len, growth=growth)
        make()  # validates growth before anything is built
        super().__init__(config=config)
        if self.layer_class_to_replicate is not None:  # no config: layers appear on their first update
            self.layer_class_to_replicate = make
        self.layers = [make() if type(layer) is DynamicLayer else layer for layer in self.layers]
