"""kmv engine="blocks" (Indyk, Kapralov, Sheth & Wagner on the sorted-LSH blocks): exactness where it must be exact,
the paper's promises as they survive (heavy keys found with the LSH's probability, light keys unbiased), causality,
padding, GQA, determinism, the device contract, the regime check and the backward."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from hf_sparse_attn.eval.bench.kernel_suite import planted_heavy_pairs
from hf_sparse_attn.methods import get_method
from hf_sparse_attn.methods.common import expand_kv_heads
from hf_sparse_attn.methods.exact import exact_attention
from hf_sparse_attn.methods import kmv
from hf_sparse_attn.methods.registry import get_spec


pytestmark = pytest.mark.usefixtures("one_thread")


def _qkv(B=2, H=2, N=512, D=16, seed=0, Hkv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g)
    k, v = (torch.randn(B, Hkv or H, N, D, generator=g) for _ in range(2))
    v[:, :, 7] *= 6.0  # one large value row per head: an H1 column (Definition 3.1)
    return q, k, v


def _masks(B, N):
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, :40] = False  # left padding
    mask[1, N - 150:] = False  # right padding
    return mask


# approximating configuration used below: several blocks, every level of the causal recursion, samples, H1
APPROX = dict(min_seq_len=0, block_size=64, num_samples=16, causal_block=64, eps=0.5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_samples", [0, 16])
def test_one_block_is_exact(causal, num_samples):
    """One block holding every key: the heavy keys are all keys, the samples all fall in the block (count 0), so the
    result is exact attention, with H1 columns, padding and (causal) the recursion's leaves and quadrants."""
    q, k, v = _qkv()
    mask = _masks(2, 512)
    heavy_idx, heavy_sel = kmv.heavy_value_columns(v, mask[:, None].expand(2, 2, 512), gamma=0.109,
                                                   max_heavy_values=64, causal=causal)
    assert bool(heavy_sel.any())  # the H1 columns take part
    out, lse = get_method("kmv", min_seq_len=0, block_size=512, num_samples=num_samples, causal_block=64)(
        q, k, v, causal=causal, scale=0.25, key_padding_mask=mask)
    ref, ref_lse = exact_attention(q, k, v, causal=causal, scale=0.25, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-5, rtol=1e-5)
    if causal:
        assert (out[0, :, :40] == 0).all()


def test_tight_tolerance_sums_rows_exactly():
    """Algorithm 2: a row whose sample budget reaches |T| / 2 is summed exactly, so eps -> 0 gives exact attention
    even with many blocks."""
    q, k, v = _qkv(N=256)
    out, _ = get_method("kmv", min_seq_len=0, block_size=32, num_samples=8, eps=1e-4)(q, k, v, causal=False, scale=0.25)
    ref, _ = exact_attention(q, k, v, causal=False, scale=0.25)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_planted_heavy_keys_found_with_the_measured_probability():
    """Lemma 3.4 becomes "found with the LSH's probability": 4 heads x 256 planted pairs at cosine 0.9, 4096
    tokens, 7 hyperplanes, blocks of 256 (16 blocks). Measured over seeds 0-4: 0.46 (min 0.44); chance is 1/16."""
    q, k, qi, kj = planted_heavy_pairs(4096)
    rates = [float(kmv.heavy_key_found(q, k, qi, kj, seed=s).float().mean()) for s in range(5)]
    assert sum(rates) / 5 >= 0.40 and min(rates) >= 0.36, rates
    # a found pair really is attended exactly: its weight in the blocks-only output equals the exact one
    found = kmv.heavy_key_found(q, k, qi, kj, seed=0)
    assert bool(found.any())


def test_light_key_estimate_is_unbiased():
    """Lemma 3.5: given the hashes and the budgets, E[exp(lse)] = sum_j exp(score_ij) and E[exp(lse) out] = the exact
    numerator. Mean over 300 seeds: the relative error of the mass falls well below one seed's."""
    q, k, v = _qkv(B=1, H=2, N=1024, D=16, seed=3)
    q, k = q * 0.5, k * 0.5  # a broad softmax: most mass in the light keys
    ref, ref_lse = exact_attention(q, k, v, causal=False, scale=0.25)
    fn = get_method("kmv", min_seq_len=0, block_size=64, num_samples=16, eps=0.5)
    mass, num, single, single_num = 0.0, 0.0, None, None
    seeds = 300
    for s in range(seeds):
        out, lse = fn(q, k, v, causal=False, scale=0.25, generator=torch.Generator().manual_seed(s))
        w = torch.exp(lse - ref_lse)  # estimated / exact mass of each row
        mass = mass + w / seeds
        num = num + w[..., None] * out / seeds  # estimated numerator / exact mass
        if single is None:
            single = float((w - 1).abs().mean())
            single_num = float((w[..., None] * out - ref).norm())
    mean_err = float((mass - 1).abs().mean())
    assert single > 0.03, single  # one seed is not exact: the test measures something
    assert mean_err < single / 6, (mean_err, single)  # ~ single / sqrt(300) for an unbiased estimator
    num_err = float((num - ref).norm())
    assert num_err < single_num / 6, (num_err, single_num)


