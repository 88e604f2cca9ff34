"""block_select: sinks + exact window + selected key blocks (docs/methods/block_select.md)."""

import pytest
import torch

from hf_sparse_attn.methods import get_method, get_spec
from hf_sparse_attn.methods.block_select import probe_rows, vertical_blocks

from conftest import random_qkv as _qkv
from conftest import rel_error

SCALE = 16 ** -0.5
SELECTIONS = ["vertical", "moba"]
SMALL = dict(window=16, num_sink_tokens=4, block_size=8, probe_queries=16, query_block=32)


def _exact(q, k, v, mask=None, causal=True):
    return get_method("exact")(q, k, v, causal=causal, scale=q.shape[-1] ** -0.5, key_padding_mask=mask)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_exact_when_window_or_budget_covers(selection):
    q, k, v = _qkv(N=300)
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[0, 260:] = False  # right padding
    mask[1, :37] = False  # left padding
    mask[1, 100:104] = False  # a hole
    ref_out, ref_lse = _exact(q, k, v, mask)
    for params in (dict(SMALL, window=300, num_selected=0), dict(SMALL, num_selected=512), dict(SMALL, block_size=1,
                                                                                                 num_selected=300)):
        out, lse = get_method("block_select", selection=selection, **params)(q, k, v, causal=True, scale=SCALE,
                                                                             key_padding_mask=mask)
        # a rare failure of this test in full CI runs (batch row 1) was never reproduced alone: say where and under
        # which global settings it happens, should it happen again
        worst = [int(i) for i in torch.unravel_index((out - ref_out).abs().argmax(), out.shape)[:3]]
        context = (f"params {params}; largest error at [b, h, row] {worst}; threads {torch.get_num_threads()}; "
                   f"matmul precision {torch.get_float32_matmul_precision()}; mkldnn {torch.backends.mkldnn.enabled}")
        torch.testing.assert_close(out, ref_out, atol=2e-6, rtol=1e-5, msg=lambda m: f"{m}\n{context}")
        valid = torch.isfinite(ref_lse)
        assert torch.equal(valid, torch.isfinite(lse))
        torch.testing.assert_close(lse[valid], ref_lse[valid], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_no_row_attends_a_future_key(selection):
    """Changing the values of keys after position t leaves rows <= t bit for bit (values do not enter the selection;
    the selection itself looks at the prompt's last queries, as MInference's does: see the docs)."""
    q, k, v = _qkv(B=1, N=400)
    f = get_method("block_select", selection=selection, num_selected=32, **SMALL)
    out, _ = f(q, k, v, causal=True, scale=SCALE)
    for t in (50, 200, 330):
        v2 = v.clone()
        v2[:, :, t + 1:] = torch.randn_like(v2[:, :, t + 1:]) * 10
        out2, _ = f(q, k, v2, causal=True, scale=SCALE)
        assert torch.equal(out2[:, :, :t + 1], out[:, :, :t + 1])
        assert not torch.equal(out2[:, :, t + 1:], out[:, :, t + 1:])


def _needle(N=2048, D=32, H=2, needle=300, seed=0):
    """Diffuse random attention plus one planted key at ``needle`` that the last rows and rows 1000.. attend strongly
    (its value stands out); the window (128) never reaches it from those rows."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = [torch.randn(1, H, N, D, generator=g) * 0.3 for _ in range(3)]
    u = torch.zeros(D)
    u[0] = 1.0
    k[:, :, needle] = 8 * u
    v[:, :, needle] = 5.0
    q[:, :, 1000:] += 8 * u
    return q, k, v


@pytest.mark.parametrize("block_size", [64, 1])
def test_planted_needle_is_selected_and_served_far_outside_the_window(block_size):
    q, k, v = _needle()
    scale = q.shape[-1] ** -0.5
    params = dict(window=128, num_sink_tokens=16, block_size=block_size, num_selected=256, probe_queries=64)
    ref, _ = _exact(q, k, v)
    mine, _ = get_method("block_select", **params)(q, k, v, causal=True, scale=scale)
    local, _ = get_method("local", window=128, num_sink_tokens=16)(q, k, v, causal=True, scale=scale)
    rows = slice(1000, 1900)  # middle rows, far past the needle's window
    err_mine = rel_error(mine[:, :, rows], ref[:, :, rows])
    err_local = rel_error(local[:, :, rows], ref[:, :, rows])
    assert err_local > 0.3 and err_mine < 0.2 * err_local, (err_mine, err_local)
    # the selected set holds the needle (its block of 64, or its own column) in every head
    probe = probe_rows(q, k, v, scale=scale, key_valid=None, num_probes=64, want_mass=True)
    pos, ok = vertical_blocks(probe[4], queries=q, key_valid=None, num_sinks=16, window=128, block_size=block_size,
                              num_blocks=256 // block_size)
    assert pos.shape == (1, 2, 1, 256)
    assert all(bool(((pos[0, h, 0] == 300) & ok[0, h, 0]).any()) for h in range(2))
    # the last probe rows are computed exactly
    torch.testing.assert_close(mine[:, :, -64:], ref[:, :, -64:], atol=1e-5, rtol=1e-5)


def test_left_padded_row_equals_its_unpadded_copy():
    q, k, v = _qkv(B=2, N=300)
    mask = torch.ones(2, 300, dtype=torch.bool)
    mask[1, :37] = False
    f = get_method("block_select", num_selected=32, **SMALL)
    out, lse = f(q, k, v, causal=True, scale=SCALE, key_padding_mask=mask)
    alone, alone_lse = f(q[1:, :, 37:], k[1:, :, 37:], v[1:, :, 37:], causal=True, scale=SCALE)
    torch.testing.assert_close(out[1:, :, 37:], alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[1:, :, 37:], alone_lse, atol=1e-5, rtol=1e-5)
    assert torch.all(out[1, :, :37] == 0) and torch.all(lse[1, :, :37] == float("-inf"))


@pytest.mark.parametrize("selection", SELECTIONS)
def test_fully_masked_rows_are_zero_not_nan(selection):
    q, k, v = _qkv(B=2, N=200)
    mask = torch.ones(2, 200, dtype=torch.bool)
    mask[0] = False  # a batch row with no key at all
    mask[1, :20] = False
    out, lse = get_method("block_select", selection=selection, num_selected=32, **SMALL)(
        q, k, v, causal=True, scale=SCALE, key_padding_mask=mask)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    assert torch.all(out[1, :, :20] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    q, k, v = _qkv(N=256)
    f = get_method("block_select", num_selected=32, **SMALL)
    ref, _ = f(q, k, v, causal=True, scale=SCALE)
    out, lse = f(q.to(dtype), k.to(dtype), v.to(dtype), causal=True, scale=SCALE)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert rel_error(out, ref) < 2e-2


def test_grouped_heads_as_expanded_views():
    from hf_sparse_attn.methods.common import expand_kv_heads

    q, _, _ = _qkv(H=4, N=256)
    _, k, v = _qkv(H=2, N=256, seed=1)
    ke, ve = expand_kv_heads(k, 2), expand_kv_heads(v, 2)
    f = get_method("block_select", num_selected=32, **SMALL)
    out, _ = f(q, ke, ve, causal=True, scale=SCALE)
    ref, _ = f(q, ke.contiguous(), ve.contiguous(), causal=True, scale=SCALE)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_gradients_match_exact_when_the_budget_covers(selection):
    g = torch.Generator().manual_seed(0)
    q, k, v = [torch.randn(1, 2, 160, 16, generator=g, requires_grad=True) for _ in range(3)]
    mask = torch.ones(1, 160, dtype=torch.bool)
    mask[0, 150:] = False
    ref, _ = _exact(q, k, v, mask)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), (q, k, v))
    out, _ = get_method("block_select", selection=selection, num_selected=256, **SMALL)(
        q, k, v, causal=True, scale=SCALE, key_padding_mask=mask)
    torch.testing.assert_close(out, ref.detach(), atol=2e-6, rtol=1e-5)
    grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    # and a sparse budget still gives finite gradients
    out, _ = get_method("block_select", selection=selection, num_selected=16, **SMALL)(q, k, v, causal=True, scale=SCALE)
    assert all(torch.isfinite(gr).all() for gr in torch.autograd.grad(out.sum(), (q, k, v)))


def test_params_checks_and_bidirectional_precondition():
    spec = get_spec("block_select")
    assert set(spec.params) == {"window", "num_sink_tokens", "selection", "num_selected", "block_size", "probe_queries",
                                "query_block", "min_seq_len"}
    for bad in ({"window": -1}, {"num_selected": -2}, {"block_size": 0}, {"selection": "lsh"}, {"min_seq_len": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            get_method("block_select", **bad)
    q, k, v = _qkv(N=64)
    params = spec.resolve_params({})
    assert spec.check(q[:, :, :1], k, True, None, params) is not None  # decode step -> exact in the adapter
    assert "bidirectional" in spec.check(q, k, False, None, params)  # encoders -> exact in the adapter
    assert spec.check(q, k, True, None, params) is None
    out, _ = get_method("block_select")(q, k, v, causal=False, scale=SCALE)  # a direct call computes exact
    torch.testing.assert_close(out, _exact(q, k, v, causal=False)[0])


def test_deterministic_and_thread_safe():
    import concurrent.futures

    q, k, v = _qkv(N=300)
    f = get_method("block_select", num_selected=32, **SMALL)
    ref, _ = f(q, k, v, causal=True, scale=SCALE)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: f(q, k, v, causal=True, scale=SCALE)[0], range(4)))
    assert all(torch.equal(o, ref) for o in outs)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_patched_tiny_llama_end_to_end(selection):
    from hf_sparse_attn import patch_model, unpatch_model
    from tiny_checkpoint import tiny_llama

    model = tiny_llama(101, num_layers=2)
    ids = torch.randint(4, 100, (2, 192), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :9] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=attention_mask).logits
        plan = patch_model(model, method="block_select", layers="all", min_seq_len=64, selection=selection, **SMALL,
                           num_selected=16)
        out = model(ids, attention_mask=attention_mask).logits
        assert sum(layer.served for layer in plan.layers) == 2 and plan.fallback_counts() == {}, str(plan)
        assert torch.isfinite(out).all() and not torch.allclose(out, ref, atol=1e-4)
        unpatch_model(model)
        plan = patch_model(model, method="block_select", layers="all", min_seq_len=64, selection=selection,
                           **dict(SMALL, window=192))
        torch.testing.assert_close(model(ids, attention_mask=attention_mask).logits[attention_mask.bool()],
                                   ref[attention_mask.bool()], atol=1e-4, rtol=1e-4)
        unpatch_model(model)


def test_compiled_patched_model_matches_eager():
    import torch._dynamo as dynamo

    from hf_sparse_attn import patch_model
    from tiny_checkpoint import tiny_llama

    model = tiny_llama(101, num_layers=1)
    plan = patch_model(model, method="block_select", layers="all", min_seq_len=32, num_selected=16, **SMALL)
    ids = torch.randint(4, 100, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(ids).logits
        dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")(ids).logits
    dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert plan.layer(0).served == 2 and not plan.layer(0).fallbacks, str(plan)


@pytest.mark.parametrize("selection,block_size", [("vertical", 1), ("vertical", 8), ("moba", 8)])
@pytest.mark.parametrize("tiling", ["default", "small_tiles_split_prefix"])
def test_equals_dense_masked_reference_of_its_key_sets(selection, block_size, tiling, monkeypatch):
    """A sparse budget: every row's output equals exact attention over sinks + window + its selected keys behind the
    window (a dense [N, N] mask built here from the selection), with right padding and holes (one among the sinks).
    ``small_tiles_split_prefix``: row tiles of 40 rows (several per sequence) whose shared key prefix always goes to a
    call of its own, merged with the masked staircase (the branch longer selections take)."""
    from hf_sparse_attn.methods import block_select as block_select_module
    from hf_sparse_attn.methods.block_select import moba_blocks

    if tiling == "small_tiles_split_prefix":
        monkeypatch.setattr(block_select_module, "SELECT_ROWS", 40)
        monkeypatch.setattr(block_select_module, "MASK_FREE_PREFIX", 1)
        monkeypatch.setattr(block_select_module, "SELECT_MASK_BUDGET", 2 * 2 * 32 * 50)

    N, S, W = 320, 4, 16
    q, k, v = _qkv(B=2, H=2, N=N)
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[0, 290:] = False
    mask[1, 150:155] = False
    mask[1, 2] = False
    params = dict(SMALL, block_size=block_size, num_selected=40)
    out, _ = get_method("block_select", selection=selection, **params)(q, k, v, causal=True, scale=SCALE,
                                                                       key_padding_mask=mask)
    if selection == "vertical":
        probe = probe_rows(q, k, v, scale=SCALE, key_valid=mask, num_probes=16, want_mass=True)
        pos, ok = vertical_blocks(probe[4], queries=q, key_valid=mask, num_sinks=S, window=W, block_size=block_size,
                                  num_blocks=-(-40 // block_size))
        rows_per_set = N
    else:
        pos, ok = moba_blocks(q, k, key_valid=mask, num_sinks=S, window=W, block_size=block_size,
                              num_blocks=-(-40 // block_size), query_block=32)
        rows_per_set = 32
        probe = probe_rows(q, k, v, scale=SCALE, key_valid=mask, num_probes=16, want_mass=False)
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    for b in range(2):
        for h in range(2):
            selected = torch.zeros(N, N, dtype=torch.bool)
            for t in range(pos.shape[2]):
                rows = slice(t * rows_per_set, (t + 1) * rows_per_set)
                keys = torch.zeros(N, dtype=torch.bool)
                keys[pos[b, h, t][ok[b, h, t]]] = True
                selected[rows] = keys[None, :]
            allowed = (((j < S) & (j <= i)) | ((j > i - W) & (j <= i) & (j >= S)) | (selected & (j <= i - W) & (j >= S)))
            allowed &= mask[b][None, :]
            scores = (q[b, h] @ k[b, h].T * SCALE).masked_fill(~allowed, float("-inf"))
            ref = torch.nan_to_num(torch.softmax(scores, -1)) @ v[b, h]
            rows = torch.ones(N, dtype=torch.bool)
            rows[probe[0][b][probe[1][b]]] = False  # the probe rows are exact instead
            torch.testing.assert_close(out[b, h, rows], ref[rows], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("padded", [False, True])
def test_no_probe_rows_is_local(padded):
    """``probe_queries=0`` selects nothing (the parameter table: "0: nothing selected, i.e. local"): the output is
    local's with the same window and sinks, bit for bit, left padding included (it raised before: the empty key set
    had no batch or head dimension)."""
    q, k, v = _qkv(B=2, H=2, N=200, D=16, seed=3)
    mask = torch.ones(2, 200, dtype=torch.bool)
    if padded:
        mask[1, :13] = False
    mask = mask if padded else None
    local, local_lse = get_method("local", window=16, num_sink_tokens=4)(q, k, v, causal=True, scale=SCALE,
                                                                        key_padding_mask=mask)
    for num_selected in (0, 40):
        out, lse = get_method("block_select", **dict(SMALL, probe_queries=0, num_selected=num_selected))(
            q, k, v, causal=True, scale=SCALE, key_padding_mask=mask)
        torch.testing.assert_close(out, local, rtol=0, atol=0)
        torch.testing.assert_close(lse, local_lse, rtol=0, atol=0)


def test_a_chunk_with_no_probe_rows_is_locals_chunk():
    from hf_sparse_attn.methods.block_select import block_select_chunk
    from hf_sparse_attn.methods.local import local_chunk

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 20, 16, generator=g)
    k, v = torch.randn(2, 1, 2, 200, 16, generator=g)
    mine, _ = block_select_chunk(q, k, v, scale=SCALE, kv_len=200, window=16, num_sink_tokens=4, probe_queries=0,
                                 num_selected=40)
    local, _ = local_chunk(q, k, v, scale=SCALE, kv_len=200, window=16, num_sink_tokens=4)
    torch.testing.assert_close(mine, local, rtol=0, atol=0)
