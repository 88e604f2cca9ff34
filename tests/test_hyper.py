"""``hyper`` (HyperAttention) against exact attention and its promised properties."""

import pytest
import torch

from hf_sparse_attn.methods import get_method, get_spec, merge_attention
from hf_sparse_attn.methods.common import expand_kv_heads

SCALE = 0.25

from conftest import random_qkv as _qkv, rel_error as _rel


@pytest.mark.parametrize("causal", [False, True])
def test_exact_when_one_block_covers_and_no_samples(causal):
    q, k, v = _qkv()
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1, :40] = False
    mask[0, 250:] = False
    ref, ref_lse = get_method("exact")(q, k, v, causal=causal, scale=SCALE, key_padding_mask=mask)
    out, lse = get_method("hyper", block_size=512, sample_size=0)(q, k, v, causal=causal, scale=SCALE, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-6, rtol=1e-5)
    if causal:  # rows 0..39 of batch 1 have no key: 0 and -inf, never NaN
        assert torch.all(out[1, :, :40] == 0) and torch.all(lse[1, :, :40] == float("-inf"))
    assert not torch.isnan(out).any()


def test_causal_recursion_is_exact_when_quadrant_blocks_cover():
    # min_seq_len 100 forces 4 levels of halving; blocks cover each quadrant, so the result must be exact
    q, k, v = _qkv(N=1000)
    ref, ref_lse = get_method("exact")(q, k, v, causal=True, scale=SCALE)
    out, lse = get_method("hyper", block_size=1024, sample_size=0, min_seq_len=100, causal_mode="recursive")(
        q, k, v, causal=True, scale=SCALE)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("causal,mode", [(False, "recursive"), (True, "recursive"), (True, "single_pass")])
def test_sampled_residual_is_unbiased_lse_merge(causal, mode):
    """Block part + samples weighted n/s (own block masked) merged via lse converge to exact as s grows."""
    q, k, v = _qkv(B=1, N=768)
    ref, ref_lse = get_method("exact")(q, k, v, causal=causal, scale=SCALE)
    errs, lse_errs = [], []
    for s in (64, 1024, 16384):
        out, lse = get_method("hyper", block_size=64, sample_size=s, min_seq_len=128, causal_mode=mode, window=64)(
            q, k, v, causal=causal, scale=SCALE)
        errs.append(_rel(out, ref))
        lse_errs.append((lse - ref_lse).abs().mean().item())
    # Monte-Carlo error falls like 1/sqrt(s): 256x more samples -> ~16x less error (double-counted
    # in-block samples or a wrong weight would leave a bias that does not shrink)
    assert errs[0] > errs[1] > errs[2] and errs[2] < errs[0] / 8 and errs[2] < 0.25, errs
    assert lse_errs[2] < 0.01, lse_errs


def test_merge_attention_of_disjoint_key_sets_is_exact():
    q, k, v = _qkv(B=1, N=200)
    ref, ref_lse = get_method("exact")(q, k, v, causal=False, scale=SCALE)
    a, la = get_method("exact")(q, k[:, :, :70], v[:, :, :70], causal=False, scale=SCALE)
    b, lb = get_method("exact")(q, k[:, :, 70:], v[:, :, 70:], causal=False, scale=SCALE)
    out, lse = merge_attention(a, la, b, lb)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["recursive", "single_pass"])
def test_causality_future_tokens_do_not_change_past_outputs(mode):
    q, k, v = _qkv(B=1, N=1500, seed=1)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    t = 1100
    q2[:, :, t:] = torch.randn_like(q2[:, :, t:])
    k2[:, :, t:] += 1.0
    v2[:, :, t:] -= 3.0
    f = get_method("hyper", block_size=64, sample_size=32, min_seq_len=128, causal_mode=mode, window=128)
    out, _ = f(q, k, v, causal=True, scale=SCALE)
    out2, _ = f(q2, k2, v2, causal=True, scale=SCALE)
    assert torch.equal(out[:, :, :t], out2[:, :, :t])
    assert not torch.equal(out[:, :, t:], out2[:, :, t:])