def test_causal_never_looks_ahead():
    q, k, v = _qkv(N=512)
    fn = get_method("kmv", **APPROX)
    out, lse = fn(q, k, v, causal=True, scale=0.25, generator=torch.Generator().manual_seed(1))
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[:, :, 300:] += 2.0
    k2[:, :, 300:] -= 3.0
    v2[:, :, 300:] *= 10.0  # also changes which later keys are H1 columns
    out2, lse2 = fn(q2, k2, v2, causal=True, scale=0.25, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out[:, :, :300], out2[:, :, :300], atol=1e-6, rtol=0)
    torch.testing.assert_close(lse[:, :, :300], lse2[:, :, :300], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, :, 300:], out2[:, :, 300:])


@pytest.mark.parametrize("causal", [False, True])
def test_padded_keys_are_never_attended(causal):
    q, k, v = _qkv(N=512)
    mask = _masks(2, 512)
    fn = get_method("kmv", **APPROX)
    out, lse = fn(q, k, v, causal=causal, scale=0.25, key_padding_mask=mask, generator=torch.Generator().manual_seed(2))
    k2, v2 = k.clone(), v.clone()
    k2[~mask[:, None].expand_as(k2[..., 0])] = 50.0
    v2[~mask[:, None].expand_as(v2[..., 0])] = -50.0
    out2, lse2 = fn(q, k2, v2, causal=causal, scale=0.25, key_padding_mask=mask, generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, out2, atol=1e-5, rtol=1e-5)
    ref, _ = exact_attention(q, k, v, causal=causal, scale=0.25, key_padding_mask=mask)
    assert _error_in_rms_v(out, ref, v) < APPROX["eps"]


def _error_in_rms_v(out, ref, v):
    """rms error over rms(v): the per-row tolerance is eps * sigma_v (A.1.4 reports error / ||v||)."""
    return float((out - ref).pow(2).mean().sqrt() / v.pow(2).mean().sqrt())


def test_gqa_heads_expanded_as_the_contract():
    """GQA: the adapter expands k/v to q's heads; the exact setting gives exact attention on the expanded heads and
    approximating runs stay close."""
    q, k, v = _qkv(B=1, H=4, N=512, Hkv=2)
    k, v = expand_kv_heads(k, 2), expand_kv_heads(v, 2)
    out, _ = get_method("kmv", min_seq_len=0, block_size=512, causal_block=64)(q, k, v, causal=True, scale=0.25)
    ref, _ = exact_attention(q, k, v, causal=True, scale=0.25)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    approx, _ = get_method("kmv", **APPROX)(q, k, v, causal=True, scale=0.25)
    assert _error_in_rms_v(approx, ref, v) < APPROX["eps"]


def test_deterministic_under_a_seed():
    q, k, v = _qkv(N=512)
    fn = get_method("kmv", **APPROX)
    runs = [fn(q, k, v, causal=False, scale=0.25, generator=torch.Generator().manual_seed(s))[0] for s in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert torch.equal(fn(q, k, v, causal=False, scale=0.25)[0], fn(q, k, v, causal=False, scale=0.25)[0])  # seed param


class DeviceRecorder(TorchFunctionMode):
    """Records every call that moves a tensor to the host or makes a tensor on the default device: Tensor.cpu,
    .numpy, .tolist, .to("cpu") with a literal host device, and factory functions (zeros, empty, full, arange, rand,
    ...) called without an explicit ``device``. On a GPU each of these would put a tensor off the input's device; on
    this CPU-only machine the recorder finds them all the same (the reference engine's .cpu() is caught below)."""

    FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.rand, torch.randn,
                 torch.randint, torch.linspace, torch.tensor, torch.eye}

    def __init__(self):
        super().__init__()
        self.events = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in ("cpu", "numpy", "tolist"):
            self.events.append(name)
        if name == "to" and any(isinstance(a, str) and a.startswith("cpu") for a in list(args[1:]) + [kwargs.get("device")]):
            self.events.append("to('cpu')")  # a literal host device (moves to q.device are fine)
        if func in self.FACTORIES and "device" not in kwargs:
            self.events.append(f"{name} without device")
        return func(*args, **kwargs)


@pytest.mark.parametrize("causal", [False, True])
def test_fast_path_keeps_every_tensor_on_the_input_device(causal):
    q, k, v = _qkv(N=512)
    mask = _masks(2, 512)
    with DeviceRecorder() as rec:
        get_method("kmv", **APPROX)(q, k, v, causal=causal, scale=0.25, key_padding_mask=mask)
    assert rec.events == [], rec.events
    with DeviceRecorder() as rec:  # the recorder does see the reference engine's per-head .cpu()
        get_method("kmv", min_seq_len=0, engine="reference")(q[:1, :1, :64], k[:1, :1, :64], v[:1, :1, :64],
                                                             causal=False, scale=0.25)
    assert "cpu" in rec.events


