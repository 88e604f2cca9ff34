"""capture_attention records what the model attends with (after RoPE), on patched and unpatched models."""

from __future__ import annotations

import torch

from hf_sparse_attn import capture_attention, get_method, patch_model, unpatch_model
from hf_sparse_attn.methods.common import expand_kv_heads


def test_captured_inputs_reproduce_the_layer_output(tiny_model):
    model = tiny_model("llama")
    ids = torch.randint(3, 101, (1, 10), generator=torch.Generator().manual_seed(0))
    attn_out = {}
    layer = model.model.layers[1].self_attn
    handle = layer.o_proj.register_forward_pre_hook(lambda mod, args: attn_out.setdefault("x", args[0].detach()))
    with torch.no_grad(), capture_attention(model) as captured:
        ref = model(ids).logits
    handle.remove()
    assert model.config._attn_implementation == "sdpa"  # the temporary routing is gone
    call = captured[1][0]
    assert call.causal and call.key_padding_mask is None and call.key.shape[1] == 2  # KV heads not expanded
    k, v = expand_kv_heads(call.key, 2), expand_kv_heads(call.value, 2)
    out, _ = get_method("exact")(call.query, k, v, causal=True, scale=call.scale)
    assert torch.allclose(out.transpose(1, 2).reshape(1, 10, -1), attn_out["x"], atol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_capture_on_patched_model_keeps_the_patch(tiny_model):
    model = tiny_model("bert")
    plan = patch_model(model, method="exact", layers=[0])
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 6:] = 0
    with torch.no_grad(), capture_attention(model, layers=[0, 2]) as captured:
        model(input_ids=torch.randint(3, 101, (2, 8)), attention_mask=mask)
    assert set(captured) == {0, 2}
    assert torch.equal(captured[0][0].key_padding_mask, mask.bool())
    assert not captured[2][0].causal
    assert plan.layers[0].served == 1
    unpatch_model(model)
