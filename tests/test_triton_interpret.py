"""The Triton sorted-block kernel under TRITON_INTERPRET=1 equals the torch path (small sizes, CPU tensors).

Run in a subprocess so that TRITON_INTERPRET=1 is set before Triton is imported and never leaks into the
other tests.
"""

import importlib.util
import textwrap

import pytest

from triton_child import run_under_interpreter

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

CHILD = textwrap.dedent(
    """
    import torch
    import triton  # noqa: F401  (imported under TRITON_INTERPRET=1)
    from hf_sparse_attn.kernels.triton_sorted_blocks import sorted_block_attention_triton
    from hf_sparse_attn.kernels.sorted_blocks_torch import sorted_block_attention_torch

    g = torch.Generator().manual_seed(0)
    Rq, Rk, D, nblk, bq, L = 150, 120, 24, 5, 32, 40
    q = torch.randn(Rq, D, generator=g)
    k = torch.randn(Rk, D, generator=g)
    v = torch.randn(Rk, D, generator=g)
    q_index = torch.randperm(nblk * bq, generator=g)[: nblk * bq].clamp(max=Rq).view(nblk, bq)
    q_index = torch.where(q_index >= Rq, torch.full_like(q_index, Rq), q_index)  # some padding slots
    # unique real rows per slot: rows >= Rq collapse onto the dump row
    k_index = torch.randint(0, Rk, (nblk, L), generator=g)
    bias = torch.zeros(nblk, L)
    bias[:, 30:] = 0.7  # sampled keys with weight e^0.7
    bias[1, :5] = float("-inf")
    bias[3] = float("-inf")  # a block with no key: out 0, lse -inf
    for b in (bias, None):
        outs = []
        for fn in (sorted_block_attention_torch, sorted_block_attention_triton):
            out = torch.full((Rq + 1, D), 7.0)
            lse = torch.full((Rq + 1,), 7.0)
            fn(q, k, v, q_index, k_index, b, 0.3, out, lse)
            outs.append((out[:Rq], lse[:Rq]))
        torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-4)
        assert torch.equal(torch.isinf(outs[1][1]), torch.isinf(outs[0][1]))
        fin = torch.isfinite(outs[0][1])
        torch.testing.assert_close(outs[1][1][fin], outs[0][1][fin], atol=1e-5, rtol=1e-4)
        if b is not None:
            rows = q_index[3][q_index[3] < Rq]
            assert torch.all(outs[1][0][rows] == 0) and torch.all(outs[1][1][rows] == float("-inf"))
    print("TRITON_OK")
    """
)


def test_triton_kernel_matches_torch_path_under_interpreter():
    stdout = run_under_interpreter(CHILD, timeout=300)
    assert "TRITON_OK" in stdout
