"""block_select's Triton kernel (kernels/triton_block_select.py) under TRITON_INTERPRET=1 equals the torch path
(small sizes, CPU tensors): the three key sets on rolled inputs, and the whole method with the kernel dispatched
(left padding, both selections, probe rows).

Run in a subprocess so that TRITON_INTERPRET=1 is set before Triton is imported and never leaks into the other
tests.
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
    import hf_sparse_attn.methods.block_select as bs
    from hf_sparse_attn.kernels.triton_block_select import block_select_attention_triton

    g = torch.Generator().manual_seed(0)
    B, H, N, D = 2, 2, 150, 16
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 120:] = False  # rolled left padding sits at the end
    mask[0, 40] = False  # and a hole
    checked = 0
    for T, R in ((1, N), (5, 32)):
        pos = torch.randint(0, N, (B, H, T, 24), generator=g).sort(dim=-1).values
        ok = (pos >= 6) & (torch.rand(B, H, T, 24, generator=g) > 0.2)
        for key_valid in (None, mask):
            for S, W in ((6, 20), (0, 7), (6, 200)):
                ref_out, ref_lse = bs._attend_parts(q, k, v, key_valid, pos, ok, rows_per_set=R, window=W,
                                                    num_sinks=S, scale=0.3, shift=None)
                out, lse = block_select_attention_triton(q, k, v, key_valid, pos, ok, rows_per_set=R, window=W,
                                                         num_sinks=S, scale=0.3)
                torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
                assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
                fin = torch.isfinite(ref_lse)
                torch.testing.assert_close(lse[fin], ref_lse[fin], atol=1e-5, rtol=1e-4)
                checked += 1

    # the whole method with the kernel dispatched (as for CUDA tensors) equals its torch path
    padding = torch.ones(B, N, dtype=torch.bool)
    padding[1, :17] = False
    params = [dict(window=20, num_sink_tokens=4, num_selected=24, block_size=4, probe_queries=8),
              dict(window=20, num_sink_tokens=4, num_selected=24, block_size=8, probe_queries=8, selection="moba",
                   query_block=32)]
    for p in params:
        for m in (None, padding):
            ref = bs.block_select_attention(q, k, v, causal=True, scale=0.3, key_padding_mask=m, **p)
            torch_path_only = bs._triton_serves
            bs._triton_serves = lambda *args: True
            try:
                got = bs.block_select_attention(q, k, v, causal=True, scale=0.3, key_padding_mask=m, **p)
            finally:
                bs._triton_serves = torch_path_only
            torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-4)
            fin = torch.isfinite(ref[1])
            assert torch.equal(fin, torch.isfinite(got[1]))
            torch.testing.assert_close(got[1][fin], ref[1][fin], atol=1e-5, rtol=1e-4)
            checked += 1
    print("TRITON_OK", checked)
    """
)


def test_block_select_triton_kernel_matches_the_torch_path_under_interpreter():
    stdout = run_under_interpreter(CHILD, timeout=600)
    assert "TRITON_OK 16" in stdout
