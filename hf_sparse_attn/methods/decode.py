"""Decode-step attention over a KV cache: the decode-method contract, its registry and three methods
(a fourth, ``quest``, registers from decode_pages.py).

Every prefill method (registry.py) serves self-attention only; decode steps (q_len != kv_len) go to exact attention
with the KV heads expanded. This module is the tensor-level half of serving them (docs/methods/decode.md):

    decode(q, k_cache, v_cache, *, scale, kv_len, key_padding_mask=None, index=None, **params) -> (out, lse)

    q                 [B, Hq, Nq, D]   Nq small (1 for a decode step); query row i sits at position kv_len - Nq + i
    k_cache, v_cache  [B, Hkv, L, D]   GROUPED heads, Hq = g * Hkv (query head h uses KV head h // g, transformers'
                                       repeat_kv order); only the first kv_len <= L positions are valid (a
                                       preallocated cache may be longer); never expanded: q is reshaped to
                                       [B, Hkv, g * Nq, D] instead
    key_padding_mask  [B, kv_len] bool True = real key (left padding), or None
    index             the method's per-layer index (``lsh``: a DecodeIndex) or None
    out               [B, Hq, Nq, D]   q's dtype (float32 accumulation)
    lse               [B, Hq, Nq]      float32 log-sum-exp of the attended scores; -inf and out 0 for a row with no key

Causal with respect to the query positions: row i attends keys j <= kv_len - Nq + i.

Methods:

* ``exact``: one fused call of torch's CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu``, which also
  returns the lse) on the grouped reshape; with Nq > 1 the last Nq - 1 keys (the only ones some row may not see) go
  through a second small call with the causal mask, merged by lse. torch 2.13 CPU, one thread, 9/3 heads, D 64, 32k
  cache: 4.3 ms, against 10.4 ms for ``scaled_dot_product_attention(enable_gqa=True)`` (transformers' unmasked
  decode call) and 77 ms with the KV heads expanded first (repeat_kv): eval/results/kernels_decode/results.md.
* ``local``: attention sinks + window (StreamingLLM, Xiao et al. 2023): the last row of ``local``'s causal prefill,
  on slicing views of the cache (no copy).
* ``lsh``: sinks + window exactly, plus for the keys in between (the "middle") the sorted-LSH block of each query
  (exact scores) and a uniform sample of the rest with importance weights, merged by lse: MagicPIG-like (Chen et al.
  2024, SimHash over centred keys) on the structure of Indyk, Kapralov, Sheth, Wagner, "Improved Algorithms for
  Kernel Matrix-Vector Multiplication Under Sparsity Assumptions" (FINDHEAVY: heavy keys by LSH, computed exactly;
  APPROXLIGHT: the light rest by uniform sampling) and HyperAttention's (Han et al. 2023) sorted LSH + sampled
  residual. Estimator and memory: docs/methods/decode.md.

Registry: :func:`register_decode_method`, :func:`get_decode_spec`, :func:`get_decode_method`,
:func:`list_decode_methods`; a spec's :meth:`DecodeSpec.build_index` builds the per-layer index (None for methods
without one). This module never imports transformers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import torch

from ..kernels.sorted_blocks_torch import flash_cpu_op
from ..kernels.workspace import workspace
from .decode_index import MAX_DECODE_LSH_PROJS, DecodeIndex
from .defaults import LOCAL_NUM_SINK_TOKENS, LOCAL_WINDOW
from .merge import empty_rows_to_zero, merge_attention, merge_many
from .registry import Param, bind_params, params_with_defaults, resolve_param_values

NEG_INF = float("-inf")
DecodeFn = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """A registered decode method: its function (the decode contract), parameters, and its index builder."""

    name: str
    fn: DecodeFn
    params: dict[str, Param]
    index_builder: Optional[Callable[..., Any]] = None  # (k_cache, kv_len, key_padding_mask, **params) -> index
    source: str = ""
    summary: str = ""

    def resolve_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in and every given value validated; unknown names are an error (registry.py's rules)."""
        return resolve_param_values("decode method", self.name, self.params, params)

    @property
    def uses_index(self) -> bool:
        return self.index_builder is not None

    def build_index(self, k_cache: torch.Tensor, kv_len: Optional[int] = None,
                    key_padding_mask: Optional[torch.Tensor] = None, **params: Any) -> Any:
        """The method's per-layer index over the first kv_len keys of k_cache [B, Hkv, L, D] (None if it has none)."""
        if self.index_builder is None:
            return None
        resolved = self.resolve_params(params)
        return self.index_builder(k_cache, k_cache.shape[2] if kv_len is None else kv_len, key_padding_mask, **resolved)


