"""patch_model on small random configs of every family: exactness with `exact`, masks, decode, caches,
output_attentions, training, checkpointing, accelerate hooks, save_pretrained, replace-not-stack, atomic failure."""

from __future__ import annotations

import pytest
import torch

from conftest import DECODERS, ENCODERS, VOCAB
from hf_sparse_attn import current_plan, patch_model, patched, unpatch_model
from hf_sparse_attn.patches.attention_interface import RUNTIME_ATTR


def _inputs(batch=2, n=12, pad_left=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, n), generator=g)
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[1, :pad_left] = 0
    return ids, mask


def _first_output(model, ids, mask, **kw):
    out = model(input_ids=ids, attention_mask=mask, **kw)
    return out[0]


@pytest.mark.parametrize("family", DECODERS + ENCODERS)
def test_exact_patch_matches_and_unpatch_is_bit_identical(tiny_model, family):
    model = tiny_model(family)
    ids, mask = _inputs()
    if family in ENCODERS:
        mask = mask.flip(-1)  # right padding for encoders
    with torch.no_grad():
        reference = _first_output(model, ids, mask)
        plan = patch_model(model, method="exact", layers="all")
        assert model.config._attn_implementation == "hf_sparse_attn"
        out = _first_output(model, ids, mask)
        valid = mask.bool()
        assert (out - reference)[valid].abs().max().item() < 1e-5
        assert all(layer.served == 1 for layer in plan.layers), plan  # the method ran; no silent fallback
        assert plan.fallback_counts() == {}
        unpatch_model(model)
        assert model.config._attn_implementation == "sdpa"
        assert torch.equal(_first_output(model, ids, mask), reference)
    assert not any(hasattr(m, RUNTIME_ATTR) for m in model.modules())


def test_padding_mask_reaches_the_method(tiny_model):
    """Without the registered mask function masks arrive as None; check the padded keys really are excluded."""
    model = tiny_model("bert")
    ids, mask = _inputs(pad_left=0)
    mask[1, -4:] = 0
    ids_other_pad = ids.clone()
    ids_other_pad[1, -4:] = 7  # change only padded tokens
    with torch.no_grad(), patched(model, method="exact", layers="all"):
        a = model(input_ids=ids, attention_mask=mask).last_hidden_state
        b = model(input_ids=ids_other_pad, attention_mask=mask).last_hidden_state
    assert torch.allclose(a[1, :-4], b[1, :-4], atol=1e-6)


def test_unchosen_layers_run_what_they_ran_before(tiny_model):
    model = tiny_model("llama")
    ids, mask = _inputs()
    plan = patch_model(model, method="exact", layers=[1])
    assert plan.patched_layers == [1]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert [layer.served for layer in plan.layers] == [0, 1, 0]


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_generate_same_tokens_and_decode_steps_served_by_exact_decode(tiny_model, family):
    model = tiny_model(family)
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    reference = model.generate(ids, **kwargs)
    plan = patch_model(model, method="exact", layers="all")
    out = model.generate(ids, **kwargs)
    assert torch.equal(out, reference)
    assert plan.fallback_counts() == {}
    assert all(layer.decode_served == 5 for layer in plan.layers)  # 5 decode steps: patch_model's exact decode
    assert all(layer.served == 1 for layer in plan.layers)  # the prefill
    unpatch_model(model)
    plan = patch_model(model, method="exact", layers="all", decode_method=None)  # the model's own attention
    assert torch.equal(model.generate(ids, **kwargs), reference)
    assert plan.fallback_counts() == {"q_len != kv_len (decode step, cache or cross-attention)": 5 * 3}


def test_static_cache_generate(tiny_model):
    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    reference = model.generate(ids, **kwargs)
    with patched(model, method="exact", layers="all") as plan:
        assert torch.equal(model.generate(ids, **kwargs), reference)
    # no mask for the prefill into the preallocated cache (sdpa's top-left causal): served over the valid positions
    assert all(layer.served == 1 and layer.decode_served == 3 for layer in plan.layers)
    assert plan.fallback_counts() == {}


def test_output_attentions_returns_weights_through_exact_path(tiny_model):
    model = tiny_model("llama")
    ids, mask = _inputs()
    with torch.no_grad(), patched(model, method="exact", layers="all") as plan:
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == 3 and out.attentions[0].shape == (2, 4, 12, 12)
    assert torch.allclose(out.attentions[0].sum(-1)[0], torch.ones(4, 12), atol=1e-5)
    assert plan.fallback_counts() == {"output_attentions=True": 3}


