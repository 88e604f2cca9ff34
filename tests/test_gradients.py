"""Gradients of every method: against autograd through exact attention where the method is exact, against finite
differences of the method's own forward where it approximates, and the adapter's exact fallback for a method that
declares it has no backward."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hf_sparse_attn import patch_model, unpatch_model
from hf_sparse_attn.methods import get_method, list_methods
from hf_sparse_attn.methods.registry import _REGISTRY, NO_GRADIENT_REASON, Param, get_spec, register_method

# Per method: parameters that make it compute exact attention (one block, no sampling, no sinks, no scaling; the
# kmv tolerance so tight that every row is summed exactly; poly's polynomial at relative error 1e-8).
EXACT_CONFIGS = {
    "exact": dict(query_chunk_size=16),
    "hyper": dict(block_size=64, sample_size=0, num_sink_tokens=0, min_seq_len=1),
    "sparse_hyper": dict(block_size=64, num_sink_tokens=0, min_seq_len=1, scale_mode="none"),
    "kmv": dict(min_seq_len=0, eps=1e-4, causal_block=16),
    "poly": dict(min_seq_len=0, eps=1e-8, max_features=100000),
    "local": dict(window=64, num_sink_tokens=0, min_seq_len=1),
}
# Approximating configurations (several blocks, sampling, sinks, sampled light keys, low degree, sketched features).
APPROX_CONFIGS = {
    "hyper": dict(block_size=32, sample_size=16, num_sink_tokens=4, min_seq_len=32),
    "sparse_hyper": dict(block_size=32, num_sink_tokens=4, min_seq_len=32, scale_mode="none"),
    # the theory scale alpha_i ("Attention is Naturally Sparse" Definition 5.3) is a statistic of q and k held fixed by the backward
    # (computed without gradient): only the v direction is the derivative of the forward pass
    "sparse_hyper/theory": dict(block_size=32, num_sink_tokens=4, min_seq_len=32, scale_mode="theory"),
    "kmv": dict(min_seq_len=0, eps=0.3, causal_block=32, num_samples=8),
    "poly": dict(min_seq_len=0, degree=2, eps=0.05),
    "feature_sketch": dict(min_seq_len=0),
    "local": dict(window=16, num_sink_tokens=4, min_seq_len=1),
}


def _reference(q, k, v, causal, scale, mask):
    """Softmax attention written out with autograd ops (float64): out [B, H, N, D]; masked rows give 0."""
    scores = (q @ k.transpose(-1, -2)) * scale
    allowed = torch.ones(scores.shape[-2:], dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v


def _inputs(N=64, D=8, seed=0, scale_inputs=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, w = (torch.randn(2, 2, N, D, generator=g) for _ in range(4))
    return q * scale_inputs, k * scale_inputs, v, w


@pytest.mark.parametrize("name", sorted(EXACT_CONFIGS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_gradient_equals_exact_attention_where_the_method_is_exact(name, causal, padded):
    if name not in list_methods():
        pytest.skip(f"{name} not registered")
    scale_inputs = 0.3 if name == "poly" else 1.0  # poly: scores of small range, so the polynomial reaches 1e-8
    q, k, v, w = _inputs(scale_inputs=scale_inputs)
    mask = None
    if padded:
        mask = torch.ones(2, 64, dtype=torch.bool)
        mask[1, :20] = False  # left padding: causal rows 0..19 of batch 1 attend nothing (out 0, gradient 0)
    fn = get_method(name, **EXACT_CONFIGS[name])
    grads = []
    for use_method in (True, False):
        leaves = [t.double().clone().requires_grad_() for t in (q, k, v)]
        if use_method:
            out, _ = fn(*[t.float() for t in leaves], causal=causal, scale=0.35, key_padding_mask=mask,
                        generator=torch.Generator().manual_seed(0))
        else:
            out = _reference(*leaves, causal, 0.35, mask)
        (out.double() * w.double()).sum().backward()
        assert out.shape == q.shape and torch.isfinite(out).all()
        grads.append([t.grad for t in leaves])
    tol = dict(atol=2e-4, rtol=2e-3) if name == "poly" else dict(atol=2e-5, rtol=1e-4)
    for got, want, label in zip(grads[0], grads[1], "qkv"):
        assert torch.isfinite(got).all(), f"{name}: d{label} has non-finite entries"
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name} d{label}: {m}")


def _bound_rows(t: torch.Tensor) -> torch.Tensor:
    """[B, H, N] bool: the rows holding the largest row norm and the largest |entry| of ``t`` (all heads): poly's
    score bound R depends on them alone, so a perturbation away from them keeps its polynomial fixed."""
    rows = torch.zeros(t.shape[:-1], dtype=torch.bool)
    for score in (t.norm(dim=-1), t.abs().amax(dim=-1)):
        rows.view(-1)[score.reshape(-1).argmax()] = True
    return rows


@pytest.mark.parametrize("name", sorted(APPROX_CONFIGS))
@pytest.mark.parametrize("causal", [False, True])
def test_gradient_is_the_derivative_of_the_forward_pass(name, causal):
    """Autograd's directional derivative equals a central finite difference of the same forward pass (same
    generator seed). Hashing, sampling and budgets are piecewise constant in q and k: a step that crosses one of
    their boundaries makes the two finite differences (steps h and h/2) disagree with each other, and that
    direction is skipped; values never move a hash, so the v direction is always checked."""
    name, _, variant = name.partition("/")
    if name not in list_methods():
        pytest.skip(f"{name} not registered")
    N, D = (16, 64) if name == "feature_sketch" else (96, 8)  # feature_sketch works when D >= 2 N
    g = torch.Generator().manual_seed(1)
    q, k, v, w = (torch.randn(1, 2, N, D, generator=g) for _ in range(4))
    if name == "poly":
        q, k = q * 0.5, k * 0.5
    directions = [torch.randn(1, 2, N, D, generator=g) for _ in range(3)]
    if name == "poly":
        directions[0][_bound_rows(q)] = 0.0
        directions[1][_bound_rows(k)] = 0.0
    mask = torch.ones(1, N, dtype=torch.bool)
    mask[0, :5] = False
    fn = get_method(name, **APPROX_CONFIGS[name + ("/" + variant if variant else "")])

    def loss(q, k, v):
        out, lse = fn(q, k, v, causal=causal, scale=D ** -0.5, key_padding_mask=mask,
                      generator=torch.Generator().manual_seed(0))
        return (out * w).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * w[..., 0]).sum()

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    loss(*leaves).backward()
    checked = []
    for i, label in enumerate("qkv"):
        if variant == "theory" and label != "v":
            continue
        grad = leaves[i].grad
        assert grad is not None and torch.isfinite(grad).all(), f"{name}: d{label} missing or non-finite"
        analytic = float((grad * directions[i]).sum())
        fds = []
        for h in (2e-3, 1e-3):
            plus, minus = [q, k, v], [q, k, v]
            plus[i] = plus[i] + h * directions[i]
            minus[i] = minus[i] - h * directions[i]
            with torch.no_grad():
                fds.append(float(loss(*plus) - loss(*minus)) / (2 * h))
        smooth = abs(fds[0] - fds[1]) <= 0.01 * max(abs(fds[1]), 1.0)
        if not smooth and not (label == "v" and name in ("hyper", "sparse_hyper", "poly", "feature_sketch", "local")):
            continue
        assert abs(analytic - fds[1]) <= 0.02 * max(abs(fds[1]), 1.0), \
            f"{name} causal={causal} d{label}: autograd {analytic:.5f} vs finite difference {fds}"
        checked.append(label)
    assert "v" in checked and (variant == "theory" or "q" in checked)


@pytest.fixture
def no_grad_method():
    """A method that declares no backward (an exact computation behind torch.no_grad: autograd could not see it)."""
    def opaque_attention(q, k, v, *, causal, scale, key_padding_mask=None, generator=None, min_seq_len=1):
        exact = get_spec("exact").fn
        with torch.no_grad():
            return exact(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)

    register_method("test_opaque", opaque_attention, params={"min_seq_len": Param(1, int, low=0)},
                    supports_grad=False, summary="test-only")
    yield "test_opaque"
    _REGISTRY.pop("test_opaque", None)


def test_method_without_backward_runs_exact_attention_when_gradients_are_needed(tiny_model, no_grad_method):
    assert get_spec(no_grad_method).supports_grad is False
    model = tiny_model("llama")
    ids = torch.randint(3, 101, (2, 24), generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plan = patch_model(model, method=no_grad_method, layers="all")
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if n in want:
            torch.testing.assert_close(p.grad, want[n], atol=1e-6, rtol=1e-5)
    for layer in plan.layers:
        assert layer.fallbacks == {NO_GRADIENT_REASON: 1} and layer.served == 0
    with torch.no_grad():  # no gradient needed: the method serves
        model(ids)
    assert all(layer.served == 1 for layer in plan.layers)
    # without the declaration the gradient would be lost silently: the same function as a "grad" method
    unpatch_model(model)


@pytest.mark.parametrize("name", sorted(n for n in APPROX_CONFIGS if "/" not in n))
def test_training_step_through_a_patched_model(tiny_model, name):
    """loss.backward() through a patched tiny Llama: finite gradients on every attention weight of the patched
    layers, and the method served (or the plan says why not)."""
    model = tiny_model("llama")
    params = dict(APPROX_CONFIGS[name])
    params.pop("causal_block", None)
    if name == "feature_sketch":
        params["min_dim_ratio"] = 0.0
    if name == "poly":
        params["allow_out_of_regime"] = True
    plan = patch_model(model, method=name, layers="all", **params)
    ids = torch.randint(3, 101, (2, 40), generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()
            assert proj.weight.grad.abs().sum() > 0
    for layer in plan.layers:
        assert layer.served + sum(layer.fallbacks.values()) == 1
        assert NO_GRADIENT_REASON not in layer.fallbacks  # these methods have a backward
    unpatch_model(model)


def test_every_registered_method_declares_gradient_support():
    for name in list_methods():
        assert isinstance(get_spec(name).supports_grad, bool)
    with pytest.raises(TypeError, match="supports_grad"):
        register_method("test_bad_flag", get_spec("exact").fn, supports_grad="yes")


TRITON_DISPATCH_CHILD = textwrap.dedent(
    """
    import torch
    import triton  # noqa: F401  (imported under TRITON_INTERPRET=1)
    import hf_sparse_attn.kernels as kernels
    from hf_sparse_attn.kernels import triton_sorted_blocks
    from hf_sparse_attn.methods import get_method

    calls = []
    real = triton_sorted_blocks.sorted_block_attention_triton

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    triton_sorted_blocks.sorted_block_attention_triton = counting
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 96, 16, generator=g) for _ in range(3))
    fn = get_method("hyper", block_size=32, sample_size=16, num_sink_tokens=0, min_seq_len=32)

    def run(q, k, v):
        return fn(q, k, v, causal=False, scale=0.25, generator=torch.Generator().manual_seed(0))[0]

    torch_out = run(q, k, v)  # CPU tensors: the torch path
    assert not calls
    kernels.use_triton = lambda t: True  # as if these were CUDA tensors: the dispatch decides on gradients alone
    triton_out = run(q, k, v)  # no gradient needed: Triton
    assert calls, "Triton was not used for a call that needs no gradient"
    torch.testing.assert_close(triton_out, torch_out, atol=1e-5, rtol=1e-4)
    n = len(calls)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        run(*leaves)  # inputs require grad but autograd is off: Triton
    assert len(calls) > n
    n = len(calls)
    out = run(*leaves)  # gradient needed: the torch path, with its backward
    assert len(calls) == n, "Triton was used for a call that needs a gradient"
    out.sum().backward()
    kernels.use_triton = lambda t: False
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    run(*ref_leaves).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        assert a.grad is not None and a.grad.abs().sum() > 0
        torch.testing.assert_close(a.grad, b.grad)
    try:  # the kernel itself refuses inputs that need a gradient
        real(leaves[0][0, 0], leaves[1][0, 0], leaves[2][0, 0], torch.zeros(1, 4, dtype=torch.long),
             torch.zeros(1, 4, dtype=torch.long), None, 0.25, torch.zeros(97, 16), torch.zeros(97))
    except RuntimeError as e:
        assert "no backward" in str(e)
    else:
        raise AssertionError("the Triton kernel accepted inputs that need a gradient")
    print("DISPATCH_OK")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_path_only_when_no_gradient_is_needed():
    """Under TRITON_INTERPRET=1 (a subprocess, so the setting never leaks): with the device condition forced,
    calls that need no gradient go through the Triton kernel and equal the torch path; calls that need one take the
    torch path and get its gradients; the kernel itself raises on such inputs."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", TRITON_DISPATCH_CHILD], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "DISPATCH_OK" in proc.stdout, f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