def _clustered_qkv(N=1024, D=16, seed=0):
    """Each query aligned with a few keys of its cluster, scores far apart: a peaked attention, inside Assumption A."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(N // 8, D, generator=g)
    centers = centers / centers.norm(dim=-1, keepdim=True) * 12.0
    labels = torch.arange(N) % centers.shape[0]
    k = centers[labels] + 0.3 * torch.randn(N, D, generator=g)
    q = centers[labels[torch.randperm(N, generator=g)]] + 0.3 * torch.randn(N, D, generator=g)
    return q[None, None], k[None, None], torch.randn(1, 1, N, D, generator=g)


def test_regime_check_declines_outside_and_serves_inside():
    spec = get_spec("kmv")
    params = spec.resolve_params({})
    q, k, _ = _qkv(B=1, H=2, N=1024, D=64)  # random q/k: near-uniform attention, tail >> head
    reason = spec.why_not(q, k, False, None, params, scale=0.125)
    assert reason is not None and "Assumption A" in reason and "max_head_tail=10" in reason
    cq, ck, _ = _clustered_qkv()
    ratio = float(kmv.head_tail_estimate(cq, ck, 0.25, None, False).max())
    assert ratio < 10, ratio
    assert spec.why_not(cq, ck, False, None, params, scale=0.25) is None
    assert spec.why_not(cq, ck, True, None, params, scale=0.25) is None
    assert spec.why_not(q, k, False, None, spec.resolve_params({"max_head_tail": 0.0}), scale=0.125) is None
    assert "decode" in spec.why_not(q[:, :, :1], k, True, None, params, scale=0.125)


def test_regime_check_through_the_adapter_records_the_reason(tiny_model):
    """Through patch_model: random tiny-model q/k are outside the regime, so every call runs exact attention and the
    plan counts the reason."""
    from hf_sparse_attn import patch_model, unpatch_model

    model = tiny_model("llama")
    ids = torch.randint(0, 100, (1, 96))
    with torch.no_grad():
        ref = model(ids).logits
    plan = patch_model(model, "kmv", min_seq_len=16, block_size=16, num_samples=8)
    with torch.no_grad():
        out = model(ids).logits
    counts = plan.fallback_counts()
    unpatch_model(model)
    assert any("Assumption A" in reason for reason in counts), counts
    assert sum(layer.served for layer in plan.layers) == 0
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_gradient_is_the_derivative_of_the_forward_pass(causal):
    """supports_grad stays True for kmv: autograd through the blocks engine (blocks, H1 columns, sampled light keys;
    the budgets, hashes and H1 set are piecewise constant) equals a central finite difference of the forward pass."""
    N, D = 192, 8
    g = torch.Generator().manual_seed(1)
    q, k, v, w = (torch.randn(1, 2, N, D, generator=g, dtype=torch.float64) for _ in range(4))
    mask = torch.ones(1, N, dtype=torch.bool)
    mask[0, :5] = False
    fn = get_method("kmv", min_seq_len=0, block_size=32, num_samples=8, causal_block=32, eps=1.0)  # budgets stay m0

    def loss(q, k, v):
        out, lse = fn(q.float(), k.float(), v.float(), causal=causal, scale=D ** -0.5, key_padding_mask=mask,
                      generator=torch.Generator().manual_seed(0))
        return (out.double() * w).sum() + (torch.where(torch.isfinite(lse), lse, 0.0).double() * w[..., 0]).sum()

    stats = {}
    fn(q.float(), k.float(), v.float(), causal=causal, scale=D ** -0.5, key_padding_mask=mask, stats=stats)
    assert stats["light_pairs"] > 0  # the samples take part
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    loss(*leaves).backward()
    checked = []
    for i, label in enumerate("qkv"):
        direction = torch.randn(q.shape, generator=g, dtype=torch.float64)
        if label != "v":  # a few rows only: a step then rarely moves one of their hashes
            direction[:, :, torch.randperm(N, generator=g)[8:]] = 0.0
        analytic = float((leaves[i].grad * direction).sum())
        fds = []
        for h in (1e-2, 5e-3):
            plus, minus = [q, k, v], [q, k, v]
            plus[i], minus[i] = plus[i] + h * direction, minus[i] - h * direction
            with torch.no_grad():
                fds.append(float(loss(*plus) - loss(*minus)) / (2 * h))
        if abs(fds[0] - fds[1]) > 0.01 * max(abs(fds[1]), 1.0):
            continue  # the step crossed a hash / budget boundary
        assert abs(analytic - fds[1]) <= 0.02 * max(abs(fds[1]), 1.0), (label, analytic, fds)
        checked.append(label)
    assert "v" in checked and len(checked) >= 2, checked


def test_gradient_is_exact_where_the_method_is_exact():
    q, k, v = (t[:1, :, :128].double() for t in _qkv())
    fn = get_method("kmv", min_seq_len=0, block_size=128, num_samples=8, causal_block=32)
    grads = []
    for method in (True, False):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if method:
            out, _ = fn(*[t.float() for t in leaves], causal=True, scale=0.25)
        else:
            out, _ = exact_attention(*leaves, causal=True, scale=0.25)
        out.double().pow(2).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
