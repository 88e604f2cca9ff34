"""sorted_blocks.causal_query_chunk_divisor: the override of CAUSAL_QUERY_CHUNK_DIVISOR that
scripts/defaults_query_chunk.py measures with changes the query chunks of the causal quadrants, not the output,
and restores the value."""

import pytest
import torch

import hf_sparse_attn.kernels as kernels
from hf_sparse_attn.methods import defaults, get_method, sorted_blocks

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 128


def _run(method: str, q, k, v, monkeypatch) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """out of one causal call and the (chunks, queries per chunk) of every sorted-block kernel call it made."""
    shapes = []
    orig = kernels.sorted_block_attention

    def counting(q_flat, k_flat, v_flat, q_index, *args, **kwargs):
        shapes.append(tuple(q_index.shape))
        return orig(q_flat, k_flat, v_flat, q_index, *args, **kwargs)

    monkeypatch.setattr(kernels, "sorted_block_attention", counting)
    params = dict(causal_mode="recursive", min_seq_len=1024, block_size=BLOCK, num_sink_tokens=16)
    if method == "hyper":
        params["sample_size"] = 32
    with torch.no_grad():
        out = get_method(method, **params)(q, k, v, causal=True, scale=0.25)[0]
    monkeypatch.setattr(kernels, "sorted_block_attention", orig)
    return out, shapes


@pytest.mark.parametrize("method", ["hyper", "sparse_hyper"])
def test_override_changes_the_chunks_not_the_output_and_restores(method, monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4096, 16, generator=g) for _ in range(3))  # 2 levels above leaves of 1024
    default = sorted_blocks.CAUSAL_QUERY_CHUNK_DIVISOR
    assert default == defaults.CAUSAL_QUERY_CHUNK_DIVISOR
    outs, chunks = {}, {}
    for d in (1, 2, 4):
        with sorted_blocks.causal_query_chunk_divisor(d):
            assert sorted_blocks.CAUSAL_QUERY_CHUNK_DIVISOR == d
            outs[d], shapes = _run(method, q, k, v, monkeypatch)
        assert sorted_blocks.CAUSAL_QUERY_CHUNK_DIVISOR == default
        assert len(shapes) == 2  # one batched call per level
        assert {s[1] for s in shapes} == {BLOCK // d}
        chunks[d] = sum(s[0] for s in shapes)
    assert chunks[1] < chunks[2] < chunks[4]  # smaller chunks: more of them
    for d in (1, 4):
        assert torch.allclose(outs[d], outs[2], rtol=1e-5, atol=1e-6), (outs[d] - outs[2]).abs().max()
    out_default, shapes = _run(method, q, k, v, monkeypatch)  # no override: the default divisor
    assert {s[1] for s in shapes} == {BLOCK // default}
    assert torch.equal(out_default, outs[default])


def test_override_restores_after_an_error_and_refuses_bad_divisors():
    default = sorted_blocks.CAUSAL_QUERY_CHUNK_DIVISOR
    with pytest.raises(RuntimeError, match="inside"):
        with sorted_blocks.causal_query_chunk_divisor(8):
            assert sorted_blocks.CAUSAL_QUERY_CHUNK_DIVISOR == 8
            raise RuntimeError("inside")
    assert sorted_blocks.CAUSAL_QUERY_CHUNK_DIVISOR == default
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="int >= 1"):
            with sorted_blocks.causal_query_chunk_divisor(bad):
                pass
    assert sorted_blocks.CAUSAL_QUERY_CHUNK_DIVISOR == default
