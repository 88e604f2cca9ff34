"""Triton kernel: ``block_select``'s three key sets (sinks, window, selected keys) in one pass with log-sum-exp.

Same result as the torch path of ``hf_sparse_attn.methods.block_select`` (window.window_attention and
``selected_attention`` over the sinks with the selected keys, merged through their lse values), on inputs already
rolled past their left padding:

    q, k, v    [B, H, N, D] float32 (self-attention, KV heads expanded), D == Dv
    key_valid  [B, N] bool (True = may be attended) or None
    pos, ok    [B, H, T, M] int64 / bool: key set t serves rows [t R, (t + 1) R) (R = rows_per_set; T = 1 and R = N
               for the vertical selection), its keys ascending
    out, lse   [B, H, N, D], [B, H, N] float32 (0 and -inf for a row with no key)

Row i attends, among the valid keys: the sinks {j < S, j <= i}; the window {i - W < j <= i, j >= S}; the selected
{pos[t, m] : ok[t, m], pos[t, m] <= i - W}. The three sets are disjoint (the selection never holds a sink and stays
behind the window), so one online softmax (running max m, running sum l, rescaled accumulator) over the three key
ranges gives exact attention over their union; no [N, N] tensor, no gathered copy of the selected keys.

One program handles BLOCK_M rows of one (batch, head). Imported only when a CUDA tensor that needs no gradient meets
an importable Triton (methods/block_select.py); tests run it on CPU tensors with TRITON_INTERPRET=1 set before Triton
is imported.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_online import online_softmax_step


@triton.jit
def _online_step(q, k, v, allowed, m_i, l_i, acc, scale):
    s = tl.where(allowed, tl.dot(q, tl.trans(k)) * scale, float("-inf"))
    return online_softmax_step(s, v, m_i, l_i, acc)


@triton.jit
def _block_select_kernel(
    Q, K, V, VALID, POS, OK, OUT, LSE,
    scale, N, H, S, W, T, M, D, ROWS_PER_SET,
    HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    m_start = tl.program_id(1) * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_in = offs_m < N
    d_ok = offs_d < D
    base = bh * N * D
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :], mask=row_in[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # sinks: keys [0, S), j <= i
    for n_start in range(0, S, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        key_in = (offs_n < S) & (offs_n < N)
        if HAS_VALID:
            key_in = key_in & (tl.load(VALID + b * N + offs_n, mask=key_in, other=0) != 0)
        kv_mask = key_in[:, None] & d_ok[None, :]
        k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        allowed = key_in[None, :] & (offs_n[None, :] <= offs_m[:, None])
        m_i, l_i, acc = _online_step(q, k, v, allowed, m_i, l_i, acc, scale)

    # window: i - W < j <= i, j >= S, over the keys some row of the tile may see
    lo = tl.maximum(S, m_start - W + 1)
    hi = tl.minimum(N, m_start + BLOCK_M)
    for n_start in range(lo, hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        key_in = offs_n < hi
        if HAS_VALID:
            key_in = key_in & (tl.load(VALID + b * N + offs_n, mask=key_in, other=0) != 0)
        kv_mask = key_in[:, None] & d_ok[None, :]
        k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        allowed = key_in[None, :] & (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] > offs_m[:, None] - W)
        m_i, l_i, acc = _online_step(q, k, v, allowed, m_i, l_i, acc, scale)

    # selected keys of the tile's key set: pos <= i - W and ok
    t = tl.minimum(m_start // ROWS_PER_SET, T - 1)
    set_base = (bh * T + t) * M
    for n_start in range(0, M, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        slot_in = offs_n < M
        p = tl.load(POS + set_base + offs_n, mask=slot_in, other=0)
        key_in = slot_in & (tl.load(OK + set_base + offs_n, mask=slot_in, other=0) != 0)
        kv_mask = key_in[:, None] & d_ok[None, :]
        k = tl.load(K + base + p[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + base + p[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
        allowed = key_in[None, :] & (p[None, :] <= offs_m[:, None] - W)
        m_i, l_i, acc = _online_step(q, k, v, allowed, m_i, l_i, acc, scale)

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    out = tl.where(has_key[:, None], out, 0.0)
    lse = tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), float("-inf"))
    tl.store(OUT + base + offs_m[:, None] * D + offs_d[None, :], out, mask=row_in[:, None] & d_ok[None, :])
    tl.store(LSE + bh * N + offs_m, lse, mask=row_in)


def rows_per_program(rows_per_set: int, num_sets: int) -> Optional[int]:
    """BLOCK_M for a call: 64 rows for one key set; for several (moba), the largest of 64 / 32 / 16 that divides
    ``rows_per_set`` (a tile never straddles two sets), or None when none does (the torch path serves it)."""
    if num_sets == 1:
        return 64
    return next((m for m in (64, 32, 16) if rows_per_set % m == 0), None)


def block_select_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  key_valid: Optional[torch.Tensor], pos: torch.Tensor, ok: torch.Tensor, *,
                                  rows_per_set: int, window: int, num_sinks: int,
                                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel (contract in the module docstring): (out [B, H, N, D], lse [B, H, N]) float32.

    No backward: refuses inputs that need a gradient (block_select sends those to its torch path). Raises ValueError
    for a value dim other than the query dim or a set size no tile divides (:func:`rows_per_program`); the caller
    checks both first."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError("the Triton block_select kernel has no backward; inputs that need a gradient must take "
                           "the torch path (methods/block_select.py does this)")
    B, H, N, D = q.shape
    T, M = pos.shape[2], pos.shape[3]
    if v.shape[3] != D:
        raise ValueError("the Triton block_select kernel needs value dim == query dim")
    block_m = rows_per_program(rows_per_set, T)
    if block_m is None:
        raise ValueError(f"no tile of 64 / 32 / 16 rows divides rows_per_set={rows_per_set}")
    q, k, v = (t.contiguous().float() for t in (q, k, v))
    pos_flat = pos.reshape(B * H * T * M).contiguous()
    ok_flat = ok.reshape(B * H * T * M).to(torch.int8).contiguous()
    has_valid = key_valid is not None
    valid = key_valid.to(torch.int8).contiguous() if has_valid else ok_flat  # unused pointer without HAS_VALID
    out = torch.empty(B, H, N, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(D))
    block_n = 64 if block_d <= 64 else 32
    grid = (B * H, triton.cdiv(N, block_m))
    _block_select_kernel[grid](q, k, v, valid, pos_flat, ok_flat, out, lse,
                               float(scale), N, H, int(num_sinks), int(window), T, M, D, int(rows_per_set),
                               HAS_VALID=has_valid, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    return out, lse