_DECODE_REGISTRY: dict[str, DecodeSpec] = {}


def register_decode_method(name: str, fn: DecodeFn, *, params: Optional[dict[str, Param]] = None,
                           index_builder: Optional[Callable[..., Any]] = None, source: str = "", summary: str = "",
                           overwrite: bool = False) -> DecodeSpec:
    """Register ``fn`` (the decode contract of this module's docstring) under ``name``. ``params`` declares its
    parameters as the prefill registry does (registry.Param: type, range, help); each default is the one of ``fn``'s
    signature."""
    if not name or not isinstance(name, str):
        raise ValueError("a decode method needs a non-empty string name")
    if name in _DECODE_REGISTRY and not overwrite:
        raise ValueError(f"decode method {name!r} is already registered; pass overwrite=True to replace it")
    spec = DecodeSpec(name=name, fn=fn, params=params_with_defaults(f"decode method {name!r}", fn, dict(params or {})),
                      index_builder=index_builder, source=source, summary=summary)
    _DECODE_REGISTRY[name] = spec
    return spec


def list_decode_methods() -> list[str]:
    """Names of the decode-capable methods, sorted."""
    return sorted(_DECODE_REGISTRY)


def get_decode_spec(name: str) -> DecodeSpec:
    """The :class:`DecodeSpec` of ``name``; an error listing the decode-capable methods otherwise."""
    try:
        return _DECODE_REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown decode method {name!r}; decode-capable methods: "
                         f"{', '.join(list_decode_methods())}") from None


def get_decode_method(name: str, **params: Any) -> DecodeFn:
    """The decode method ``name`` with ``params`` validated and bound:
    ``out, lse = get_decode_method("local", window=512)(q, k_cache, v_cache, scale=D ** -0.5, kv_len=n)``."""
    spec = get_decode_spec(name)
    return bind_params(spec.fn, name, spec.resolve_params(params))


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------------------------

