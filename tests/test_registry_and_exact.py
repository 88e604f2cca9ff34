"""The method contract, the registry's errors, and exact attention (the reference every method is tested against)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import random_qkv
from hf_sparse_attn import Param, get_method, get_spec, list_methods, merge_attention, register_method
from hf_sparse_attn.methods.registry import _REGISTRY


def _qkv(seed=0, dtype=torch.float32):
    return random_qkv(2, 3, 20, 8, seed=seed, dtype=dtype)


def test_unknown_method_lists_methods():
    with pytest.raises(ValueError) as err:
        get_method("flash_sparse")
    assert "exact" in str(err.value) and "available methods" in str(err.value)


def test_bad_parameter_names_and_ranges():
    with pytest.raises(ValueError, match="has no parameter 'block'"):
        get_method("exact", block=3)
    with pytest.raises(ValueError, match="below its minimum"):
        get_method("exact", query_chunk_size=-1)
    with pytest.raises(ValueError, match="must be an integer"):
        get_method("exact", query_chunk_size=2.5)


def test_register_method_checks_the_contract():
    def no_contract(q, k, v):
        return q, None

    with pytest.raises(TypeError, match="causal"):
        register_method("broken", no_contract)
    with pytest.raises(ValueError, match="already registered"):
        register_method("exact", get_spec("exact").fn)


def test_registered_method_is_usable_on_bare_tensors():
    def scaled_exact(q, k, v, *, causal, scale, key_padding_mask=None, generator=None, factor=1.0):
        return get_method("exact")(q, k, v, causal=causal, scale=scale * factor, key_padding_mask=key_padding_mask)

    try:
        register_method("scaled_exact_test", scaled_exact, params={"factor": Param(1.0, float, low=0.0)})
        assert "scaled_exact_test" in list_methods()
        q, k, v = _qkv()
        out, lse = get_method("scaled_exact_test", factor=1.0)(q, k, v, causal=False, scale=0.5)
        ref, _ = get_method("exact")(q, k, v, causal=False, scale=0.5)
        assert torch.equal(out, ref)
        with pytest.raises(ValueError, match="below its minimum"):
            get_method("scaled_exact_test", factor=-1.0)
    finally:
        _REGISTRY.pop("scaled_exact_test", None)


@pytest.mark.parametrize("causal", [False, True])
def test_exact_matches_sdpa_and_lse(causal):
    q, k, v = _qkv()
    out, lse = get_method("exact")(q, k, v, causal=causal, scale=0.4)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.4)
    assert torch.allclose(out, ref, atol=1e-6)
    scores = q @ k.transpose(-1, -2) * 0.4
    if causal:
        scores = scores.masked_fill(torch.ones(20, 20, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.allclose(lse, torch.logsumexp(scores, -1), atol=1e-5)
    chunked, chunked_lse = get_method("exact", query_chunk_size=3)(q, k, v, causal=causal, scale=0.4)
    assert torch.allclose(chunked, out, atol=1e-6) and torch.allclose(chunked_lse, lse, atol=1e-6)


def test_fully_masked_rows_are_zero_not_nan():
    q, k, v = _qkv()
    key_padding_mask = torch.ones(2, 20, dtype=torch.bool)
    key_padding_mask[1] = False  # batch 1: no key at all
    key_padding_mask[0, :5] = False  # batch 0, causal: queries 0..4 see no key
    out, lse = get_method("exact")(q, k, v, causal=True, scale=0.4, key_padding_mask=key_padding_mask)
    assert not torch.isnan(out).any()
    assert torch.all(out[1] == 0) and torch.all(out[0, :, :5] == 0)
    assert torch.all(torch.isneginf(lse[1])) and torch.all(torch.isfinite(lse[0, :, 5:]))


def test_key_padding_mask_excludes_keys():
    q, k, v = _qkv()
    key_padding_mask = torch.ones(2, 20, dtype=torch.bool)
    key_padding_mask[:, 15:] = False
    out, _ = get_method("exact")(q, k, v, causal=False, scale=0.4, key_padding_mask=key_padding_mask)
    ref, _ = get_method("exact")(q, k[:, :, :15], v[:, :, :15], causal=False, scale=0.4)
    assert torch.allclose(out, ref, atol=1e-6)


def test_low_precision_inputs_accumulate_in_float32():
    q, k, v = _qkv(dtype=torch.bfloat16)
    out, lse = get_method("exact")(q, k, v, causal=True, scale=0.4)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    ref, _ = get_method("exact")(q.float(), k.float(), v.float(), causal=True, scale=0.4)
    assert (out.float() - ref).abs().max() < 2e-2


def test_merge_through_lse_equals_attention_over_the_union():
    q, k, v = _qkv()
    exact = get_method("exact")
    full, full_lse = exact(q, k, v, causal=False, scale=0.4)
    a, a_lse = exact(q, k[:, :, :7], v[:, :, :7], causal=False, scale=0.4)
    b, b_lse = exact(q, k[:, :, 7:], v[:, :, 7:], causal=False, scale=0.4)
    out, lse = merge_attention(a.float(), a_lse, b.float(), b_lse)
    assert torch.allclose(out, full, atol=1e-6) and torch.allclose(lse, full_lse, atol=1e-6)
    empty = torch.full_like(a_lse, float("-inf"))
    out, lse = merge_attention(torch.zeros_like(a), empty, torch.zeros_like(b), empty)
    assert not torch.isnan(out).any() and torch.all(out == 0)


def test_shape_errors_say_what_to_do():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="expand GQA heads"):
        get_method("exact")(q, k[:, :1], v[:, :1], causal=False, scale=0.4)
    with pytest.raises(ValueError, match="decode steps go to exact"):
        get_method("exact")(q[:, :, :1], k, v, causal=True, scale=0.4)


def test_import_needs_no_triton_no_gpu_no_network():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # import of triton now fails
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network used at import')\n"
        "socket.socket.connect = refuse\n"
        "import hf_sparse_attn, hf_sparse_attn.cli\n"
        "assert 'exact' in hf_sparse_attn.list_methods()\n"
        "print(len(hf_sparse_attn.list_methods()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr
