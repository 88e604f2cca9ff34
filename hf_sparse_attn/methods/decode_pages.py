"""Quest decode: query-aware page selection over the KV cache (Tang et al. 2024, "Quest: Query-Aware Sparsity for
Efficient Long-Context LLM Inference").

The cached keys are cut into pages of ``page_size`` consecutive positions. For each (batch row, KV head, page) the
index keeps the elementwise minimum m and maximum M of the page's keys over the D dimensions. For a query q,

    U(q, page) = sum_d max(q_d m_d, q_d M_d)   >=   q . k   for every key k of the page          (Quest, Sec. 3)

(term by term: k_d lies in [m_d, M_d], so q_d k_d <= max(q_d m_d, q_d M_d)). A decode step attends exactly:

* the sinks: each row's first ``num_sink_tokens`` real keys [pad_b, pad_b + S) (StreamingLLM, as ``local``);
* the window: [w0, kv_len) with w0 = the page boundary at or below kv_len - Nq + 1 - window, causal for Nq > 1. The
  window is widened down to a page boundary, so it always holds the incomplete last page (not in the page table) and
  every page is wholly in the window or wholly before it;
* the pages: the ``token_budget // page_size`` pages of largest U among the candidates, the full pages before w0 that
  end after the row's sinks. The candidate holding the sinks' end is attended without its sink positions (they are in
  the sinks part), so no key is counted twice.

Grouped-query heads: the g query heads of a KV head (and, for Nq > 1, their Nq rows) share one page selection, that of
the largest bound over those rows: U(page) = max_r U(q_r, page). A page is read if any query of its KV head may
need it; the keys are gathered once per KV head, not per query head (Quest has one query per head; this is the
choice that keeps the selection an upper bound for every query of the group).

When no row has more candidate pages than the budget, every key is attended and the call is :func:`exact_decode`.
The three parts are merged by their lse (merge.py). Deterministic: top-k of the bounds, no sampling.

Memory of the index: 2 D values per page and KV head (key dtype), 1 / page_size of the K + V cache whatever the
dtype (page 32: 3.1%), plus the keys of one incomplete page per (batch, KV head).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .decode import (NEG_INF, _finish, _sinks, _span, attend, check_decode_inputs, exact_decode, gather_kv_rows,
                     group_queries, leading_pad, register_decode_method)
from .defaults import QUEST_NUM_SINK_TOKENS, QUEST_PAGE_SIZE, QUEST_TOKEN_BUDGET, QUEST_WINDOW
from .kv_buffer import GrowingTensor
from .merge import merge_many
from .registry import Param

POS_INF = float("inf")


# ---------------------------------------------------------------------------------------------------------------
# the page index
# ---------------------------------------------------------------------------------------------------------------

def _page_min_max(keys: torch.Tensor, real: Optional[torch.Tensor],
                  page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [B, Hkv, P * page_size, D], real [B, P * page_size] bool (True = real key) or None
    -> (min, max) [B, Hkv, P, D] in keys' dtype; padded keys do not count (+inf / -inf fill: an all-padding page has
    min +inf and max -inf)."""
    B, Hkv, L, D = keys.shape
    pages = keys.reshape(B, Hkv, L // page_size, page_size, D)
    if real is None or bool(real.all()):
        return torch.aminmax(pages, dim=3)
    keep = real.reshape(B, 1, L // page_size, page_size, 1)
    return pages.masked_fill(~keep, POS_INF).amin(dim=3), pages.masked_fill(~keep, NEG_INF).amax(dim=3)


class PageIndex:
    """Per (batch row, KV head) and full page of ``page_size`` positions: the min and max of the page's keys over D.

    ``page_min`` / ``page_max`` [B, Hkv, P, D] (key dtype, :class:`GrowingTensor` storage: an append is amortised
    O(new keys)) describe the pages [p * page_size, (p + 1) * page_size) for p < P = length // page_size. The keys of
    the incomplete last page [P * page_size, length) are kept aside (at most page_size - 1 per (batch, KV head)) until
    the page is full. Padded keys do not count in a page's min / max (+inf / -inf fill).

    Cache changes: :meth:`append`, :meth:`crop`, :meth:`reorder` follow the cache's own operations. A crop that cuts a
    full page leaves that page's first keys unknown to the index (only the page's min / max were kept):
    :meth:`matches` is then False and the caller rebuilds the index from the cache (:meth:`build`).
    """

    def __init__(self, page_min: GrowingTensor, page_max: GrowingTensor, tail: torch.Tensor,
                 tail_real: Optional[torch.Tensor], page_size: int):
        self._min = page_min  # [B, Hkv, P, D], growing along P
        self._max = page_max
        self.tail = tail  # [B, Hkv, t, D]: keys of the incomplete last page, t < page_size
        self.tail_real = tail_real  # [B, t] bool (True = real key) or None (all real)
        self.page_size = int(page_size)
        self.lost = 0  # positions of the incomplete page whose keys a crop cut away (then the tail is empty)

    @classmethod
    def build(cls, k: torch.Tensor, *, kv_len: Optional[int] = None, key_padding_mask: Optional[torch.Tensor] = None,
              page_size: int = QUEST_PAGE_SIZE, capacity: int = 0) -> "PageIndex":
        """Index the first ``kv_len`` keys of k [B, Hkv, L, D]; ``key_padding_mask`` [B, >= kv_len] bool (True = real
        key). ``capacity``: pages reserved."""
        if k.dim() != 4:
            raise ValueError(f"k must be [B, Hkv, L, D], got {tuple(k.shape)}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        n = k.shape[2] if kv_len is None else int(kv_len)
        if not 0 <= n <= k.shape[2]:
            raise ValueError(f"kv_len must be in [0, {k.shape[2]}], got {n}")
        real = None if key_padding_mask is None else key_padding_mask[:, :n]
        full = n // page_size * page_size
        lo, hi = _page_min_max(k[:, :, :full], None if real is None else real[:, :full], page_size)
        capacity = max(int(capacity), full // page_size)
        tail_real = None if real is None or bool(real[:, full:].all()) else real[:, full:].clone()
        return cls(GrowingTensor(lo, dim=2, capacity=capacity), GrowingTensor(hi, dim=2, capacity=capacity),
                   k[:, :, full:n].clone(), tail_real, page_size)

    # ---- state --------------------------------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        """Full pages in the table."""
        return self._min.length

    @property
    def length(self) -> int:
        """Number of cached positions the index describes."""
        return self.num_pages * self.page_size + self.tail.shape[2] + self.lost

    @property
    def tail_known(self) -> bool:
        """Whether the index holds the keys of its incomplete page (False after a crop that cut a full page)."""
        return self.lost == 0

    @property
    def batch(self) -> int:
        return self._min.storage.shape[0]

    @property
    def page_min(self) -> torch.Tensor:
        """[B, Hkv, P, D] elementwise min of each full page's real keys (a view)."""
        return self._min.view()

    @property
    def page_max(self) -> torch.Tensor:
        """[B, Hkv, P, D] elementwise max of each full page's real keys (a view)."""
        return self._max.view()

    def matches(self, kv_len: int, batch: Optional[int] = None) -> bool:
        """Whether the index describes a cache of ``kv_len`` positions (and ``batch`` rows). False after a crop that
        cut a full page (rebuild). A cache reordered or cropped without telling the index is not caught here."""
        return self.tail_known and self.length == int(kv_len) and (batch is None or self.batch == int(batch))

    def nbytes(self) -> int:
        """Bytes of the index: the valid pages' min and max and the incomplete page's keys."""
        size = sum(t.numel() * t.element_size() for t in (self.page_min, self.page_max, self.tail))
        return size + (0 if self.tail_real is None else self.tail_real.numel())

    # ---- updates ------------------------------------------------------------------------------------------------
    def append(self, k_new: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> None:
        """Append the keys k_new [B, Hkv, A, D] of the positions after ``length``: the pages they complete enter the
        table, the rest waits in the incomplete page. O(A + page_size). ``key_padding_mask`` [B, A] bool (True = real
        key) or None: all real (decode steps; a padded key counted as real only loosens its page's bound)."""
        if not self.tail_known:
            raise ValueError("page index: a crop cut a full page whose keys the index does not keep; rebuild it "
                             "(PageIndex.build) before appending")
        A = k_new.shape[2]
        if A == 0:
            return
        keys = torch.cat([self.tail, k_new.to(self.tail.dtype)], dim=2)
        real = None
        if self.tail_real is not None or (key_padding_mask is not None and not bool(key_padding_mask.all())):
            old = self.tail_real if self.tail_real is not None else torch.ones(
                keys.shape[0], self.tail.shape[2], dtype=torch.bool, device=keys.device)
            new = key_padding_mask if key_padding_mask is not None else old.new_ones(keys.shape[0], A)
            real = torch.cat([old, new.to(old.device)], dim=1)
        full = keys.shape[2] // self.page_size * self.page_size
        if full:
            lo, hi = _page_min_max(keys[:, :, :full], None if real is None else real[:, :full], self.page_size)
            self._min.append(lo)
            self._max.append(hi)
        self.tail = keys[:, :, full:].clone()
        self.tail_real = None if real is None or bool(real[:, full:].all()) else real[:, full:].clone()

    def crop(self, length: int) -> None:
        """Keep the first ``length`` positions (the cache was cropped). A page cut in two leaves the table; its kept
        keys are then unknown to the index unless they were in the incomplete page (see :meth:`matches`)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"crop: length must be in [0, {self.length}], got {length}")
        pages, rest = divmod(int(length), self.page_size)
        if pages >= self.num_pages:  # inside the incomplete page: its keys are here (or were lost already)
            self.tail = self.tail[:, :, :rest]  # empty when lost
            self.tail_real = None if self.tail_real is None else self.tail_real[:, :rest]
            self.lost = rest if self.lost else 0
            return
        self._min.crop(pages)
        self._max.crop(pages)
        B, Hkv, _, D = self.tail.shape
        self.tail = self.tail.new_empty(B, Hkv, 0, D)
        self.tail_real = None
        self.lost = rest

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Select / reorder the batch rows as the cache did (beam search): beam_idx [B'] int64."""
        self._min.index_select(0, beam_idx)
        self._max.index_select(0, beam_idx)
        idx = beam_idx.to(self.tail.device)
        self.tail = self.tail.index_select(0, idx)
        self.tail_real = None if self.tail_real is None else self.tail_real.index_select(0, idx)


def build_page_index(k_cache: torch.Tensor, kv_len: int, key_padding_mask: Optional[torch.Tensor] = None, *,
                     page_size: int = QUEST_PAGE_SIZE, **_: Any) -> PageIndex:
    """The ``quest`` method's index of the first kv_len keys of k_cache [B, Hkv, L, D]."""
    return PageIndex.build(k_cache, kv_len=kv_len, key_padding_mask=key_padding_mask, page_size=page_size)


def page_bounds(qg: torch.Tensor, page_min: torch.Tensor, page_max: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound of q . k over each page: qg [B, Hkv, M, D], page_min / page_max [B, Hkv, P, D]
    -> [B, Hkv, M, P] float32, sum_d max(q_d min_d, q_d max_d) = q+ . max + q- . min (q+ = max(q, 0), q- = min(q, 0));
    -inf for an all-padding page (min +inf, max -inf)."""
    qf = qg.float()
    bound = (torch.matmul(qf.clamp_min(0.0), page_max.float().transpose(-1, -2))
             + torch.matmul(qf.clamp_max(0.0), page_min.float().transpose(-1, -2)))
    return bound.masked_fill_(torch.isnan(bound), NEG_INF)  # 0 * inf terms: only an all-padding page gives NaN


# ---------------------------------------------------------------------------------------------------------------
# the decode method
# ---------------------------------------------------------------------------------------------------------------

def quest_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, scale: float, kv_len: int,
                 key_padding_mask: Optional[torch.Tensor] = None, index: Optional[PageIndex] = None,
                 page_size: int = QUEST_PAGE_SIZE, token_budget: int = QUEST_TOKEN_BUDGET, window: int = QUEST_WINDOW,
                 num_sink_tokens: int = QUEST_NUM_SINK_TOKENS,
                 stats: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sinks + page-aligned window exactly, plus the ``token_budget // page_size`` pages of largest Quest bound per
    (batch, KV head) among the full pages in between (module docstring), attended exactly in one fused call.

    Shapes as :func:`exact_decode`: q [B, Hq, Nq, D], k/v_cache [B, Hkv, L, D] -> (out [B, Hq, Nq, D] q's dtype,
    lse [B, Hq, Nq] float32). ``index``: a :class:`PageIndex` with ``page_size`` pages describing the first kv_len
    keys; None builds one for this call (O(kv_len): for tests, not for decoding). ``stats`` (a dict) receives the mode,
    the window start, the candidate pages per row and the selected pages [B, Hkv, K] (with their bounds).
    """
    check_decode_inputs(q, k_cache, v_cache, kv_len, key_padding_mask)
    if page_size < 1 or min(token_budget, window, num_sink_tokens) < 0:
        raise ValueError(f"quest decode: page_size must be >= 1 and token_budget, window, num_sink_tokens >= 0; got "
                         f"{page_size}, {token_budget}, {window}, {num_sink_tokens}")
    B, Hq, nq, D = q.shape
    Hkv = k_cache.shape[1]
    if index is not None and (index.page_size != page_size or not index.matches(kv_len, B)):
        cut = "" if index.tail_known else ", a crop cut a full page"
        raise ValueError(f"quest decode: the index has pages of {index.page_size} and describes {index.length} "
                         f"positions of {index.batch} rows{cut}; the call has page_size={page_size}, kv_len={kv_len}, "
                         f"{B} rows (append the new keys with index.append, follow crops / beam reorders with "
                         "index.crop / index.reorder, or rebuild it)")
    device = q.device
    pad = leading_pad(key_padding_mask, B, device)
    sink_end = pad + num_sink_tokens  # [B]: the middle of row b starts here
    first_end = int(sink_end.min())
    uniform = key_padding_mask is None or int(sink_end.max()) == first_end
    w0 = max(kv_len - nq + 1 - window, 0) // page_size * page_size  # exact window [w0, kv_len), page aligned
    last_page = w0 // page_size  # candidates: pages p < last_page with (p + 1) * page_size > sink_end_b
    first_page = sink_end // page_size  # [B]
    num_candidates = (last_page - first_page).clamp_min(0)
    num_pages = token_budget // page_size
    if int(num_candidates.max()) <= num_pages:
        if stats is not None:
            stats.update(mode="exact", window_start=w0, candidates=num_candidates)
        return exact_decode(q, k_cache, v_cache, scale=scale, kv_len=kv_len, key_padding_mask=key_padding_mask)
    if index is None:
        index = build_page_index(k_cache, kv_len, key_padding_mask, page_size=page_size)

    qg = group_queries(q, Hkv)  # [B, Hkv, M, D]
    lower = None if uniform else sink_end
    parts = [_sinks(qg, k_cache, v_cache, pad, num_sink_tokens, scale=scale, nq=nq, kv_len=kv_len,
                    key_padding_mask=key_padding_mask),
             _span(qg, k_cache, v_cache, max(w0, first_end), kv_len, scale=scale, nq=nq, kv_len=kv_len,
                   key_padding_mask=key_padding_mask, lower=lower)]
    selected = None
    if num_pages > 0:
        p0 = int(first_page.min())
        bound = page_bounds(qg, index.page_min[:, :, p0:last_page], index.page_max[:, :, p0:last_page]).amax(dim=2)
        if not uniform:  # [B, Hkv, P']: pages that end inside row b's sinks are not its candidates
            ends = (torch.arange(p0, last_page, device=device) + 1) * page_size
            bound.masked_fill_((ends[None, :] <= sink_end[:, None])[:, None, :], NEG_INF)
        top = torch.topk(bound, num_pages, dim=-1)
        pages, order = torch.sort(top.indices + p0, dim=-1)  # [B, Hkv, K] ascending positions: a forward gather
        page_ok = torch.isfinite(top.values.gather(-1, order))  # -inf: not a candidate of the row, or all padding
        pos = (pages[..., None] * page_size + torch.arange(page_size, device=device)).reshape(B, Hkv, -1)  # [B,Hkv,X]
        allowed = page_ok.repeat_interleave(page_size, dim=-1) & (pos >= sink_end.view(B, 1, 1))
        if key_padding_mask is not None:
            allowed &= key_padding_mask.gather(1, pos.reshape(B, -1)).view(pos.shape)
        kg, vg = gather_kv_rows(k_cache, v_cache, pos)  # [B, Hkv, X, D]
        bias = None
        if not bool(allowed.all()):
            bias = torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, NEG_INF)[:, :, None, :]
        parts.append(attend(qg, kg, vg, scale, bias))
        selected = pages
        if stats is not None:
            stats.update(pages_ok=page_ok, bounds=bound)
    out, lse = merge_many(parts)
    if stats is not None:
        stats.update(mode="quest", window_start=w0, candidates=num_candidates, pages=selected,
                     keys_per_row=num_sink_tokens + (kv_len - w0) + num_pages * page_size)
    return _finish(out, lse, q)


# ---------------------------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------------------------

register_decode_method(
    "quest", quest_decode,
    params={"page_size": Param(kind=int, low=1, help="positions per page; the index keeps each full page's "
                                                     "elementwise key min and max (memory 1 / page_size of the cache)"),
            "token_budget": Param(kind=int, low=0, help="the token_budget // page_size pages of largest bound are "
                                                        "attended exactly, per (batch, KV head)"),
            "window": Param(kind=int, low=0, help="exact window of recent positions, widened down to a page "
                                                  "boundary"),
            "num_sink_tokens": Param(kind=int, low=0, help="exact first real keys (attention sinks)")},
    index_builder=build_page_index,
    source="Quest (Tang et al. 2024, 'Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference'): "
           "per-page key min / max, upper bound of q.k, top-k pages; StreamingLLM (Xiao et al. 2023) sinks + window",
    summary="sinks + window exact, plus the pages of largest Quest bound (max over a KV head's queries), exact")
