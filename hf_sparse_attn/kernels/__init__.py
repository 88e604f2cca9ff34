"""Device kernels, dispatched lazily: Triton only for CUDA tensors when ``triton`` imports and no gradient is
needed, torch otherwise.

The Triton kernel writes its results into preallocated outputs outside autograd and has no backward, so a call
whose inputs need a gradient (autograd recording and q, k, v or the bias requiring grad) always takes the torch
path, whose backward is autograd's. Importing this package never imports Triton; the torch code in
``hf_sparse_attn.kernels.sorted_blocks_torch`` is the reference and the CPU path. ``workspace`` holds the per-thread
reused buffers of the torch path.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .grad import needs_grad  # noqa: F401  (one definition: grad.py)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when ``import triton`` works (checked once)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernel can serve tensors like ``t``: CUDA tensors with Triton importable (the gradient
    condition is checked by :func:`sorted_block_attention`)."""
    return t.is_cuda and triton_available()


def sorted_block_attention(q_flat: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor,
                           q_index: torch.Tensor, k_index: torch.Tensor, bias: Optional[torch.Tensor],
                           scale: float, out_flat: torch.Tensor, lse_flat: torch.Tensor,
                           may_have_empty_blocks: bool = True) -> None:
    """Attention of index-gathered blocks with a per-block key bias, written back in place with its lse.

    q_flat [Rq, D], k_flat/v_flat [Rk, D] float32; q_index [nblk, bq] int64 (value Rq = padding slot),
    k_index [nblk, L] int64, bias [nblk, L] float32 or None; out_flat [Rq + 1, D], lse_flat [Rq + 1].
    See ``hf_sparse_attn.kernels.sorted_blocks_torch.sorted_block_attention_torch`` for the full contract;
    ``may_have_empty_blocks`` False lets the torch path skip its check for blocks with no key (the Triton
    kernel handles them in its online softmax either way). Triton only when no gradient is needed (module docstring).
    """
    if use_triton(q_flat) and not needs_grad(q_flat, k_flat, v_flat, bias):
        from .triton_sorted_blocks import sorted_block_attention_triton

        return sorted_block_attention_triton(q_flat, k_flat, v_flat, q_index, k_index, bias, scale, out_flat, lse_flat)
    from .sorted_blocks_torch import sorted_block_attention_torch

    return sorted_block_attention_torch(q_flat, k_flat, v_flat, q_index, k_index, bias, scale, out_flat, lse_flat,
                                        may_have_empty_blocks)
