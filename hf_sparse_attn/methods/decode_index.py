"""The per-layer hash index of the cached keys that the ``lsh`` decode method looks queries up in.

For each (batch row, KV head) the index holds the SimHash codes of the cached keys (angular LSH, Charikar 2002; the
hashing of HyperAttention, Han et al. 2023, and of MagicPIG, Chen et al. 2024): ``lsh_num_tables`` = T tables of
``lsh_num_projs`` = P random hyperplanes each,

    code_t(k_j) = Gray rank of sum_p [ (k_j - c) . w_{t,p} > 0 ] 2^p          (lsh.py: Gray-ordered buckets)

with c the mean of the keys the index was built from (MagicPIG centres the keys: q.(k - c) orders the keys of one query
as q.k does, and centred keys spread over the buckets instead of crowding into the few the common mean direction
falls in). Queries are hashed with the same hyperplanes, uncentred.

Storage per (b, h, t) — the sorted-LSH layout of ``lsh.py`` / ``sorted_blocks.py``, kept across decode steps:

* ``codes``   [B, Hkv, T, L] int16, by position (a :class:`GrowingTensor`: appended in amortised O(1), no copy of the
  whole index per step);
* ``sorted``  [B, Hkv, T, n] int16 and ``perm`` [B, Hkv, T, n] int32: the first n = ``indexed`` positions stably
  sorted by code (``perm`` = positions in sorted order; ties in position order).

A query's candidates in table t are the ``block_size`` keys around its code in the sorted order (found with one
``searchsorted``): its own bucket and the Gray-adjacent ones, i.e. the keys most likely to have a large q.k
(Indyk, Kapralov, Sheth, Wagner, "Improved Algorithms for Kernel Matrix-Vector Multiplication Under Sparsity
Assumptions", Algorithm 1 FINDHEAVY, with HyperAttention's sorted LSH in place of bucket scans). Membership of any
position in a query's block is decided from its code alone: the block is the range [(code_lo, pos_lo), (code_hi,
pos_hi)] of the lexicographic order (code, position) that the stable sort realises.

Appends hash the new keys (O(A)) into ``codes``; positions >= ``indexed`` are not yet sorted, and the decode method
attends them exactly (they are the most recent keys, inside its window as long as ``resort_every`` <= window). When
more than ``resort_every`` positions are unsorted the sort is redone (O(n log n) every ``resort_every`` steps).

Memory per cached key and KV head: T (2 + 2 + 4) = 8 T bytes (+ up to 2 T while ``codes`` has spare capacity) against
2 D x dtype bytes of keys and values: D = 64, T = 1: 1.6% of an fp32 cache, 3.1% of a bf16 one (docs/methods/decode.md).

Cache changes: :meth:`DecodeIndex.matches` (length check, O(1)) tells the caller whether the index describes the
cache; :meth:`append`, :meth:`crop` (speculative decoding / ``DynamicCache.crop``) and :meth:`reorder` (beam search)
follow the cache's own operations; anything else (a cache edited in place) needs :meth:`DecodeIndex.build` again.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .kv_buffer import GrowingTensor
from .lsh import gray_rank_table, random_hyperplanes

MAX_DECODE_LSH_PROJS = 15  # codes are int16 Gray ranks in [0, 2^15)
_POS_BITS = 32  # lexicographic key = code * 2^32 + position


class DecodeIndex:
    """SimHash codes of one layer's cached keys, per (batch, KV head); see the module docstring."""

    def __init__(self, planes: torch.Tensor, center: torch.Tensor, codes: GrowingTensor, num_projs: int,
                 num_tables: int, resort_every: int, seed: int):
        self.planes = planes  # [Hkv, D, T * P] float32
        self.center = center  # [B, Hkv, 1, D] float32
        self._codes = codes  # [B, Hkv, T, L] int16 (growing along L)
        self.num_projs = int(num_projs)
        self.num_tables = int(num_tables)
        self.resort_every = int(resort_every)
        self.seed = int(seed)
        self.sorts = 0
        self.indexed = 0
        self.sorted_codes = torch.empty(0, dtype=torch.int16)
        self.perm = torch.empty(0, dtype=torch.int32)
        self.refresh()

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, k: torch.Tensor, *, kv_len: Optional[int] = None, key_padding_mask: Optional[torch.Tensor] = None,
              lsh_num_projs: int = 10, lsh_num_tables: int = 1, resort_every: int = 512, seed: int = 0,
              center: Optional[torch.Tensor] = None, capacity: int = 0) -> "DecodeIndex":
        """Index the first ``kv_len`` keys of k [B, Hkv, L, D] (a prefill's cache). ``key_padding_mask`` [B, kv_len]
        bool (True = real key) only keeps padding out of the centre. ``center`` [B, Hkv, 1, D] overrides the mean
        (an index rebuilt from scratch with the same centre and seed equals one grown by :meth:`append`).
        ``capacity``: positions reserved for the codes."""
        if k.dim() != 4:
            raise ValueError(f"k must be [B, Hkv, L, D], got {tuple(k.shape)}")
        if not 1 <= lsh_num_projs <= MAX_DECODE_LSH_PROJS:
            raise ValueError(f"lsh_num_projs must be in [1, {MAX_DECODE_LSH_PROJS}], got {lsh_num_projs}")
        if lsh_num_tables < 1 or resort_every < 1:
            raise ValueError(f"lsh_num_tables and resort_every must be >= 1, got {lsh_num_tables}, {resort_every}")
        B, Hkv, L, D = k.shape
        n = L if kv_len is None else int(kv_len)
        keys = k[:, :, :n]
        if center is None:
            if n == 0:
                center = torch.zeros(B, Hkv, 1, D, device=k.device)
            elif key_padding_mask is None:
                center = keys.float().mean(dim=2, keepdim=True)
            else:
                w = key_padding_mask[:, None, :n, None].float()
                center = (keys.float() * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp_min(1.0)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        planes = torch.cat([random_hyperplanes(Hkv, D, lsh_num_projs, gen, k.device) for _ in range(lsh_num_tables)],
                           dim=-1)  # [Hkv, D, T * P]: table t is columns t P .. (t + 1) P - 1
        codes0 = _hash(keys, planes, center.float(), lsh_num_projs, lsh_num_tables)
        grown = GrowingTensor(codes0, dim=3, capacity=max(capacity, n))
        return cls(planes, center.float(), grown, lsh_num_projs, lsh_num_tables, resort_every, seed)

    # ---- state --------------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Number of cached positions the index describes."""
        return self._codes.length

    @property
    def codes(self) -> torch.Tensor:
        """[B, Hkv, T, length] int16 Gray-ranked codes by position (a view)."""
        return self._codes.view()

    @property
    def reallocations(self) -> int:
        return self._codes.reallocations

    def matches(self, kv_len: int, batch: Optional[int] = None) -> bool:
        """Whether the index describes a cache of ``kv_len`` positions (and ``batch`` rows): the caller's cheap check
        before every decode step. A cache reordered or cropped by its owner without telling the index is not caught
        by this check; follow such operations with :meth:`reorder` / :meth:`crop`."""
        return self.length == int(kv_len) and (batch is None or self._codes.storage.shape[0] == int(batch))

    def nbytes(self) -> int:
        """Bytes of the index: codes (the valid part), sorted codes, permutation, hyperplanes and centre."""
        codes = self.codes
        return (codes.numel() * codes.element_size() + self.sorted_codes.numel() * self.sorted_codes.element_size()
                + self.perm.numel() * self.perm.element_size() + self.planes.numel() * 4 + self.center.numel() * 4)

    # ---- hashing ------------------------------------------------------------------------------------------------
    def hash_queries(self, q_grouped: torch.Tensor) -> torch.Tensor:
        """q_grouped [B, Hkv, M, D] (uncentred) -> codes [B, Hkv, T, M] int16."""
        return _hash(q_grouped, self.planes, None, self.num_projs, self.num_tables)

    # ---- updates ------------------------------------------------------------------------------------------------
    def append(self, k_new: torch.Tensor) -> None:
        """Hash and append the keys k_new [B, Hkv, A, D] of the positions after ``length``; re-sort when more than
        ``resort_every`` positions are unsorted."""
        self._codes.append(_hash(k_new, self.planes, self.center, self.num_projs, self.num_tables))
        if self.length - self.indexed > self.resort_every:
            self.refresh()

    def refresh(self) -> None:
        """Sort every position (stable, by code): afterwards ``indexed == length``."""
        codes = self.codes
        if codes.shape[-1] == 0:
            self.sorted_codes = codes.clone()
            self.perm = torch.zeros(codes.shape, dtype=torch.int32, device=codes.device)
        else:
            srt = torch.sort(codes, dim=-1, stable=True)
            self.sorted_codes, self.perm = srt.values, srt.indices.to(torch.int32)
        self.indexed = codes.shape[-1]
        self.sorts += 1

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions (the cache was cropped). The sorted part keeps its order: the positions
        < length of a stable sort are still stably sorted."""
        if not 0 <= length <= self.length:
            raise ValueError(f"crop: length must be in [0, {self.length}], got {length}")
        self._codes.crop(length)
        if length < self.indexed:
            keep = self.perm < length
            shape = self.perm.shape[:-1] + (length,)
            self.sorted_codes = self.sorted_codes[keep].view(shape)
            self.perm = self.perm[keep].view(shape)
            self.indexed = length

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Select / reorder the batch rows as the cache did (beam search): beam_idx [B'] int64."""
        self._codes.index_select(0, beam_idx)
        idx = beam_idx.to(self.center.device)
        self.center = self.center.index_select(0, idx)
        self.sorted_codes = self.sorted_codes.index_select(0, idx)
        self.perm = self.perm.index_select(0, idx)

    # ---- lookups ------------------------------------------------------------------------------------------------
    def lookup(self, q_codes: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block of ``block_size`` keys around each query's code in each table's sorted order.

        q_codes [B, Hkv, T, M] int16 -> (positions [B, Hkv, T, M, b] int64 with b = min(block_size, indexed),
        lo_key, hi_key [B, Hkv, T, M] int64: the block's first and last (code, position) as code * 2^32 + position).
        """
        n = self.indexed
        b = min(int(block_size), n)
        B, Hkv, T, M = q_codes.shape
        at = torch.searchsorted(self.sorted_codes, q_codes.contiguous())  # [B, Hkv, T, M]
        lo = (at - b // 2).clamp_(0, max(0, n - b))
        idx = lo[..., None] + torch.arange(b, device=lo.device)  # [B, Hkv, T, M, b]
        pos = self.perm.gather(-1, idx.view(B, Hkv, T, M * b)).view(B, Hkv, T, M, b).long()
        ends = torch.cat([lo, lo + (b - 1)], dim=-1)  # [B, Hkv, T, 2M]: first and last entry of each block
        keys = (self.sorted_codes.gather(-1, ends).long() << _POS_BITS) + self.perm.gather(-1, ends).long()
        return pos, keys[..., :M], keys[..., M:]

    def in_blocks(self, positions: torch.Tensor, lo_key: torch.Tensor, hi_key: torch.Tensor,
                  tables: Optional[range] = None) -> torch.Tensor:
        """Whether each position lies in its query row's block of any of ``tables`` (default: all).

        positions [B, Hkv, M, X] int64 (< indexed), lo_key / hi_key [B, Hkv, T, M] from :meth:`lookup`
        -> [B, Hkv, M, X] bool.
        """
        B, Hkv, M, X = positions.shape
        tables = range(self.num_tables) if tables is None else tables
        inside = torch.zeros(B, Hkv, M, X, dtype=torch.bool, device=positions.device)
        codes = self.codes
        for t in tables:
            c = codes[:, :, t].gather(-1, positions.reshape(B, Hkv, M * X)).view(B, Hkv, M, X).long()
            key = (c << _POS_BITS) + positions
            inside |= (key >= lo_key[:, :, t, :, None]) & (key <= hi_key[:, :, t, :, None])
        return inside


@functools.lru_cache(maxsize=32)
def _pow2(num_projs: int, device: str) -> torch.Tensor:
    """[P] float32: 2^p (read-only, cached)."""
    return 2.0 ** torch.arange(num_projs, device=device, dtype=torch.float32)


def _hash(x: torch.Tensor, planes: torch.Tensor, center: Optional[torch.Tensor], num_projs: int,
          num_tables: int) -> torch.Tensor:
    """x [B, Hkv, N, D] -> Gray-ranked SimHash codes [B, Hkv, T, N] int16 (lsh.py's packing, T tables of P bits)."""
    B, Hkv, N, D = x.shape
    xf = x.float() if center is None else x.float() - center
    proj = torch.matmul(planes.transpose(-1, -2), xf.transpose(-1, -2))  # [B, Hkv, T*P, N]
    bits = proj.gt_(0.0).view(B, Hkv, num_tables, num_projs, N)
    codes = torch.matmul(_pow2(num_projs, str(x.device)), bits)  # [B, Hkv, T, N]: sum_p bit_p 2^p (exact in float32 for P <= 15)
    return gray_rank_table(num_projs, x.device)[codes.long()].to(torch.int16)
