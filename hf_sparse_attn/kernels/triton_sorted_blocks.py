"""Triton kernel: sorted-block attention with log-sum-exp, gathering and scattering through index arrays.

Same contract as ``hf_sparse_attn.kernels.sorted_blocks_torch.sorted_block_attention_torch`` (the reference):

    q_flat [Rq, D], k_flat/v_flat [Rk, D] float32 (rows of the flattened [B*H*N, D] tensors)
    q_index [nblk, bq] int64   query rows of each block (value Rq = padding slot, result dropped)
    k_index [nblk, L] int64    key rows each block attends: its sorted key block, then the sampled keys
    bias [nblk, L] float32     additive score bias shared by the block's queries (0 / -inf / log(n/s)); or None
    out_flat [Rq + 1, D], lse_flat [Rq + 1]  written at q_index rows

One program handles BLOCK_M queries of one block and streams its L keys in tiles of BLOCK_N with the online
softmax (running max m, running sum l, rescaled accumulator), so the gather of the sorted order, the block
diagonal, the sampled residual with its weights and the merge through lse all happen in one pass without
copying q/k/v into sorted order. Rows with no finite score give out 0 and lse -inf.

Imported only when a CUDA tensor that needs no gradient meets an importable Triton (kernels/__init__.py); tests
run it on CPU tensors with TRITON_INTERPRET=1 set before Triton is imported.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_online import online_softmax_step


@triton.jit
def _sorted_block_attn_kernel(
    Q, K, V, QIDX, KIDX, BIAS, OUT, LSE,
    scale, Rq, bq, L, D,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    blk = tl.program_id(0)
    m_start = tl.program_id(1) * BLOCK_M
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_in = offs_m < bq
    q_rows = tl.load(QIDX + blk * bq + offs_m, mask=row_in, other=Rq)
    q_ok = row_in & (q_rows < Rq)
    d_ok = offs_d < D
    q = tl.load(Q + q_rows[:, None] * D + offs_d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n_start in range(0, L, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < L
        k_rows = tl.load(KIDX + blk * L + offs_n, mask=n_ok, other=0)
        k = tl.load(K + k_rows[:, None] * D + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + k_rows[:, None] * D + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        if HAS_BIAS:
            b = tl.load(BIAS + blk * L + offs_n, mask=n_ok, other=float("-inf"))
            s = s + b[None, :]
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc)

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    out = tl.where(has_key[:, None], out, 0.0)
    lse = tl.where(has_key, m_i + tl.log(tl.where(has_key, l_i, 1.0)), float("-inf"))
    tl.store(OUT + q_rows[:, None] * D + offs_d[None, :], out, mask=q_ok[:, None] & d_ok[None, :])
    tl.store(LSE + q_rows, lse, mask=q_ok)


def sorted_block_attention_triton(q_flat: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor,
                                  q_index: torch.Tensor, k_index: torch.Tensor, bias: Optional[torch.Tensor],
                                  scale: float, out_flat: torch.Tensor, lse_flat: torch.Tensor) -> None:
    """Launch the kernel (contract in the module docstring); writes ``out_flat`` / ``lse_flat`` in place.

    No backward: refuses inputs that need a gradient (``kernels.sorted_block_attention`` sends those to the torch
    path), so that a gradient is never silently lost."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q_flat, k_flat, v_flat, bias)):
        raise RuntimeError("the Triton sorted-block kernel has no backward; inputs that need a gradient must take the "
                           "torch path (hf_sparse_attn.kernels.sorted_block_attention does this)")
    nblk, bq = q_index.shape
    L = k_index.shape[1]
    Rq, D = q_flat.shape
    if v_flat.shape[1] != D:
        raise ValueError("the Triton sorted-block kernel needs value dim == query dim")
    q_flat, k_flat, v_flat = (t.contiguous().float() for t in (q_flat, k_flat, v_flat))
    q_index, k_index = q_index.contiguous(), k_index.contiguous()
    block_d = max(16, triton.next_power_of_2(D))
    block_m = 64 if bq >= 64 else max(16, triton.next_power_of_2(bq))
    block_n = 64 if block_d <= 64 else 32
    has_bias = bias is not None
    bias_arg = bias.contiguous().float() if has_bias else q_flat  # unused pointer when HAS_BIAS is False
    grid = (nblk, triton.cdiv(bq, block_m))
    _sorted_block_attn_kernel[grid](q_flat, k_flat, v_flat, q_index, k_index, bias_arg, out_flat, lse_flat,
                                    float(scale), Rq, bq, L, D,
                                    HAS_BIAS=has_bias, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
