"""Fuzz of every registered method on bare tensors: random shapes, GQA ratios, dtypes, masks (left / right padding,
fully masked batch rows) and lengths around every threshold (min_seq_len +- 1, block multiples +- 1).

For every call: the contract's shapes and dtypes, finite outputs, rows with no key to attend give out 0 and
lse -inf (never NaN), rows with keys a finite lse; exact attention where the method must be exact (the exact
method always; every method in a configuration that is exact by construction, and through the adapter's runtime
below min_seq_len). A call the method's own check refuses must give a reason (the adapter then runs exact)."""

from __future__ import annotations

import random

import pytest
import torch
from stress_helpers import serving_params

from hf_sparse_attn.methods import get_method, get_spec, list_methods
from hf_sparse_attn.methods.common import expand_kv_heads
from hf_sparse_attn.patches.base import LayerRuntime

pytestmark = pytest.mark.stress  # CI runs the stress suite with the rest; `pytest -m stress` runs only it

MIN_SEQ_LEN = 40
BLOCK = 16
LENGTHS = sorted({MIN_SEQ_LEN - 1, MIN_SEQ_LEN, MIN_SEQ_LEN + 1} | {m * BLOCK + d for m in (3, 4) for d in (-1, 0, 1)})
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
CASES_PER_METHOD = 24
TOLERANCE = {torch.float32: 2e-5, torch.float64: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# In-regime settings for poly (the defaults of SMALL make it serve tiny model inputs at any score range)
FUZZ_OVERRIDES = {"poly": dict(degree=0, allow_out_of_regime=False, eps=0.05)}


def _key_mask(rng: random.Random, B: int, N: int) -> tuple[torch.Tensor | None, str]:
    kind = rng.choice(["none", "left", "right", "empty_row", "mixed"])
    if kind == "none":
        return None, kind
    mask = torch.ones(B, N, dtype=torch.bool)
    for b in range(B):
        pad = rng.randint(1, N - 1)
        if kind == "left" or (kind == "mixed" and b % 2 == 0):
            mask[b, :pad] = False
        elif kind == "right" or kind == "mixed":
            mask[b, N - pad:] = False
    if kind == "empty_row":
        mask[rng.randrange(B)] = False  # a batch row with no valid key at all
    return mask, kind


def _attendable(mask: torch.Tensor | None, B: int, H: int, N: int, causal: bool) -> torch.Tensor:
    """[B, H, N] bool: query rows with at least one key to attend."""
    valid = torch.ones(B, N, dtype=torch.bool) if mask is None else mask
    rows = torch.cumsum(valid.long(), 1) > 0 if causal else valid.any(1, keepdim=True).expand(B, N)
    return rows[:, None, :].expand(B, H, N)


def _case(rng: random.Random):
    B = rng.choice([1, 2, 3])
    h_kv = rng.choice([1, 2])
    groups = rng.choice([1, 2, 4])
    D = rng.choice([4, 8, 16])
    N = rng.choice(LENGTHS)
    dtype = rng.choice(DTYPES)
    causal = rng.random() < 0.5
    input_scale = rng.choice([1.0, 0.3])
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    q = (torch.randn(B, h_kv * groups, N, D, generator=g) * input_scale).to(dtype)
    k = (torch.randn(B, h_kv, N, D, generator=g) * input_scale).to(dtype)
    v = torch.randn(B, h_kv, N, D, generator=g).to(dtype)
    mask, kind = _key_mask(rng, B, N)
    return dict(q=q, k=k, v=v, mask=mask, mask_kind=kind, causal=causal, groups=groups, scale=D ** -0.5)


def _check_contract(name, c, out, lse):
    q = c["q"]
    B, H, N, D = q.shape
    label = f"{name} B={B} H={H} N={N} D={D} {q.dtype} causal={c['causal']} mask={c['mask_kind']}"
    assert out.shape == q.shape and out.dtype == q.dtype, label
    assert lse.shape == (B, H, N) and lse.dtype == torch.float32, label
    assert torch.isfinite(out).all(), f"{label}: non-finite output"
    assert not torch.isnan(lse).any() and not (lse == float("inf")).any(), f"{label}: NaN / +inf lse"
    rows = _attendable(c["mask"], B, H, N, c["causal"])
    assert torch.all(out[~rows] == 0), f"{label}: rows with no key must give 0"
    assert torch.all(lse[~rows] == float("-inf")), f"{label}: rows with no key must give lse -inf"
    assert torch.isfinite(lse[rows]).all(), f"{label}: rows with keys must give a finite lse"
    return label


def _assert_exact(label, out, ref, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol * 4, rtol=tol * 4, msg=lambda m: f"{label}: {m}")


@pytest.mark.parametrize("name", list_methods())
def test_fuzz_every_method_on_bare_tensors(name):
    rng = random.Random(f"fuzz-{name}")
    params = dict(serving_params(name, MIN_SEQ_LEN))
    params.update({k: v for k, v in FUZZ_OVERRIDES.get(name, {}).items() if k in get_spec(name).params})
    spec = get_spec(name)
    fn = get_method(name, **params)
    exact = get_method("exact")
    served = refused = 0
    for _ in range(CASES_PER_METHOD):
        c = _case(rng)
        k = expand_kv_heads(c["k"], c["groups"])
        v = expand_kv_heads(c["v"], c["groups"])
        ref, _ = exact(c["q"], k, v, causal=c["causal"], scale=c["scale"], key_padding_mask=c["mask"])
        reason = spec.why_not(c["q"], k, c["causal"], c["mask"], fn.method_params, c["scale"])
        if reason:
            assert isinstance(reason, str) and reason.strip()
            refused += 1
            continue
        out, lse = fn(c["q"], k, v, causal=c["causal"], scale=c["scale"], key_padding_mask=c["mask"],
                      generator=torch.Generator().manual_seed(0))
        label = _check_contract(name, c, out, lse)
        served += 1
        if name == "exact":
            # the reference itself against a plain float64 softmax
            scores = (c["q"].double() @ k.double().transpose(-1, -2)) * c["scale"]
            allowed = torch.ones(scores.shape[-2:], dtype=torch.bool)
            allowed = (allowed.tril() if c["causal"] else allowed)[None, None]
            if c["mask"] is not None:
                allowed = allowed & c["mask"][:, None, None, :]
            plain = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0) @ v.double()
            _assert_exact(label, out, plain, c["q"].dtype)
        # the same call through the adapter's runtime: below min_seq_len it must hand over to exact attention
        runtime = LayerRuntime(0, name, fn.method_params, seed=0)
        routed = runtime.attend(c["q"], c["k"], c["v"], scale=c["scale"], causal=c["causal"], key_padding_mask=c["mask"])
        min_len = int(fn.method_params.get("min_seq_len", 0) or 0)
        if c["q"].shape[2] < min_len:
            assert routed is None, f"{label}: below min_seq_len the runtime must run exact attention"
        else:
            assert routed is not None and torch.equal(routed, out), f"{label}: runtime and bare call differ"
    assert served >= CASES_PER_METHOD // 3, f"{name}: only {served} of {CASES_PER_METHOD} calls served ({refused} refused)"


