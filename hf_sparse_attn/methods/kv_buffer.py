"""Growing tensors for decoding: append along one dimension without copying everything each step.

transformers' ``DynamicCache`` appends every decode step's key/value with ``torch.cat``, a full copy of the layer's
cache per step (measured: 0.56 ms per layer at 8k, 3.2 ms at 32k, one thread; docs/methods/decode.md). A
:class:`GrowingTensor` keeps a preallocated storage whose capacity doubles when it is full (``growth`` = 2), so ``n``
appends of one position cost O(n) copies in all and ``ceil(log2(n / initial capacity))`` reallocations (amortised
O(1) per step), and exposes the valid part as a view (no copy). :class:`KVBuffer` is a pair of them with the cache
layout ``[B, Hkv, L, D]`` (KV heads not expanded). :class:`hf_sparse_attn.methods.decode_index.DecodeIndex` keeps its
hash codes in one too.

A plain tensor utility: wiring it into transformers' cache classes is the adapter's business (a later phase).
"""

from __future__ import annotations

import math
from typing import Optional

import torch


class GrowingTensor:
    """A tensor that grows along ``dim`` by appending; the valid part [..., :length, ...] is a view of the storage.

    ``capacity`` (along ``dim``) doubles (times ``growth``) when an append does not fit. ``reallocations`` counts the
    storage allocations after the first (each is one copy of the valid part).
    """

    def __init__(self, like: torch.Tensor, *, dim: int, capacity: int = 0, growth: float = 2.0):
        """Storage shaped like ``like`` with ``capacity`` positions along ``dim`` (at least like's size there), filled
        with ``like`` (length = like.shape[dim])."""
        if growth <= 1.0:
            raise ValueError(f"growth must be > 1, got {growth}")
        self.dim = dim % like.dim()
        self.growth = float(growth)
        self.length = 0
        self.reallocations = 0
        cap = max(int(capacity), like.shape[self.dim], 1)
        self._storage = self._alloc(like, cap)
        self.append(like)

    def _alloc(self, like: torch.Tensor, cap: int) -> torch.Tensor:
        shape = list(like.shape)
        shape[self.dim] = cap
        return torch.empty(shape, dtype=like.dtype, device=like.device)

    @property
    def capacity(self) -> int:
        return self._storage.shape[self.dim]

    @property
    def storage(self) -> torch.Tensor:
        """The whole preallocated storage (positions >= length are garbage)."""
        return self._storage

    def view(self) -> torch.Tensor:
        """The valid part: a view (narrow) of the storage, length positions along ``dim``."""
        return self._storage.narrow(self.dim, 0, self.length)

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` positions (one reallocation and copy if it is larger than today's)."""
        if capacity <= self.capacity:
            return
        new = self._alloc(self._storage, capacity)
        new.narrow(self.dim, 0, self.length).copy_(self.view())
        self._storage = new
        self.reallocations += 1

    def append(self, x: torch.Tensor) -> torch.Tensor:
        """Append x (the storage's shape except along ``dim``); returns the new valid view."""
        n = x.shape[self.dim]
        need = self.length + n
        if need > self.capacity:
            self.reserve(max(need, int(math.ceil(self.capacity * self.growth))))
        self._storage.narrow(self.dim, self.length, n).copy_(x)
        self.length = need
        return self.view()

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions (no copy)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"crop: length must be in [0, {self.length}], got {length}")
        self.length = int(length)

    def index_select(self, dim: int, index: torch.Tensor) -> None:
        """Reorder / select along another dimension (beam search's ``beam_idx`` on the batch dim), in a new storage of
        the same capacity."""
        if dim % self._storage.dim() == self.dim:
            raise ValueError("index_select along the growing dimension is not supported; crop instead")
        self._storage = self._storage.index_select(dim, index.to(self._storage.device))


class KVBuffer:
    """Keys and values of one layer, [B, Hkv, L, D] each (KV heads not expanded), growing by doubling.

    ``keys`` / ``values`` are views of the first ``length`` positions; ``key_storage`` / ``value_storage`` the whole
    preallocated buffers (what :func:`hf_sparse_attn.methods.decode.exact_decode` takes with ``kv_len=length``).
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, *, capacity: int = 0, growth: float = 2.0):
        """k [B, Hkv, L0, D], v [B, Hkv, L0, Dv] (the prefill's cache); ``capacity`` positions reserved now."""
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(f"k, v must be [B, Hkv, L, D] with the same B, Hkv, L; got {tuple(k.shape)}, {tuple(v.shape)}")
        self._k = GrowingTensor(k, dim=2, capacity=capacity, growth=growth)
        self._v = GrowingTensor(v, dim=2, capacity=capacity, growth=growth)

    @property
    def length(self) -> int:
        return self._k.length

    @property
    def capacity(self) -> int:
        return self._k.capacity

    @property
    def reallocations(self) -> int:
        return self._k.reallocations

    @property
    def keys(self) -> torch.Tensor:
        return self._k.view()

    @property
    def values(self) -> torch.Tensor:
        return self._v.view()

    @property
    def key_storage(self) -> torch.Tensor:
        return self._k.storage

    @property
    def value_storage(self) -> torch.Tensor:
        return self._v.storage

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k_new [B, Hkv, A, D] / v_new [B, Hkv, A, Dv]; returns the (keys, values) views [B, Hkv, L, D]."""
        if k_new.shape[2] != v_new.shape[2]:
            raise ValueError(f"append: k and v must add as many positions, got {k_new.shape[2]} and {v_new.shape[2]}")
        return self._k.append(k_new), self._v.append(v_new)

    def crop(self, length: int) -> None:
        self._k.crop(length)
        self._v.crop(length)

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Select / reorder the batch rows (beam search)."""
        self._k.index_select(0, beam_idx)
        self._v.index_select(0, beam_idx)

    def nbytes(self, valid_only: bool = True) -> int:
        """Bytes of keys + values: the valid part (default) or the whole storage."""
        if valid_only:
            return sum(t.view().numel() * t.view().element_size() for t in (self._k, self._v))
        return sum(t.storage.numel() * t.storage.element_size() for t in (self._k, self._v))


def kv_bytes(k: torch.Tensor, v: Optional[torch.Tensor] = None, length: Optional[int] = None) -> int:
    """Bytes of a cache's keys and values over ``length`` positions (default: all of k's): k/v [B, Hkv, L, D]."""
    v = k if v is None else v
    n = k.shape[2] if length is None else int(length)
    return n * (k.shape[0] * k.shape[1] * k.shape[3] * k.element_size() + v.shape[0] * v.shape[1] * v.shape[3] * v.element_size())
