"""The decode index of a preallocated KV cache (transformers' ``StaticCache``), kept by the layer's runtime.

A ``GrowingCache`` layer holds its decode index itself (decode_cache.py), and the keys it hands to attention lead back
to it. A ``StaticCache`` is transformers' own class, and the keys it hands over are its whole preallocated buffer
[B, Hkv, max_cache_len, D], written in place step after step: the same storage on every step, eager or compiled
(inductor writes a graph input's cache update in place, so the run-time operator of compiled_cache.py reads the
buffer itself). :class:`StaticIndexes` keeps, per layer runtime, the index of each such buffer it has seen, keyed by the
buffer's storage (weakly: an index is released with its cache).

An index is read only where it continues: it describes positions [0, n) of the buffer, the call's queries follow at
n (``prior == n``), the buffer is the same view of the storage with the same batch, and the keys at positions 0 and
n - 1 equal the ones it saw there. Every other call rebuilds it from the buffer (O(kv_len), once), and a call that
writes the buffer without the decode method (a prefill into the cache, a chunk of a prompt, a step that ran exact
attention) drops it (:meth:`StaticIndexes.forget`): a cache reset and filled with another prompt is never read
through the old index. A key buffer that is not preallocated (a ``DynamicCache``: new keys every step) gets no index
(the caller runs exact attention, counted). Beam search reorders a ``StaticCache`` by copying it into a new buffer
every step: the index is rebuilt every step, and the step that fills the buffer runs exact attention, counted (a
``GrowingCache`` reorders its index with the cache instead).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Optional

import torch


def _view_of(key: torch.Tensor) -> tuple:
    """Which view of its storage a key buffer is: offset, shape, strides, dtype."""
    return key.storage_offset(), tuple(key.shape), key.stride(), key.dtype


class _Entry:
    """An index and the keys it saw at positions 0 and length - 1 ([B, Hkv, 2, D])."""

    def __init__(self, index: Any, key: torch.Tensor, length: int):
        self.index = index
        self.view = _view_of(key)
        self.edges = key[:, :, [0, length - 1]].clone()
        self.length = length

    def continues(self, key: torch.Tensor, prior: int, batch: int) -> bool:
        """Whether the call's queries follow the indexed positions of this very buffer content."""
        return (self.length == prior and self.view == _view_of(key) and self.index.matches(prior, batch)
                and torch.equal(key[:, :, [0, prior - 1]], self.edges))


class StaticIndexes:
    """The decode indexes of preallocated caches of one layer (thread-safe: each buffer has its own entry)."""

    def __init__(self) -> None:
        self._entries: "weakref.WeakKeyDictionary[torch.UntypedStorage, _Entry]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __reduce__(self):
        """A copied or pickled model starts without indexes: they describe the caches of the original's calls."""
        return StaticIndexes, ()

    def index(self, key: torch.Tensor, kv_len: int, q_len: int, key_padding_mask: Optional[torch.Tensor],
              build: Callable[[torch.Tensor, int, Optional[torch.Tensor]], Any]) -> Optional[Any]:
        """The index of key [B, Hkv, L, D] describing positions [0, kv_len) on return, or None when the buffer is not
        preallocated (L == kv_len with no index to continue). ``build(key, n, mask)`` indexes the first n positions;
        key_padding_mask [B, >= kv_len] bool or None."""
        storage = key.untyped_storage()
        prior = kv_len - q_len
        with self._lock:
            entry = self._entries.pop(storage, None)
        if entry is not None and not entry.continues(key, prior, key.shape[0]):
            entry = None
        if entry is None:
            if key.shape[2] <= kv_len or prior < 1:
                return None
            mask = None if key_padding_mask is None else key_padding_mask[:, :prior]
            index = build(key, prior, mask)
        else:
            index = entry.index
        index.append(key[:, :, prior:kv_len])
        with self._lock:
            self._entries[storage] = _Entry(index, key, kv_len)
        return index

    def forget(self, key: torch.Tensor) -> None:
        """Drop the index of the buffer ``key`` (a call wrote it without the decode method)."""
        if len(self._entries):
            with self._lock:
                self._entries.pop(key.untyped_storage(), None)