# Configurations that are exact by construction: one block holding every key, no sampling, no sinks, no scaling;
# kmv with a tolerance so tight that every row is summed exactly; feature_sketch and poly below their min_seq_len.
EXACT_BY_CONSTRUCTION = {
    "hyper": dict(block_size=128, sample_size=0, num_sink_tokens=0, min_seq_len=1),
    "sparse_hyper": dict(block_size=128, num_sink_tokens=0, min_seq_len=1, scale_mode="none"),
    "kmv": dict(min_seq_len=0, eps=1e-4, causal_block=16),
    # poly has no exact configuration for arbitrary inputs (a polynomial of exp): its exact-by-construction case is
    # tests/test_poly.py::test_high_degree_tiny_input_is_exact; below min_seq_len the runtime's one decision runs
    # exact attention instead (tests/test_decision.py), the method body no longer does.
    "feature_sketch": dict(min_seq_len=1000),
    "exact": dict(query_chunk_size=7),
}


@pytest.mark.parametrize("name", sorted(EXACT_BY_CONSTRUCTION))
def test_fuzz_exact_configurations_equal_exact_attention(name):
    if name not in list_methods():
        pytest.skip(f"{name} not registered")
    known = get_spec(name).params
    fn = get_method(name, **{k: v for k, v in EXACT_BY_CONSTRUCTION[name].items() if k in known})
    exact = get_method("exact")
    rng = random.Random(f"exact-{name}")
    for _ in range(16):
        c = _case(rng)
        k = expand_kv_heads(c["k"], c["groups"])
        v = expand_kv_heads(c["v"], c["groups"])
        out, lse = fn(c["q"], k, v, causal=c["causal"], scale=c["scale"], key_padding_mask=c["mask"],
                      generator=torch.Generator().manual_seed(0))
        label = _check_contract(name, c, out, lse)
        ref, ref_lse = exact(c["q"], k, v, causal=c["causal"], scale=c["scale"], key_padding_mask=c["mask"])
        _assert_exact(label, out, ref, c["q"].dtype)
        rows = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[rows], ref_lse[rows], atol=1e-3, rtol=1e-4)