def test_planted_heavy_keys_are_found():
    """A key planted parallel to a query dominates its row; the sorted blocks must attend it."""
    g = torch.Generator().manual_seed(2)
    B, H, N, D = 1, 2, 4096, 32
    q = torch.randn(B, H, N, D, generator=g)
    k = torch.randn(B, H, N, D, generator=g) * 0.3
    v = torch.randn(B, H, N, D, generator=g)
    queries = torch.randint(0, N, (64,), generator=g)
    planted = torch.randint(0, N, (64,), generator=g)
    k[:, :, planted] = q[:, :, queries] * 3.0
    ref, _ = get_method("exact")(q, k, v, causal=False, scale=D ** -0.5)
    out, _ = get_method("hyper", block_size=256, sample_size=0)(q, k, v, causal=False, scale=D ** -0.5)
    rel = (out[:, :, queries] - ref[:, :, queries]).norm(dim=-1) / ref[:, :, queries].norm(dim=-1)
    # 16 key blocks: a block picked blindly would hold the planted key 1 time in 16; sortLSH puts it in the
    # query's block most of the time (76% measured; misses are bucket runs cut at a block boundary)
    assert (rel < 0.1).float().mean().item() > 0.6, rel


def test_padded_keys_are_never_attended():
    q, k, v = _qkv(B=2, N=1024)
    mask = torch.ones(2, 1024, dtype=torch.bool)
    mask[0, 600:] = False
    v_poison = v.clone()
    v_poison[0, :, 600:] = 1e6  # any attention to a padded key shows up
    k_poison = k.clone()
    k_poison[0, :, 600:] = q[0, :, :424] * 5  # padded keys look like the best matches
    for causal in (False, True):
        out, lse = get_method("hyper", block_size=64, sample_size=128, min_seq_len=128)(
            q, k_poison, v_poison, causal=causal, scale=SCALE, key_padding_mask=mask)
        assert out.abs().max().item() < 100 and not torch.isnan(out).any()
    all_masked = torch.zeros(2, 1024, dtype=torch.bool)
    out, lse = get_method("hyper", block_size=64, sample_size=16)(q, k, v, causal=False, scale=SCALE, key_padding_mask=all_masked)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_deterministic_under_seed_and_generator():
    q, k, v = _qkv(N=700)
    f = get_method("hyper", block_size=64, sample_size=32)
    a, _ = f(q, k, v, causal=False, scale=SCALE)
    b, _ = f(q, k, v, causal=False, scale=SCALE)
    c, _ = get_method("hyper", block_size=64, sample_size=32, seed=1)(q, k, v, causal=False, scale=SCALE)
    assert torch.equal(a, b) and not torch.equal(a, c)
    d, _ = f(q, k, v, causal=False, scale=SCALE, generator=torch.Generator().manual_seed(9))
    e, _ = f(q, k, v, causal=False, scale=SCALE, generator=torch.Generator().manual_seed(9))
    assert torch.equal(d, e)