def check_decode_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_len: int,
                        key_padding_mask: Optional[torch.Tensor]) -> None:
    """Validate the shapes of the decode contract (module docstring)."""
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(f"q, k_cache, v_cache must be 4-D; got {tuple(q.shape)}, {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    B, Hq, Nq, D = q.shape
    Bk, Hkv, L, Dk = k_cache.shape
    if Bk != B or Dk != D or v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"k_cache/v_cache must be [B, Hkv, L, D] with q's B and D; got q {tuple(q.shape)}, "
                         f"k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of the KV heads ({Hkv})")
    if not Nq <= kv_len <= L:
        raise ValueError(f"kv_len must be in [Nq, L] = [{Nq}, {L}], got {kv_len}")
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (B, kv_len)):
        raise ValueError(f"key_padding_mask must be a bool tensor [B, kv_len] = [{B}, {kv_len}], True = attend; got "
                         f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")


def group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """q [B, Hq, Nq, D] -> [B, Hkv, g * Nq, D]: row r of KV head h is query head h * g + r // Nq, row r % Nq."""
    B, Hq, Nq, D = q.shape
    return q.reshape(B, num_kv_heads, (Hq // num_kv_heads) * Nq, D)


def ungroup(out: torch.Tensor, lse: torch.Tensor, num_heads: int, nq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, Hkv, g * Nq, D], lse [B, Hkv, g * Nq] -> [B, Hq, Nq, D], [B, Hq, Nq]."""
    B = out.shape[0]
    return out.reshape(B, num_heads, nq, out.shape[-1]), lse.reshape(B, num_heads, nq)


def _empty(qg: torch.Tensor, dv: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, M, _ = qg.shape
    return (torch.zeros(B, H, M, dv, device=qg.device),
            torch.full((B, H, M), NEG_INF, device=qg.device))


def _fused_serves(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether torch's fused CPU flash kernel computes this call: CPU tensors of one float dtype it takes (it
    accumulates in float32, also for bf16), autograd off for them (the kernel's lse has no gradient)."""
    return (qg.device.type == "cpu" and qg.dtype == k.dtype == v.dtype
            and qg.dtype in (torch.float32, torch.bfloat16, torch.float16) and flash_cpu_op() is not None
            and not (torch.is_grad_enabled() and (qg.requires_grad or k.requires_grad or v.requires_grad)))


def attend(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
           bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of grouped queries with an additive bias and its lse.

    qg [B, Hkv, M, D], k/v [B, Hkv, L, D] (views allowed), bias broadcastable to [B, Hkv, M, L] (0 / -inf / log
    weights) or None -> out [B, Hkv, M, Dv] float32, lse [B, Hkv, M] float32 (-inf and 0 for a row with no key).
    torch's fused CPU flash kernel when it serves the dtype (it returns the lse; float32 accumulation inside, also for
    bf16), float32 matmuls otherwise (other devices, autograd).
    """
    L = k.shape[2]
    if L == 0:
        return _empty(qg, v.shape[-1])
    if _fused_serves(qg, k, v):
        mask = None if bias is None else bias.to(qg.dtype)
        out, lse = flash_cpu_op()(qg, k, v, 0.0, False, attn_mask=mask, scale=scale)[:2]
        out = out.float()
    else:
        scores = torch.matmul(qg.float(), k.float().transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + bias
        lse = torch.logsumexp(scores, dim=-1)
        safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        out = torch.matmul(torch.exp(scores - safe[..., None]), v.float())
    if bias is not None:  # rows with no key: the fused op gives lse 0 there
        out, lse = empty_rows_to_zero(out, lse, torch.isneginf(bias).all(dim=-1).expand(lse.shape))
    return out, lse


def _span(qg: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, start: int, stop: int, *, scale: float,
          nq: int, kv_len: int, key_padding_mask: Optional[torch.Tensor], lower: Optional[torch.Tensor] = None,
          window: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of qg [B, Hkv, M = g Nq, D] over the cache positions [start, stop) (slicing views, no copy).

    Key j is attended by row r (query i = r % Nq at position p = kv_len - Nq + i) iff j <= p, key_padding_mask[b, j],
    j >= lower[b] (lower [B] int64 or None) and, with ``window``, j > p - window. A bias is built only for what the
    slice itself does not already guarantee ([B, 1, 1, L] for per-key conditions, [B, 1, M, L] for per-row ones).
    """
    start, stop = max(0, int(start)), min(int(stop), kv_len)
    if stop <= start:
        return _empty(qg, v_cache.shape[-1])
    device = qg.device
    M = qg.shape[2]
    k, v = k_cache[:, :, start:stop], v_cache[:, :, start:stop]
    cols = None
    allowed_key = None  # [B, L]
    if key_padding_mask is not None:
        seg = key_padding_mask[:, start:stop]
        if not bool(seg.all()):
            allowed_key = seg
    if lower is not None and int(lower.max()) > start:
        cols = torch.arange(start, stop, device=device)
        low_ok = cols[None, :] >= lower[:, None].to(device)
        allowed_key = low_ok if allowed_key is None else allowed_key & low_ok
    first_pos = kv_len - nq
    need_causal = stop - 1 > first_pos
    need_window = window is not None and start <= kv_len - 1 - window
    allowed_row = None  # [M, L]
    if need_causal or need_window:
        cols = torch.arange(start, stop, device=device) if cols is None else cols
        pos = first_pos + torch.arange(M, device=device) % nq  # [M]
        allowed_row = torch.ones(M, stop - start, dtype=torch.bool, device=device)
        if need_causal:
            allowed_row &= cols[None, :] <= pos[:, None]
        if need_window:
            allowed_row &= cols[None, :] > pos[:, None] - window
    if allowed_key is None and allowed_row is None:
        return attend(qg, k, v, scale)
    if allowed_row is None:
        allowed = allowed_key[:, None, None, :]
    elif allowed_key is None:
        allowed = allowed_row[None, None]
    else:
        allowed = allowed_key[:, None, None, :] & allowed_row[None, None]
    bias = torch.zeros(allowed.shape, device=device).masked_fill_(~allowed, NEG_INF)
    return attend(qg, k, v, scale, bias)


def leading_pad(key_padding_mask: Optional[torch.Tensor], batch: int, device: torch.device) -> torch.Tensor:
    """[B] int64: position of each row's first real key (left padding; 0 without a mask or for an all-padding row)."""
    if key_padding_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return key_padding_mask.int().argmax(dim=-1).long()


def gather_rows(x: torch.Tensor, pos: torch.Tensor, buffer: Optional[str] = None) -> torch.Tensor:
    """x [B, Hkv, L, D] (any strides), pos [B, Hkv, *S] int64 positions -> [B, Hkv, *S, D] (a copy of those rows only).

    One ``index_select`` on a 2-D strided view of x's storage when its layout allows (a contiguous cache or a length
    slice of one), advanced indexing otherwise. ``buffer``: the name of a per-thread reused workspace to write into
    (kernels/workspace.py; a fresh ~1 MB output page-faults on every decode step and costs more than the gather),
    only when autograd is off; the result is then valid until the next call with that name."""
    B, Hkv, L, D = x.shape
    s0, s1, s2, s3 = x.stride()
    if s3 == 1 and s2 >= D and s0 % s2 == 0 and s1 % s2 == 0:
        rows = (B - 1) * (s0 // s2) + (Hkv - 1) * (s1 // s2) + L
        flat = x.as_strided((rows, D), (s2, 1), x.storage_offset())
        base = (torch.arange(B, device=x.device) * (s0 // s2))[:, None] + (torch.arange(Hkv, device=x.device) * (s1 // s2))[None, :]
        index = (pos + base.view(B, Hkv, *([1] * (pos.dim() - 2)))).reshape(-1)
        if buffer is not None and not (torch.is_grad_enabled() and x.requires_grad):
            out = workspace(buffer, (index.numel(), D), x)
            return torch.index_select(flat, 0, index, out=out).view(*pos.shape, D)
        return flat.index_select(0, index).view(*pos.shape, D)
    bi = torch.arange(B, device=x.device).view(B, *([1] * (pos.dim() - 1)))
    hi = torch.arange(Hkv, device=x.device).view(1, Hkv, *([1] * (pos.dim() - 2)))
    return x[bi, hi, pos]


def gather_kv_rows(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gather_rows` of keys and values at the same positions pos [B, Hkv, *S], into per-thread reused
    buffers (``decode_gather_k`` / ``_v``) when autograd is off and both caches share one layout; the flat row index
    is computed once."""
    if k.stride() == v.stride() and k.shape[:3] == v.shape[:3] and k.stride(-1) == 1 and not (
            torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)):
        B, Hkv, L, D = k.shape
        s0, s1, s2, _ = k.stride()
        if s2 >= max(D, v.shape[-1]) and s0 % s2 == 0 and s1 % s2 == 0:
            rows = (B - 1) * (s0 // s2) + (Hkv - 1) * (s1 // s2) + L
            base = (torch.arange(B, device=k.device) * (s0 // s2))[:, None] + \
                (torch.arange(Hkv, device=k.device) * (s1 // s2))[None, :]
            index = (pos + base.view(B, Hkv, *([1] * (pos.dim() - 2)))).reshape(-1)
            out = []
            for x, name in ((k, "decode_gather_k"), (v, "decode_gather_v")):
                flat = x.as_strided((rows, x.shape[-1]), (s2, 1), x.storage_offset())
                buf = workspace(name, (index.numel(), x.shape[-1]), x)
                out.append(torch.index_select(flat, 0, index, out=buf).view(*pos.shape, x.shape[-1]))
            return out[0], out[1]
    return gather_rows(k, pos), gather_rows(v, pos)


def _sinks(qg: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pad: torch.Tensor, num_sinks: int, *,
           scale: float, nq: int, kv_len: int,
           key_padding_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over each row's first ``num_sinks`` real keys [pad_b, pad_b + S) (StreamingLLM's sinks):
    slicing views when every row has the same padding, a gather of the S sink rows otherwise."""
    if num_sinks <= 0:
        return _empty(qg, v_cache.shape[-1])
    p0 = int(pad[0])
    if bool((pad == p0).all()):
        return _span(qg, k_cache, v_cache, p0, p0 + num_sinks, scale=scale, nq=nq, kv_len=kv_len,
                     key_padding_mask=key_padding_mask)
    B, Hkv, M, _ = qg.shape
    device = qg.device
    sp = pad[:, None] + torch.arange(num_sinks, device=device)  # [B, S]
    inside = sp < kv_len
    sp = torch.where(inside, sp, torch.zeros_like(sp))
    allowed = inside if key_padding_mask is None else inside & key_padding_mask.gather(1, sp)
    rowpos = kv_len - nq + torch.arange(M, device=device) % nq  # [M]
    allowed = allowed[:, None, :] & (sp[:, None, :] <= rowpos[None, :, None])  # [B, M, S]
    spx = sp[:, None, :].expand(B, Hkv, num_sinks)
    ks, vs = gather_rows(k_cache, spx), gather_rows(v_cache, spx)
    bias = torch.zeros(B, 1, M, num_sinks, device=device).masked_fill_(~allowed[:, None], NEG_INF)
    return attend(qg, ks, vs, scale, bias)


# Query rows per call when a decode-contract function serves a prompt chunk (in_row_tiles): its per-row masks are
# [g * rows, window + rows] for local, so a tile stays near a window's size whatever the chunk's length.
CHUNK_TILE_ROWS = 256


def in_row_tiles(fn: DecodeFn, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, scale: float,
                 kv_len: int, key_padding_mask: Optional[torch.Tensor] = None, rows: int = CHUNK_TILE_ROWS,
                 **params: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn`` (the decode contract) over the Nq query rows of q [B, Hq, Nq, D] in tiles of ``rows``: the tile of rows
    [r0, r1) (positions kv_len - Nq + r0 ...) is one call of ``fn`` over the first kv_len - Nq + r1 keys, which are
    all its rows may attend (causal). Returns (out [B, Hq, Nq, D], lse [B, Hq, Nq]) as ``fn`` does: the same rows
    as one call with every row, at a bounded tile size (a prompt chunk of thousands of rows)."""
    nq = q.shape[2]
    if nq <= rows:
        return fn(q, k_cache, v_cache, scale=scale, kv_len=kv_len, key_padding_mask=key_padding_mask, **params)
    first = kv_len - nq
    outs, lses = [], []
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        mask = None if key_padding_mask is None else key_padding_mask[:, :first + r1]
        o, s = fn(q[:, :, r0:r1], k_cache, v_cache, scale=scale, kv_len=first + r1, key_padding_mask=mask, **params)
        outs.append(o)
        lses.append(s)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _finish(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    o, l_ = ungroup(out, lse, q.shape[1], q.shape[2])
    return o.to(q.dtype), l_


# ---------------------------------------------------------------------------------------------------------------
# exact
# ---------------------------------------------------------------------------------------------------------------

def exact_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, scale: float, kv_len: int,
                 key_padding_mask: Optional[torch.Tensor] = None, index: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact grouped attention over the cache (module docstring): q [B, Hq, Nq, D], k/v_cache [B, Hkv, L, D] ->
    (out [B, Hq, Nq, D] q's dtype, lse [B, Hq, Nq] float32). ``index`` is ignored."""
    check_decode_inputs(q, k_cache, v_cache, kv_len, key_padding_mask)
    Hkv, nq = k_cache.shape[1], q.shape[2]
    qg = group_queries(q, Hkv)
    if nq == 1 and key_padding_mask is None and _fused_serves(qg, k_cache, v_cache):
        # the common decode step (one query, nothing padded): one fused call on views of the cache, nothing else
        out, lse = flash_cpu_op()(qg, k_cache[:, :, :kv_len], v_cache[:, :, :kv_len], 0.0, False, scale=scale)[:2]
        return out.reshape(q.shape), lse.reshape(q.shape[:3])
    split = kv_len - nq + 1  # keys [0, split) are visible to every row
    out, lse = _span(qg, k_cache, v_cache, 0, split, scale=scale, nq=nq, kv_len=kv_len,
                     key_padding_mask=key_padding_mask)
    if nq > 1:
        out, lse = merge_attention(out, lse, *_span(qg, k_cache, v_cache, split, kv_len, scale=scale, nq=nq,
                                                    kv_len=kv_len, key_padding_mask=key_padding_mask))
    return _finish(out, lse, q)


# ---------------------------------------------------------------------------------------------------------------
# local
# ---------------------------------------------------------------------------------------------------------------

def local_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, scale: float, kv_len: int,
                 key_padding_mask: Optional[torch.Tensor] = None, index: Any = None, window: int = LOCAL_WINDOW,
                 num_sink_tokens: int = LOCAL_NUM_SINK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Sinks + window (StreamingLLM, Xiao et al. 2023), the decode rows of ``local``'s causal pattern: query row i at
    position p attends the first ``num_sink_tokens`` real keys and the keys p - window < j <= p after them, exactly.
    Shapes as :func:`exact_decode`; both parts are slicing views of the cache."""
    check_decode_inputs(q, k_cache, v_cache, kv_len, key_padding_mask)
    if window < 0 or num_sink_tokens < 0:
        raise ValueError(f"local decode: window and num_sink_tokens must be >= 0, got {window}, {num_sink_tokens}")
    Hkv, nq = k_cache.shape[1], q.shape[2]
    qg = group_queries(q, Hkv)
    pad = leading_pad(key_padding_mask, q.shape[0], q.device)
    sink_end = pad + num_sink_tokens
    out, lse = _sinks(qg, k_cache, v_cache, pad, num_sink_tokens, scale=scale, nq=nq, kv_len=kv_len,
                      key_padding_mask=key_padding_mask)
    first_end = int(sink_end.min())
    lower = None if key_padding_mask is None or int(sink_end.max()) == first_end else sink_end
    start = max(kv_len - nq + 1 - window, first_end)
    w_out, w_lse = _span(qg, k_cache, v_cache, start, kv_len, scale=scale, nq=nq, kv_len=kv_len,
                         key_padding_mask=key_padding_mask, lower=lower, window=window)
    return _finish(*merge_attention(out, lse, w_out, w_lse), q)


# ---------------------------------------------------------------------------------------------------------------
# lsh
# ---------------------------------------------------------------------------------------------------------------

# Defaults: local's window and sinks plus one table of 10 bits, blocks of 256 and 256 samples. On real SmolLM2-135M
# layers 3/10/20/28 (8k article, 32 decode steps) the mean relative error is 0.220 against local w1024's 0.278, at
# 2.8x grouped SDPA's speed at 32k (local w1024: 8.4x): eval/results/kernels_decode/results.md.
LSH_WINDOW = LOCAL_WINDOW
LSH_NUM_SINK_TOKENS = LOCAL_NUM_SINK_TOKENS
LSH_BLOCK_SIZE = 256
LSH_SAMPLE_SIZE = 256
LSH_NUM_PROJS = 10
LSH_NUM_TABLES = 1
LSH_RESORT_EVERY = 512  # <= window: the unsorted tail of the index always lies inside the exact window


def build_lsh_index(k_cache: torch.Tensor, kv_len: int, key_padding_mask: Optional[torch.Tensor] = None, *,
                    lsh_num_projs: int = LSH_NUM_PROJS, lsh_num_tables: int = LSH_NUM_TABLES,
                    resort_every: int = LSH_RESORT_EVERY, seed: int = 0, **_: Any) -> DecodeIndex:
    """The ``lsh`` method's index of the first kv_len keys of k_cache [B, Hkv, L, D] (decode_index.py)."""
    return DecodeIndex.build(k_cache, kv_len=kv_len, key_padding_mask=key_padding_mask, lsh_num_projs=lsh_num_projs,
                             lsh_num_tables=lsh_num_tables, resort_every=resort_every, seed=seed)


def lsh_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *, scale: float, kv_len: int,
               key_padding_mask: Optional[torch.Tensor] = None, index: Optional[DecodeIndex] = None,
               window: int = LSH_WINDOW, num_sink_tokens: int = LSH_NUM_SINK_TOKENS, block_size: int = LSH_BLOCK_SIZE,
               sample_size: int = LSH_SAMPLE_SIZE, lsh_num_projs: int = LSH_NUM_PROJS,
               lsh_num_tables: int = LSH_NUM_TABLES, resort_every: int = LSH_RESORT_EVERY,
               seed: int = 0, stats: Optional[dict] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sinks + window exactly, the middle keys through the index: each query's sorted-LSH block in every table
    (exact scores) and ``sample_size`` uniform samples of the middle per (batch, KV head) with weight
    |middle| / sample_size, samples that fall in the query's blocks counted 0 (docs/methods/decode.md).

    Shapes as :func:`exact_decode`. ``index``: a :class:`DecodeIndex` describing the first kv_len keys (its own hashing
    parameters rule); None builds one for this call (O(kv_len log kv_len): for tests, not for decoding). Keys at
    positions >= index.indexed (appended, not yet sorted) are attended exactly with the window: for Nq = 1 the exact
    part is [min(kv_len - window, index.indexed), kv_len). When the middle is no larger than what the blocks and the
    samples would touch, the call is exact attention. Samples are drawn from a generator seeded by (seed, kv_len):
    the same call gives the same result. ``stats`` (a dict) receives the block positions, the middle and the key
    counts.
    """
    check_decode_inputs(q, k_cache, v_cache, kv_len, key_padding_mask)
    if min(window, num_sink_tokens) < 0 or block_size < 1 or sample_size < 0:
        raise ValueError("lsh decode: window, num_sink_tokens, sample_size must be >= 0 and block_size >= 1")
    if index is None:
        index = build_lsh_index(k_cache, kv_len, key_padding_mask, lsh_num_projs=lsh_num_projs,
                                lsh_num_tables=lsh_num_tables, resort_every=resort_every, seed=seed)
    if not index.matches(kv_len, q.shape[0]):
        raise ValueError(f"lsh decode: the index describes {index.length} positions, the cache has kv_len={kv_len} "
                         "(append the new keys with index.append, follow crops / beam reorders with index.crop / "
                         "index.reorder, or rebuild it)")
    B, Hq, nq, D = q.shape
    Hkv = k_cache.shape[1]
    device = q.device
    pad = leading_pad(key_padding_mask, B, device)
    sink_end = pad + num_sink_tokens  # [B]
    first_end = int(sink_end.min())
    uniform = key_padding_mask is None or int(sink_end.max()) == first_end
    e0 = max(min(kv_len - nq + 1 - window, index.indexed), first_end, 0)  # exact part: [e0, kv_len)
    mid_len = (e0 - sink_end).clamp_min(0)  # [B]: middle = [sink_end_b, e0)
    mid_max = max(e0 - first_end, 0)
    T = index.num_tables
    blk = min(block_size, index.indexed)
    if mid_max <= T * blk + sample_size:
        if stats is not None:
            stats.update(mode="exact", middle=mid_max)
        return exact_decode(q, k_cache, v_cache, scale=scale, kv_len=kv_len, key_padding_mask=key_padding_mask)

    qg = group_queries(q, Hkv)
    M = qg.shape[2]
    lower = None if uniform else sink_end
    parts = [_sinks(qg, k_cache, v_cache, pad, num_sink_tokens, scale=scale, nq=nq, kv_len=kv_len,
                    key_padding_mask=key_padding_mask),
             _span(qg, k_cache, v_cache, e0, kv_len, scale=scale, nq=nq, kv_len=kv_len,
                   key_padding_mask=key_padding_mask, lower=lower)]

    # heavy keys: each query's block in each table (Algorithm 1 FINDHEAVY of Indyk et al., sorted LSH), exact scores
    q_codes = index.hash_queries(qg)  # [B, Hkv, T, M]
    pos, lo_key, hi_key = index.lookup(q_codes, blk)  # [B, Hkv, T, M, blk]
    low = first_end if uniform else sink_end.view(B, 1, 1, 1)
    allowed_t = []
    for t in range(T):
        p_t = pos[:, :, t]  # [B, Hkv, M, blk]
        ok = (p_t >= low) & (p_t < e0)
        if t > 0:  # a key already in an earlier table's block of this row is counted there
            ok &= ~index.in_blocks(p_t, lo_key, hi_key, tables=range(t))
        allowed_t.append(ok)
    X = T * blk
    pos_rows = pos[:, :, 0] if T == 1 else pos.permute(0, 1, 3, 2, 4).reshape(B, Hkv, M, X)
    allowed = allowed_t[0] if T == 1 else torch.stack(allowed_t, dim=3).reshape(B, Hkv, M, X)
    m = sample_size
    bias = torch.zeros(B, Hkv, M, X + m, device=device)
    bias[..., :X].masked_fill_(~allowed, NEG_INF)
    all_pos = pos_rows

    # light keys: uniform samples of the middle, weight |middle| / m, in-block samples count 0 (APPROXLIGHT); one
    # draw per (batch, KV head), shared by its query rows (gathered with each row's block: one fused call for both)
    if m > 0:
        gen = torch.Generator(device="cpu").manual_seed((int(seed) * 1_000_003 + kv_len) % (1 << 62))
        u = torch.rand(B, Hkv, 1, m, generator=gen).to(device)
        if uniform:
            sp = (u * mid_max).long().add_(first_end)  # [B, Hkv, 1, m]
            bias[..., X:] = math.log(mid_max / m)
        else:
            last = torch.full((B, 1, 1, 1), e0 - 1, dtype=torch.long, device=device)
            sp = torch.minimum(sink_end.view(B, 1, 1, 1) + (u * mid_len.view(B, 1, 1, 1)).long(), last)
            log_w = torch.log(mid_len.clamp_min(1).float() / m).view(B, 1, 1, 1)
            bias[..., X:] = log_w.masked_fill((mid_len == 0).view(B, 1, 1, 1), NEG_INF)
        spm = sp.expand(B, Hkv, M, m)
        bias[..., X:].masked_fill_(index.in_blocks(spm, lo_key, hi_key), NEG_INF)
        all_pos = torch.cat([pos_rows, spm], dim=-1)  # [B, Hkv, M, X + m]
    if key_padding_mask is not None:
        real = key_padding_mask.gather(1, all_pos.reshape(B, -1).clamp(0, kv_len - 1)).view(all_pos.shape)
        bias.masked_fill_(~real, NEG_INF)
    G, Xm = B * Hkv * M, X + m  # one fused call, every query row its own group of gathered keys
    kg, vg = gather_kv_rows(k_cache, v_cache, all_pos)
    kg, vg = kg.view(G, 1, Xm, D), vg.view(G, 1, Xm, v_cache.shape[-1])
    qrow = qg.reshape(G, 1, 1, D)
    if kg.dtype != torch.float32 or qrow.dtype != torch.float32:  # the log weights need float32 scores
        kg, vg, qrow = kg.float(), vg.float(), qrow.float()
    g_out, g_lse = attend(qrow, kg, vg, scale, bias.view(G, 1, 1, Xm))
    parts.append((g_out.view(B, Hkv, M, -1), g_lse.view(B, Hkv, M)))
    out, lse = merge_many(parts)
    if stats is not None:
        stats.update(mode="lsh", middle=mid_max, exact_start=e0, block_positions=pos_rows, block_allowed=allowed,
                     keys_per_row=num_sink_tokens + (kv_len - e0) + X + sample_size)
    return _finish(out, lse, q)


# ---------------------------------------------------------------------------------------------------------------
# registrations
# ---------------------------------------------------------------------------------------------------------------

register_decode_method(
    "exact", exact_decode, params={},
    source="softmax attention (Vaswani et al. 2017), grouped-query heads (Ainslie et al. 2023) without expansion",
    summary="exact grouped attention over the cache, one fused call with lse")

register_decode_method(
    "local", local_decode,
    params={"window": Param(kind=int, low=0, help="each query attends the previous `window` positions"),
            "num_sink_tokens": Param(kind=int, low=0, help="and the first num_sink_tokens real keys")},
    source="StreamingLLM (Xiao et al. 2023): attention sinks + window",
    summary="sinks + window over the cache (views, no copy)")

register_decode_method(
    "lsh", lsh_decode,
    params={"window": Param(kind=int, low=0, help="exact window of recent positions"),
            "num_sink_tokens": Param(kind=int, low=0, help="exact first real keys (attention sinks)"),
            "block_size": Param(kind=int, low=1, help="keys around the query's code in each table's sorted "
                                                                  "order, attended exactly"),
            "sample_size": Param(kind=int, low=0, help="uniform samples of the other middle keys per "
                                                                    "(batch, KV head), weight |middle| / sample_size"),
            "lsh_num_projs": Param(kind=int, low=1, high=MAX_DECODE_LSH_PROJS,
                                   help="SimHash bits per table (index build)"),
            "lsh_num_tables": Param(kind=int, low=1, high=8, help="hash tables (index build); memory 8 "
                                                                               "bytes per key, KV head and table"),
            "resort_every": Param(kind=int, low=1, help="re-sort the index when this many appended "
                                                                      "positions are unsorted (index build)"),
            "seed": Param(kind=int, low=0, help="hyperplanes and samples")},
    index_builder=build_lsh_index,
    source="MagicPIG (Chen et al. 2024) SimHash retrieval; Indyk, Kapralov, Sheth, Wagner, 'Improved Algorithms for "
           "Kernel Matrix-Vector Multiplication Under Sparsity Assumptions' (FINDHEAVY + APPROXLIGHT); HyperAttention "
           "(Han et al. 2023) sorted LSH",
    summary="sinks + window exact, sorted-LSH blocks exact, uniform importance-weighted samples of the rest")
