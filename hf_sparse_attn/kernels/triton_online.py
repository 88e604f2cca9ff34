"""The online-softmax step the Triton kernels share (FlashAttention's running max, running sum and rescaled
accumulator): fold one tile of scores into a row block's state. Imported only with Triton (kernels/__init__.py)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc):
    """s [BLOCK_M, BLOCK_N] scores of one key tile (-inf where a key is not attended), v [BLOCK_N, BLOCK_D] its
    values; m_i, l_i [BLOCK_M] and acc [BLOCK_M, BLOCK_D] the running max, sum and accumulator -> the updated three.
    A row with no finite score so far keeps m -inf, l 0 and acc 0 (never NaN)."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p, v)
    return m_new, l_i, acc