def test_gqa_shapes_through_expand_and_non_contiguous_views():
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, N, D = 2, 6, 2, 400, 16
    q = torch.randn(B, N, Hq, D, generator=g).transpose(1, 2)  # non-contiguous view, as HF passes it
    k = expand_kv_heads(torch.randn(B, Hkv, N, D, generator=g), Hq // Hkv)
    v = expand_kv_heads(torch.randn(B, Hkv, N, D, generator=g), Hq // Hkv)
    out, lse = get_method("hyper", block_size=512, sample_size=0)(q, k, v, causal=True, scale=SCALE)
    ref, _ = get_method("exact")(q, k, v, causal=True, scale=SCALE)
    assert out.shape == (B, Hq, N, D) and lse.shape == (B, Hq, N)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    q, k, v = _qkv(N=300, dtype=dtype)
    out, lse = get_method("hyper", block_size=512, sample_size=0)(q, k, v, causal=True, scale=SCALE)
    ref, _ = get_method("exact")(q.float(), k.float(), v.float(), causal=True, scale=SCALE)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert _rel(out, ref) < 1e-2


def test_params_and_check():
    from hf_sparse_attn.methods.hyper import NUM_SINK_TOKENS

    spec = get_spec("hyper")
    from hf_sparse_attn.methods.hyper import CAUSAL_MODE, WINDOW

    assert {n: p.default for n, p in spec.params.items() if n not in ("min_seq_len", "causal_min_seq_len")} == {
        "lsh_num_projs": 7, "block_size": 256, "sample_size": 256, "seed": 0, "num_sink_tokens": NUM_SINK_TOKENS,
        "causal_mode": CAUSAL_MODE, "window": WINDOW}
    with pytest.raises(ValueError, match="causal_mode"):
        get_method("hyper", causal_mode="recursion")
    with pytest.raises(ValueError, match="window"):
        get_method("hyper", window=-1)
    with pytest.raises(ValueError, match="num_sink_tokens"):
        get_method("hyper", num_sink_tokens=-1)
    q, k, _ = _qkv(N=64)
    params = spec.resolve_params({"min_seq_len": 16, "causal_mode": "recursive"})
    assert spec.check(q[:, :, :1], k, True, None, params) is not None  # decode step -> exact
    assert spec.check(q, k, True, None, params) is None  # 64 >= auto causal threshold 2 x 16
    with pytest.raises(ValueError, match="block_size"):
        get_method("hyper", block_size=0)


@pytest.mark.parametrize("name", ["hyper", "sparse_hyper"])
@pytest.mark.parametrize("mode", ["recursive", "single_pass"])
def test_causal_threshold_is_separate_from_min_seq_len(name, mode):
    """causal_min_seq_len (0 = auto = 2 x min_seq_len, the measured causal crossover of both causal modes) refuses
    only causal calls; bidirectional calls of the same length are served."""
    from hf_sparse_attn.methods.hyper import CAUSAL_CROSSOVER_FACTOR, causal_threshold

    spec = get_spec(name)
    q, k, _ = _qkv(B=1, N=512)
    defaults = spec.resolve_params({"causal_mode": mode})
    assert causal_threshold(defaults) == CAUSAL_CROSSOVER_FACTOR * defaults["min_seq_len"]
    auto = spec.resolve_params({"min_seq_len": 1024 // CAUSAL_CROSSOVER_FACTOR, "causal_mode": mode})  # threshold 1024
    reason = spec.check(q, k, True, None, auto)
    assert reason is not None and "causal_min_seq_len=1024" in reason
    assert spec.check(q, k, False, None, auto) is None
    explicit = spec.resolve_params({"min_seq_len": 256, "causal_min_seq_len": 512})
    assert spec.check(q, k, True, None, explicit) is None
    assert spec.check(q[:, :, :511], k[:, :, :511], True, None, explicit) is not None
    with pytest.raises(ValueError, match="causal_min_seq_len"):
        get_method(name, causal_min_seq_len=-1)


def test_adapter_counts_causal_threshold_fallback(tiny_model):
    """Through patch_model: a causal LM call below the causal threshold runs exact attention (output equal to the
    unpatched model) and the plan counts the reason; with the threshold lowered the method serves it."""
    from hf_sparse_attn import patch_model, unpatch_model

    model = tiny_model("llama")
    ids = torch.randint(0, 100, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        plan = patch_model(model, method="hyper", layers="all", min_seq_len=64, block_size=16, sample_size=8,
                           causal_mode="recursive")
        out = model(ids).logits  # 96 < 2 x 64 = 128: causal fallback
        assert torch.allclose(out, ref, atol=1e-5)
        assert sum(layer.served for layer in plan.layers) == 0
        assert plan.fallback_counts() == {"causal seq_len < causal_min_seq_len=128": 3}
        unpatch_model(model)
        plan = patch_model(model, method="hyper", layers="all", min_seq_len=32, block_size=16, sample_size=8,
                           causal_min_seq_len=64, num_sink_tokens=0, causal_mode="recursive")  # 64 default sinks would cover 64 of 96 keys
        out = model(ids).logits
        assert sum(layer.served for layer in plan.layers) == 3 and plan.fallback_counts() == {}
        assert not torch.allclose(out, ref, atol=1e-3)  # the approximation really ran
        unpatch_model(model)


def test_workspace_reuse_does_not_change_results_and_grad_path_works():
    """The reused gather buffers (sorted_blocks.workspace) must not leak state between calls of other sizes, and
    a call that needs gradients must not use them (autograd through fresh tensors)."""
    from hf_sparse_attn.kernels.workspace import clear_workspace, workspace_bytes

    f = get_method("hyper", block_size=64, sample_size=32, min_seq_len=128)
    q, k, v = _qkv(B=1, N=700)
    clear_workspace()
    first, _ = f(q, k, v, causal=True, scale=SCALE)
    assert workspace_bytes() > 0
    small = _qkv(B=2, N=300, seed=3)
    f(*small, causal=False, scale=SCALE)
    again, _ = f(q, k, v, causal=True, scale=SCALE)
    assert torch.equal(first, again)
    clear_workspace()
    assert workspace_bytes() == 0
    qg = q.clone().requires_grad_(True)
    out, _ = get_method("sparse_hyper", block_size=64, min_seq_len=128, scale_mode="none")(qg, k, v, causal=False, scale=SCALE)
    out.sum().backward()
    assert qg.grad is not None and torch.isfinite(qg.grad).all() and qg.grad.abs().sum() > 0
    assert workspace_bytes() == 0


# ---------------------------------------------------------------------------------------------------------------
# Attention sinks (num_sink_tokens): the first S keys attended exactly by every query, merged via lse, and removed
# from the sorted blocks and the samples.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("num_sinks", [1, 16, 300, 400])
def test_sinks_exact_when_one_block_covers(causal, num_sinks):
    """One block covers the sequence and the samples all fall in it: blocks + sinks must be exactly attention. A sink
    counted twice (in its block or a sample as well) would double its weight and break the equality."""
    q, k, v = _qkv()
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1, :40] = False  # padded sinks (and, causal, 40 rows with no key)
    mask[0, 250:] = False
    mask[0, 5] = False
    ref, ref_lse = get_method("exact")(q, k, v, causal=causal, scale=SCALE, key_padding_mask=mask)
    for sample_size in (0, 64):
        out, lse = get_method("hyper", block_size=512, sample_size=sample_size, num_sink_tokens=num_sinks)(
            q, k, v, causal=causal, scale=SCALE, key_padding_mask=mask)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and not torch.isnan(out).any()
        finite = torch.isfinite(ref_lse)
        torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-6, rtol=1e-5)
    # and the causal recursion (4 halvings, every quadrant covered by one block) with the sinks in its first leaf
    q, k, v = _qkv(B=1, N=1000)
    ref, _ = get_method("exact")(q, k, v, causal=True, scale=SCALE)
    out, _ = get_method("hyper", block_size=1024, sample_size=0, min_seq_len=100, num_sink_tokens=num_sinks)(
        q, k, v, causal=True, scale=SCALE)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)


def _same_bucket_qkv(N=1024, D=16, seed=0):
    """Every query and key a positive multiple of one direction u: all share one LSH bucket, so the stable sort
    keeps the original order and the blocks are known in advance."""
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    q = (0.5 + torch.rand(1, 1, N, 1, generator=g)) * u
    k = (0.5 + 2 * torch.rand(1, 1, N, 1, generator=g)) * u
    v = torch.randn(1, 1, N, D, generator=g)
    return q, k, v


def test_sinks_removed_from_blocks_no_double_counting():
    """All vectors in one bucket (sorted order = original order). With S sinks the key blocks are cut from keys
    S..N-1 only, so query block b attends exactly sinks ∪ {S + b*bk, ..., S + (b+1)*bk - 1}: compare with exact
    attention restricted to that key set (a sink also counted in block 0 would differ there)."""
    N, S, block = 1024, 64, 128
    q, k, v = _same_bucket_qkv(N)
    out, _ = get_method("hyper", block_size=block, sample_size=0, num_sink_tokens=S)(q, k, v, causal=False, scale=1.0)
    nb = N // block
    bk = -(-(N - S) // nb)
    for b in (0, 3, nb - 1):
        keys = torch.zeros(1, N, dtype=torch.bool)
        keys[0, :S] = True
        keys[0, S + b * bk:S + (b + 1) * bk] = True
        rows = slice(b * block, (b + 1) * block)
        ref, _ = get_method("exact")(q[:, :, rows], k, v, causal=False, scale=1.0, key_padding_mask=keys)
        torch.testing.assert_close(out[:, :, rows], ref, atol=1e-5, rtol=1e-5)
    # without sinks block 0 holds keys 0..127: the structure the test relies on
    plain, _ = get_method("hyper", block_size=block, sample_size=0, num_sink_tokens=0)(q, k, v, causal=False, scale=1.0)
    ref0, _ = get_method("exact")(q[:, :, :block], k[:, :, :block], v[:, :, :block], causal=False, scale=1.0)
    torch.testing.assert_close(plain[:, :, :block], ref0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_sinks_not_sampled_residual_still_unbiased(causal):
    """Heavy sinks (keys 0..31 near the queries' common direction hold 28% / 45% of the mass, non-causal / causal).
    Sampling a sink as well (weight n/s) would count that mass twice: an lse bias of log 1.28 = 0.25 / 0.37 that
    does not shrink with s. The estimate must converge: Monte-Carlo error ~ 1/sqrt(s), lse bias ~ 0."""
    g = torch.Generator().manual_seed(4)
    N, D = 768, 16
    u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    q = 2 * u + torch.randn(1, 2, N, D, generator=g)
    k = torch.randn(1, 2, N, D, generator=g)
    k[:, :, :32] = 5 * u + 0.3 * torch.randn(1, 2, 32, D, generator=g)
    v = torch.randn(1, 2, N, D, generator=g)
    ref, ref_lse = get_method("exact")(q, k, v, causal=causal, scale=SCALE)
    errs = []
    for s in (64, 16384):
        out, lse = get_method("hyper", block_size=64, sample_size=s, min_seq_len=128, num_sink_tokens=32)(
            q, k, v, causal=causal, scale=SCALE)
        errs.append(_rel(out, ref))
    # measured: rel error 1.79 -> 0.11 (non-causal), 0.47 -> 0.03 (causal); lse |bias| < 0.001 at s = 16384
    assert errs[1] < errs[0] / 8 and errs[1] < 0.2, errs
    assert (lse - ref_lse).abs().mean().item() < 0.02 and abs((lse - ref_lse).mean().item()) < 0.01


@pytest.mark.parametrize("mode", ["recursive", "single_pass"])
def test_sinks_causality_future_tokens_do_not_change_past_outputs(mode):
    q, k, v = _qkv(B=1, N=1500, seed=1)
    f = get_method("hyper", block_size=64, sample_size=32, min_seq_len=128, num_sink_tokens=64, causal_mode=mode,
                   window=128)
    out, lse = f(q, k, v, causal=True, scale=SCALE)
    for t in (30, 1100):  # a change inside the sink range, and after it
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[:, :, t:] = torch.randn_like(q2[:, :, t:])
        k2[:, :, t:] += 1.0
        v2[:, :, t:] -= 3.0
        out2, lse2 = f(q2, k2, v2, causal=True, scale=SCALE)
        assert torch.equal(out[:, :, :t], out2[:, :, :t]) and torch.equal(lse[:, :, :t], lse2[:, :, :t]), t
        assert not torch.equal(out[:, :, t:], out2[:, :, t:])


def test_sinks_padded_sink_keys_never_attended():
    q, k, v = _qkv(B=2, N=1024)
    mask = torch.ones(2, 1024, dtype=torch.bool)
    mask[0, :8] = False  # the first 8 of 16 sinks padded in batch 0 (left padding)
    mask[1, 900:] = False
    v_poison, k_poison = v.clone(), k.clone()
    v_poison[0, :, :8] = 1e6
    k_poison[0, :, :8] = q[0, :, :8].mean(1, keepdim=True) * 20  # padded sinks would dominate every row
    for causal in (False, True):
        out, lse = get_method("hyper", block_size=64, sample_size=64, min_seq_len=128, num_sink_tokens=16)(
            q, k_poison, v_poison, causal=causal, scale=SCALE, key_padding_mask=mask)
        assert out.abs().max().item() < 100 and not torch.isnan(out).any() and not torch.isnan(lse).any()
        if causal:  # rows 0..7 of batch 0 have no attendable key
            assert torch.all(out[0, :, :8] == 0) and torch.all(lse[0, :, :8] == float("-inf"))
            assert torch.isfinite(lse[0, :, 8:]).all()
    none = torch.zeros(2, 1024, dtype=torch.bool)
    out, lse = get_method("hyper", block_size=64, sample_size=16, num_sink_tokens=16)(
        q, k, v, causal=False, scale=SCALE, key_padding_mask=none)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def _heavy_first_key(N=2048, D=16, seed=3):
    """Queries share a direction u (3u + noise); key 0 = 16u dominates every row, the other keys are small noise.
    sortLSH puts key 0 into one key block, so most queries (their hashes spread by the noise) miss it."""
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0)
    q = 3 * u + torch.randn(1, 2, N, D, generator=g)
    k = torch.randn(1, 2, N, D, generator=g) * 0.3
    k[:, :, 0] = 16 * u
    v = torch.randn(1, 2, N, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
def test_sinks_find_planted_heavy_first_key_the_hash_misses(causal):
    q, k, v = _heavy_first_key()
    scale = q.shape[-1] ** -0.5
    ref, _ = get_method("exact")(q, k, v, causal=causal, scale=scale)
    errs = {}
    for sinks in (0, 1):
        out, _ = get_method("hyper", block_size=128, sample_size=0, min_seq_len=256, num_sink_tokens=sinks)(
            q, k, v, causal=causal, scale=scale)
        errs[sinks] = ((out - ref).norm(dim=-1) / ref.norm(dim=-1) > 0.3).float().mean().item()
    # measured: 95% (non-causal) / 44% (causal) of the rows off by > 30% without sinks, 21% / 12% with one sink
    # (the rest is the block error over the small keys, no sample residual here)
    assert errs[0] > 0.4 and errs[1] < errs[0] / 3, errs


@pytest.mark.parametrize("mode", ["recursive", "single_pass"])
@pytest.mark.parametrize("num_sinks", [0, 16])
def test_gradients_match_exact_through_recursion_and_sinks(num_sinks, mode):
    """Autograd through the lse merges (causal recursion with 3 halvings, the sink merge): with every quadrant
    covered by one block the gradients must equal exact attention's (the fused CPU op gives no gradient through
    its lse, and in-place merges break backward; both paths are avoided when a gradient is needed)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(1, 2, 600, 16, generator=g, requires_grad=True) for _ in range(3)]
    ref, _ = get_method("exact")(q, k, v, causal=True, scale=SCALE)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), (q, k, v))
    # single pass: window 64, one bucket (block 1024 >= n), so the block holds every key before the window
    out, _ = get_method("hyper", block_size=1024, sample_size=0, min_seq_len=100, num_sink_tokens=num_sinks,
                        causal_mode=mode, window=64)(q, k, v, causal=True, scale=SCALE)
    grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("method", ["hyper", "sparse_hyper"])
@pytest.mark.parametrize("causal", [False, True])
def test_sinks_of_a_left_padded_row_are_its_first_real_tokens(method, causal):
    """Left padding (batched generation) puts padding at positions 0..P-1. The sinks must be the row's first real
    tokens: the planted heavy key sits at the first real position P > num_sink_tokens, so sinks taken by position
    would be padding and miss it (before the fix: the row's error was that of no sinks at all). A left-padded row
    is computed as its right-padded copy, and its padding queries (causal) attend nothing: out 0, lse -inf."""
    N, P = 2048, 100
    q, k, v = _heavy_first_key(N=N)
    scale = q.shape[-1] ** -0.5
    g = torch.Generator().manual_seed(9)
    pad = [torch.randn(1, 2, P, q.shape[-1], generator=g) * 20 for _ in range(3)]  # poison: never attended
    left = [torch.cat([p, x[:, :, : N - P]], dim=2) for p, x in zip(pad, (q, k, v))]
    right = [torch.cat([x[:, :, : N - P], p], dim=2) for p, x in zip(pad, (q, k, v))]
    left_mask = torch.arange(N)[None] >= P
    right_mask = torch.arange(N)[None] < N - P
    params = dict(block_size=128, min_seq_len=256, num_sink_tokens=1)
    if method == "hyper":
        params["sample_size"] = 0
    f = get_method(method, **params)
    out_l, lse_l = f(*left, causal=causal, scale=scale, key_padding_mask=left_mask)
    out_r, lse_r = f(*right, causal=causal, scale=scale, key_padding_mask=right_mask)
    torch.testing.assert_close(out_l[:, :, P:], out_r[:, :, : N - P], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_l[:, :, P:], lse_r[:, :, : N - P], atol=1e-5, rtol=1e-5)
    if causal:
        assert torch.all(out_l[:, :, :P] == 0) and torch.all(lse_l[:, :, :P] == float("-inf"))
    ref, _ = get_method("exact")(*left, causal=causal, scale=scale, key_padding_mask=left_mask)
    rows = slice(P, N)
    no_sinks, _ = get_method(method, **{**params, "num_sink_tokens": 0})(*left, causal=causal, scale=scale,
                                                                          key_padding_mask=left_mask)

    def off(out):  # share of the real rows off by more than 30%
        return ((out - ref)[:, :, rows].norm(dim=-1) / ref[:, :, rows].norm(dim=-1) > 0.3).float().mean().item()

    assert off(no_sinks) > 0.4 and off(out_l) < off(no_sinks) / 3, (off(no_sinks), off(out_l))


# ---------------------------------------------------------------------------------------------------------------
# causal_mode="single_pass": sinks + exact window + causal LSH block (+ sampled residual), one pass.
# ---------------------------------------------------------------------------------------------------------------

def single_pass_reference(q, k, v, *, scale, window, block_size, num_sink_tokens, lsh_num_projs=7, seed=0,
                          key_padding_mask=None, chunk=None):
    """Dense brute force of the single pass's exact key sets (no samples): for query i (chunk start c0),
    sinks {j < S, j <= i} + window {max(S, c0 - window) <= j <= i} + block {the block_size most recent keys j of
    i's bucket with S <= j < c0 - window}, all valid keys, as one [N, N] mask and one softmax (a key counted twice
    would need two softmax entries: the reference cannot double count). q, k, v [B, H, N, D]."""
    from hf_sparse_attn.methods.lsh import lsh_ranks, make_generator, random_hyperplanes
    from hf_sparse_attn.methods.single_pass import single_pass_bucket_bits
    from hf_sparse_attn.methods.window import WINDOW_CHUNK

    B, H, N, D = q.shape
    C = min(chunk or WINDOW_CHUNK, N)
    S = num_sink_tokens
    valid = torch.ones(B, N, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
    planes = random_hyperplanes(H, D, lsh_num_projs, make_generator(None, seed), "cpu")
    shift = lsh_num_projs - single_pass_bucket_bits(N, block_size, lsh_num_projs)
    rq, rk = lsh_ranks(q, planes) >> shift, lsh_ranks(k, planes) >> shift  # [B, H, N]
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    c0 = (i // C) * C
    sinks = (j < S) & (j <= i)
    window_keys = (j >= S) & (j >= c0 - window) & (j <= i)
    before = ((j >= S) & (j < c0 - window))[None, None] & (rq[..., :, None] == rk[..., None, :]) & valid[:, None, None, :]
    from_end = before.flip(-1).int().cumsum(-1).flip(-1)  # allowed keys at or after j in row i
    block = before & (from_end <= block_size)
    allowed = (sinks | window_keys)[None, None] | block
    allowed &= valid[:, None, None, :]
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.nan_to_num(torch.softmax(scores, -1)) @ v.float()
    return out, lse, block


def _assert_matches(out, lse, ref, ref_lse):
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("num_sinks", [0, 16])
def test_single_pass_exact_when_window_covers_with_padding(num_sinks):
    """A window covering the sequence makes the single pass exact, also with left and right padding; rows with no
    key (left padding, causal) give 0 and -inf, never NaN."""
    q, k, v = _qkv(N=300)
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1, :40] = False  # left padding
    mask[0, 250:] = False  # right padding
    for m in (None, mask):
        ref, ref_lse = get_method("exact")(q, k, v, causal=True, scale=SCALE, key_padding_mask=m)
        out, lse = get_method("hyper", causal_mode="single_pass", window=300, block_size=32, sample_size=64,
                              num_sink_tokens=num_sinks)(q, k, v, causal=True, scale=SCALE, key_padding_mask=m)
        _assert_matches(out, lse, ref, ref_lse)
        assert not torch.isnan(out).any()
    assert torch.all(out[1, :, :40] == 0) and torch.all(lse[1, :, :40] == float("-inf"))


@pytest.mark.parametrize("window", [0, 64, 200])
def test_single_pass_exact_when_block_covers_no_double_counting(window):
    """block_size >= N (one bucket): the block holds every key before the window, so sinks + window + block are all
    keys and the result must be exact. A key counted both in the window and the block (or a sink in either)
    would get twice its weight and break the equality."""
    q, k, v = _qkv(N=500)
    ref, ref_lse = get_method("exact")(q, k, v, causal=True, scale=SCALE)
    out, lse = get_method("hyper", causal_mode="single_pass", window=window, block_size=512, sample_size=0,
                          num_sink_tokens=16)(q, k, v, causal=True, scale=SCALE)
    _assert_matches(out, lse, ref, ref_lse)


@pytest.mark.parametrize("window,block_size,num_sinks,projs", [(100, 64, 0, 7), (64, 32, 16, 3), (0, 16, 5, 4)])
def test_single_pass_equals_brute_force_of_its_key_sets(window, block_size, num_sinks, projs):
    """Blocks that do not cover: the result equals dense attention over exactly the promised key sets (reference
    above), with holes in the padding mask; the block really holds keys (so the test is not the window alone)."""
    q, k, v = _qkv(N=700)
    mask = torch.ones(2, 700, dtype=torch.bool)
    mask[0, 300:340] = False
    mask[1, 650:] = False
    ref, ref_lse, block = single_pass_reference(q, k, v, scale=SCALE, window=window, block_size=block_size,
                                                num_sink_tokens=num_sinks, lsh_num_projs=projs, key_padding_mask=mask)
    assert block.sum(-1).float().mean() > 0.5 * block_size
    out, lse = get_method("hyper", causal_mode="single_pass", window=window, block_size=block_size, sample_size=0,
                          num_sink_tokens=num_sinks, lsh_num_projs=projs)(q, k, v, causal=True, scale=SCALE,
                                                                          key_padding_mask=mask)
    _assert_matches(out, lse, ref, ref_lse)


def test_single_pass_sampled_residual_is_unbiased():
    """E[exp(lse)] over the samples is the exact row mass: sinks, window and block are exact, and the residual
    (keys before the window outside the block) is estimated by s samples weighted n_c / s with the samples inside the
    query's block masked out. The mean over 400 seeds of exp(lse - exact lse) converges to 1 (measured 1.0002, standard
    error 0.0019). A sample counted although its key is in the block adds that key's mass twice: planted heavy keys in
    the blocks make that a large bias (measured with the in-block mask removed: 1.157)."""
    g = torch.Generator().manual_seed(5)
    N, D = 512, 16
    q = torch.randn(1, 2, N, D, generator=g)
    k = torch.randn(1, 2, N, D, generator=g)
    v = torch.randn(1, 2, N, D, generator=g)
    k[:, :, 64:300] += 0.8 * q[:, :, 64:300].mean(2, keepdim=True)  # heavy keys, found by the blocks
    ref, ref_lse = get_method("exact")(q, k, v, causal=True, scale=0.5)
    f = get_method("hyper", causal_mode="single_pass", window=64, block_size=32, sample_size=16, num_sink_tokens=4)
    ratios = torch.stack([torch.exp(f(q, k, v, causal=True, scale=0.5, generator=torch.Generator().manual_seed(s))[1]
                          - ref_lse) for s in range(400)])  # [seeds, B, H, N]
    rows = ratios[:, :, :, 192:]  # rows with a residual (n_c > 0) and a block
    assert rows.std(0).mean() > 0.3  # the samples do vary: the residual is estimated, not computed
    per_seed = rows.mean((1, 2, 3))
    stderr = per_seed.std().item() / 400 ** 0.5
    assert stderr < 0.005 and abs(per_seed.mean().item() - 1) < 4 * stderr, (per_seed.mean(), stderr)


def test_single_pass_deterministic_under_seed_and_generator():
    q, k, v = _qkv(N=700)
    f = get_method("hyper", causal_mode="single_pass", window=64, block_size=32, sample_size=16)
    a, _ = f(q, k, v, causal=True, scale=SCALE)
    b, _ = f(q, k, v, causal=True, scale=SCALE)
    c, _ = get_method("hyper", causal_mode="single_pass", window=64, block_size=32, sample_size=16, seed=1)(
        q, k, v, causal=True, scale=SCALE)
    assert torch.equal(a, b) and not torch.equal(a, c)
    d, _ = f(q, k, v, causal=True, scale=SCALE, generator=torch.Generator().manual_seed(9))
    e, _ = f(q, k, v, causal=True, scale=SCALE, generator=torch.Generator().manual_seed(9))
    assert torch.equal(d, e)


def test_single_pass_padded_keys_never_attended_and_causal_with_padding():
    q, k, v = _qkv(B=2, N=1024)
    mask = torch.ones(2, 1024, dtype=torch.bool)
    mask[0, 600:] = False
    mask[1, :50] = False
    v_poison, k_poison = v.clone(), k.clone()
    v_poison[0, :, 600:] = 1e6
    k_poison[0, :, 600:] = q[0, :, :424] * 5
    v_poison[1, :, :50] = 1e6
    k_poison[1, :, :50] = q[1, :, 50:100] * 5
    f = get_method("hyper", causal_mode="single_pass", window=64, block_size=64, sample_size=64, num_sink_tokens=8)
    out, lse = f(q, k_poison, v_poison, causal=True, scale=SCALE, key_padding_mask=mask)
    assert out.abs().max().item() < 100 and not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.all(out[1, :, :50] == 0) and torch.all(lse[1, :, :50] == float("-inf"))
    q2, k2, v2 = q.clone(), k_poison.clone(), v_poison.clone()
    k2[:, :, 500:] += 1.0
    v2[:, :, 500:] -= 3.0
    out2, lse2 = f(q2, k2, v2, causal=True, scale=SCALE, key_padding_mask=mask)
    assert torch.equal(out[:, :, :500], out2[:, :, :500]) and torch.equal(lse[:, :, :500], lse2[:, :, :500])


def test_single_pass_gqa_through_a_model(tiny_model):
    """Through patch_model on a GQA Llama (4 query heads, 2 KV heads): a window covering the sequence gives the
    unpatched model's logits (every layer served), a small window really approximates."""
    from hf_sparse_attn import patch_model, unpatch_model

    model = tiny_model("llama")
    ids = torch.randint(0, 100, (2, 160), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        for window, close in ((160, True), (16, False)):
            plan = patch_model(model, method="hyper", layers="all", min_seq_len=64, block_size=16, sample_size=8,
                               num_sink_tokens=4, causal_mode="single_pass", window=window)
            out = model(ids).logits
            assert sum(layer.served for layer in plan.layers) == 3 and plan.fallback_counts() == {}
            assert torch.allclose(out, ref, atol=1e-4) == close
            unpatch_model(model)


def test_single_pass_grad_path_uses_no_workspace_and_matches_no_grad_path():
    from hf_sparse_attn.kernels.workspace import clear_workspace, workspace_bytes

    q, k, v = _qkv(B=1, N=400)
    mask = torch.ones(1, 400, dtype=torch.bool)
    mask[0, 390:] = False
    f = get_method("hyper", causal_mode="single_pass", window=64, block_size=32, sample_size=16, num_sink_tokens=8)
    want, want_lse = f(q, k, v, causal=True, scale=SCALE, key_padding_mask=mask)
    clear_workspace()
    qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
    got, got_lse = f(qg, kg, vg, causal=True, scale=SCALE, key_padding_mask=mask)
    assert workspace_bytes() == 0
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(got_lse, want_lse, atol=2e-6, rtol=1e-5)
    got.pow(2).sum().backward()
    assert all(torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in (qg, kg, vg))