def test_training_mode_gradients_and_checkpointing(tiny_model):
    model = tiny_model("llama")
    model.train()
    ids, mask = _inputs()

    def grads():
        model.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        return loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    ref_loss, ref_grad = grads()
    if hasattr(model, "activation_checkpointing_enable"):  # gradient_checkpointing_enable is deprecated from 5.24
        model.activation_checkpointing_enable()
        assert model.is_activation_checkpointing
    else:  # transformers before 5.24 (the oldest CI environment)
        model.gradient_checkpointing_enable()
        assert model.is_gradient_checkpointing
    with patched(model, method="exact", layers="all") as plan:
        loss, grad = grads()
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    assert torch.allclose(grad, ref_grad, atol=1e-5)
    assert sum(layer.served for layer in plan.layers) >= 3


def test_accelerate_hooks_are_kept(tiny_model):
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Counter(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counter.calls += 1
            return args, kwargs

    model = tiny_model("llama")
    for layer in model.model.layers:
        add_hook_to_module(layer.self_attn, Counter())
    ids, mask = _inputs()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        with patched(model, method="exact", layers="all"):
            before = Counter.calls
            out = model(input_ids=ids, attention_mask=mask).logits
            assert Counter.calls - before == 3
    assert torch.allclose(out, reference, atol=1e-5)


def test_save_pretrained_of_patched_model(tiny_model, tmp_path):
    model = tiny_model("llama")
    keys_before = {k: v.clone() for k, v in model.state_dict().items()}
    patch_model(model, method="exact", layers="all")
    assert set(model.state_dict()) == set(keys_before)
    model.save_pretrained(tmp_path)
    from transformers import LlamaForCausalLM

    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation in ("sdpa", "eager")  # the patch is not saved into the config
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, keys_before[key]), key


def test_patching_twice_replaces_never_stacks(tiny_model):
    model = tiny_model("llama")
    first = patch_model(model, method="exact", layers=[0])
    second = patch_model(model, method="exact", layers=[2])
    assert current_plan(model) is second and first is not second
    ids, mask = _inputs()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert [layer.served for layer in second.layers] == [0, 0, 1]
    assert [layer.served for layer in first.layers] == [0, 0, 0]
    unpatch_model(model)
    assert model.config._attn_implementation == "sdpa"
    assert unpatch_model(model) is None


def test_failed_patch_leaves_model_untouched(tiny_model, monkeypatch):
    model = tiny_model("llama")
    ids, mask = _inputs()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
    earlier = patch_model(model, method="exact", layers=[0])
    with pytest.raises(ValueError, match="unknown method"):
        patch_model(model, method="no_such_method")
    with pytest.raises(ValueError, match="has no parameter"):
        patch_model(model, method="exact", block_size=64)
    assert current_plan(model) is earlier

    refused = []

    def refuse(name, *args, **kwargs):
        if name == "hf_sparse_attn" and not refused:  # fail once; the rollback may route again
            refused.append(name)
            raise RuntimeError("simulated failure half-way: runtimes set, routing refused")
        return type(model).set_attn_implementation(model, name, *args, **kwargs)

    monkeypatch.setattr(model, "set_attn_implementation", refuse)
    with pytest.raises(RuntimeError, match="simulated"):
        patch_model(model, method="exact", layers="all")
    monkeypatch.undo()
    # the earlier plan is still in force, on layer 0 only
    assert current_plan(model).patched_layers == [0]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(out, reference, atol=1e-5)
    assert current_plan(model).layers[0].served == 1


def test_unknown_architecture_error_lists_families_and_how_to_add():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError) as err:
        patch_model(model)
    text = str(err.value)
    assert "Llama" in text and "GPT-2" in text and "ChatGLM" in text and "register_adapter" in text


def test_eager_previous_implementation(tiny_model):
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    ids, mask = _inputs()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        with patched(model, method="exact", layers=[0]):
            out = model(input_ids=ids, attention_mask=mask).logits
        assert model.config._attn_implementation == "eager"
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, reference)
    assert (out - reference)[mask.bool()].abs().max() < 1e-5


def test_plan_json_round_trip_and_reapply(tiny_model, tmp_path):
    model = tiny_model("gpt2")
    plan = patch_model(model, method="exact", layers=2, select="weight_norm", seed=5)
    path = tmp_path / "plan.json"
    plan.save(path)
    unpatch_model(model)
    again = patch_model(model, plan=str(path))
    assert again.patched_layers == plan.patched_layers and again.seed == 5
    assert [l.weight_norm for l in again.layers] == [l.weight_norm for l in plan.layers]
    other = tiny_model("llama")
    with pytest.raises(ValueError, match="another model|fingerprint"):
        patch_model(other, plan=str(path))
    text = str(plan)
    assert "layer" in text and "R" in text and "exact" in text
