"""One decision per attention call (patches/base.py: LayerRuntime.decide) and patch_model's arguments resolved once
(validation.py: build_patch_request)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from hf_sparse_attn import patch_model
from hf_sparse_attn.methods import get_method
from hf_sparse_attn.methods.exact import exact_attention
from hf_sparse_attn.methods.registry import _REGISTRY, MethodSpec, Param, get_spec, register_method
from hf_sparse_attn.patches import attention_interface, reasons
from hf_sparse_attn.patches.base import (CHUNKED_PREFILL, CROSS_ATTENTION, DECODE, PREFILL, SERVE_EXACT, SERVE_METHOD,
                                         AttentionCall, LayerRuntime, describe_call, exact_reason)
from hf_sparse_attn.patches.chatglm import ChatGLMAdapter, _make_forward
from hf_sparse_attn.plan import LayerPlan, PatchPlan
from hf_sparse_attn.selection import check_layers, resolve_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def _call(**overrides) -> AttentionCall:
    """A plain causal self-attention call of 64 tokens, with ``overrides``."""
    fields = dict(batch=1, num_heads=4, num_kv_heads=2, q_len=64, kv_len=64, head_dim=8, scale=8 ** -0.5, causal=True)
    fields.update(overrides)
    return AttentionCall(**fields)


def _runtime(method: str, params: dict) -> LayerRuntime:
    return LayerRuntime(0, method, get_spec(method).resolve_params(params), seed=0,
                        layer_plan=LayerPlan(0, 0.0, 0, method, dict(params)))


# -- the kinds of call -------------------------------------------------------------------------------------------

def test_a_decode_step_is_told_apart_from_a_chunked_prefill_and_cross_attention():
    assert _call().kind == PREFILL
    assert _call(q_len=1, kv_len=4096).kind == DECODE
    assert _call(q_len=4, kv_len=4096).kind == DECODE  # a few drafted tokens (speculative decoding)
    assert _call(q_len=512, kv_len=4096).kind == CHUNKED_PREFILL
    assert _call(q_len=64, kv_len=128, cross_attention=True).kind == CROSS_ATTENTION
    assert _call(q_len=64, kv_len=64, cross_attention=True).kind == CROSS_ATTENTION
    for kind in (dict(q_len=1, kv_len=4096), dict(q_len=512, kv_len=4096), dict(cross_attention=True)):
        assert exact_reason(_call(**kind)) == reasons.DECODE_REASON


def test_describe_call_reads_shapes_and_whether_a_gradient_is_needed():
    q = torch.randn(2, 4, 10, 8)
    k = torch.randn(2, 2, 12, 8, requires_grad=True)
    call = describe_call(q, k, k, scale=0.5, causal=False)
    assert (call.batch, call.num_heads, call.num_kv_heads, call.q_len, call.kv_len, call.head_dim) == (2, 4, 2, 10, 12, 8)
    assert call.needs_grad and call.kind == DECODE
    with torch.no_grad():
        assert not describe_call(q, k, k, scale=0.5, causal=False).needs_grad


# -- the order of the rules --------------------------------------------------------------------------------------

OWN_REASON = "decision test: the method's own check"


def _decision_test_fn(q, k, v, *, causal, scale, key_padding_mask=None, generator=None, min_seq_len=32):
    return exact_attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)


@pytest.fixture
def opaque_method():
    """A method with a threshold, no backward and a check that always refuses."""
    spec = register_method("decision_test", _decision_test_fn, params={"min_seq_len": Param(default=32, kind=int, low=0)},
                           check=lambda q, k, causal, key_padding_mask, params: OWN_REASON, supports_grad=False,
                           overwrite=True)
    try:
        yield spec
    finally:
        _REGISTRY.pop("decision_test", None)


def test_the_rules_apply_in_one_fixed_order(opaque_method):
    """output_attentions, dropout, decode, mask, unsupported inputs, min_seq_len, gradient, the method's check:
    with every rule holding, the first one names the reason; lifting it, the next one does."""
    runtime = _runtime("decision_test", {})
    q = torch.randn(1, 4, 16, 8)
    k = torch.randn(1, 4, 16, 8)
    flags = dict(output_attentions=True, dropout_in_training=True, q_len=1, mask_recognized=False,
                 unsupported_inputs=("softcap",), kv_len=16, needs_grad=True)
    expected = [
        ("output_attentions", False, reasons.OUTPUT_ATTENTIONS_REASON),
        ("dropout_in_training", False, reasons.DROPOUT_REASON),
        ("q_len", 16, reasons.DECODE_REASON),
        ("mask_recognized", True, reasons.FULL_MASK_REASON),
        ("unsupported_inputs", (), reasons.UNSUPPORTED_INPUT_REASON),
        ("kv_len", 64, reasons.min_seq_len_reason(32)),
        ("needs_grad", False, reasons.NO_GRADIENT_REASON),
    ]
    seen = []
    for field, lifted, reason in expected:
        call = _call(**flags)
        assert exact_reason(call, min_seq_len=32, supports_grad=False) == reason
        decision = runtime.decide(call, q, k)
        assert (decision.path, decision.reason) == (SERVE_EXACT, reason)
        seen.append(decision.reason)
        flags[field] = lifted
        if field == "kv_len":
            flags["q_len"] = 64
    call = _call(**flags)
    assert exact_reason(call, min_seq_len=32, supports_grad=False) is None
    # the method's own check comes last, and only where the tensors it may read are given
    assert runtime.decide(call).path == SERVE_METHOD
    q, k = torch.randn(1, 4, 64, 8), torch.randn(1, 4, 64, 8)
    assert runtime.decide(call, q, k).reason == OWN_REASON
    assert len(set(seen)) == len(expected)


def test_a_layer_without_a_method_decides_exact_and_counts_nothing():
    runtime = LayerRuntime(0, None, {}, seed=0)
    decision = runtime.decide(_call(output_attentions=True))
    assert (decision.path, decision.reason) == (SERVE_EXACT, None)


def test_the_threshold_is_the_one_the_spec_declares(opaque_method):
    assert opaque_method.min_seq_len_param == "min_seq_len"
    assert opaque_method.min_seq_len({"min_seq_len": 7}) == 7
    assert opaque_method.min_seq_len({}) == 32  # a partial parameter dict: the declared default
    renamed = dataclasses.replace(opaque_method, min_seq_len_param=None)
    assert renamed.min_seq_len({"min_seq_len": 7}) == 0  # no declared threshold: none applies
    assert get_spec("exact").min_seq_len(get_spec("exact").resolve_params({})) == 0  # exact has no such parameter
    assert isinstance(opaque_method, MethodSpec)


def test_attend_counts_the_reason_of_the_decision():
    runtime = _runtime("local", {"min_seq_len": 32, "window": 8, "num_sink_tokens": 2})
    q, k = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8)
    assert runtime.attend(q, k, k, scale=0.3, causal=True, key_padding_mask=None) is None
    call = describe_call(q, k, k, scale=0.3, causal=True, output_attentions=True)
    assert runtime.attend(q, k, k, scale=0.3, causal=True, key_padding_mask=None, call=call) is None
    assert runtime.layer_plan.fallbacks == {reasons.min_seq_len_reason(32): 1, reasons.OUTPUT_ATTENTIONS_REASON: 1}
    q, k = torch.randn(1, 4, 40, 8), torch.randn(1, 2, 40, 8)
    assert runtime.attend(q, k, k, scale=0.3, causal=True, key_padding_mask=None) is not None
    assert runtime.layer_plan.served == 1


# -- one wording per reason ----------------------------------------------------------------------------------------

def _custom_attend_mask(n: int) -> torch.Tensor:
    """[1, 1, n, n] bool, True = attend: causal, except that query 5 may not see key 0 (not causal + key padding)."""
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    allowed[5, 0] = False
    return allowed[None, None]


class _InterfaceModule(torch.nn.Module):
    is_causal = True
    layer_idx = 0


class _ChatGLMCore(torch.nn.Module):
    def __init__(self, heads: int):
        super().__init__()
        self.num_attention_heads_per_partition = heads
        self.attention_dropout = torch.nn.Dropout(0.0)


def test_both_adapters_word_an_unrecognised_mask_alike():
    n, heads = 16, 2
    q, k, v = (torch.randn(1, heads, n, 8) for _ in range(3))
    allowed = _custom_attend_mask(n)

    module = _InterfaceModule()
    interface_runtime = _runtime("local", {"min_seq_len": 1, "window": 4, "num_sink_tokens": 1})
    interface_runtime.previous_implementation = "sdpa"
    setattr(module, attention_interface.RUNTIME_ATTR, interface_runtime)
    with torch.no_grad():
        attention_interface.attention_forward(module, q, k, v, allowed, scaling=8 ** -0.5)

    chatglm_runtime = _runtime("local", {"min_seq_len": 1, "window": 4, "num_sink_tokens": 1})
    original_calls = []

    def original(query_layer, key_layer, value_layer, attention_mask):
        original_calls.append(attention_mask)
        return torch.zeros(1, n, heads * 8)

    core = _ChatGLMCore(heads).eval()
    forward = _make_forward(ChatGLMAdapter("batch_first"), chatglm_runtime, original)
    with torch.no_grad():
        forward(core, q, k, v, ~allowed)  # ChatGLM's masks are True = masked

    assert len(original_calls) == 1  # exact attention: the model's own
    assert interface_runtime.layer_plan.fallbacks == {reasons.FULL_MASK_REASON: 1}
    assert chatglm_runtime.layer_plan.fallbacks == interface_runtime.layer_plan.fallbacks


# -- method bodies compute; the decision is the only gate -------------------------------------------------------

BELOW_THRESHOLD = [
    ("kmv", dict(min_seq_len=4096, block_size=16, num_samples=8, eps=0.5, causal_block=16, num_sink_tokens=4), 64, 8),
    ("poly", dict(min_seq_len=2048, degree=2), 64, 8),
    ("feature_sketch", dict(min_seq_len=1000), 16, 2048),
]


@pytest.mark.parametrize("name,params,n,d", BELOW_THRESHOLD, ids=[c[0] for c in BELOW_THRESHOLD])
def test_a_direct_call_below_min_seq_len_approximates_and_the_decision_runs_exact(name, params, n, d):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, d, generator=g) * 0.3 for _ in range(3))
    scale = d ** -0.5
    out, _ = get_method(name, **params)(q, k, v, causal=False, scale=scale, generator=torch.Generator().manual_seed(1))
    ref, _ = exact_attention(q, k, v, causal=False, scale=scale)
    assert float((out.float() - ref.float()).abs().max()) > 1e-5  # it ran the method, not exact attention
    runtime = _runtime(name, params)
    decision = runtime.decide(describe_call(q, k, v, scale=scale, causal=False), q, k)
    assert (decision.path, decision.reason) == (SERVE_EXACT, reasons.min_seq_len_reason(params["min_seq_len"]))
    assert runtime.attend(q, k, v, scale=scale, causal=False, key_padding_mask=None) is None


def test_the_self_attention_only_checks_use_the_one_decode_wording():
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 64, 8)
    for name in ("hyper", "sparse_hyper", "local", "block_select", "kmv"):
        spec = get_spec(name)
        assert spec.why_not(q, k, True, None, spec.resolve_params({}), 8 ** -0.5) == reasons.DECODE_REASON, name


# -- arguments resolved once ------------------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [0.0, -0.25, 1.0, 0.5, 0.1, 0.2, 1 / 3, 1.5, math.nan, 0, 3, 4])
def test_check_layers_and_resolve_layers_agree(layers):
    order = [2, 0, 1]
    try:
        check_layers(layers, 3)
    except ValueError as err:
        with pytest.raises(ValueError) as again:
            resolve_layers(layers, order, 3)
        assert str(again.value) == str(err)
        return
    chosen = resolve_layers(layers, order, 3)
    count = layers if isinstance(layers, int) else round(layers * 3)
    assert chosen == sorted(order[:count]) and (isinstance(layers, int) or count >= 1)


def test_the_fraction_rule_is_the_strict_one():
    for bad in (0.0, 1.0001, -0.5, math.inf):
        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
            resolve_layers(bad, [0, 1, 2], 3)
    with pytest.raises(ValueError, match="selects no layer"):
        resolve_layers(0.1, [0, 1, 2], 3)
    assert resolve_layers(1.0, [2, 0, 1], 3) == [0, 1, 2]


def test_patch_model_finds_the_adapter_reads_the_plan_and_resolves_parameters_once(tiny_model, tmp_path, monkeypatch):
    import hf_sparse_attn.patches as patches

    model = tiny_model("llama")
    counts = {"find_adapter": 0, "load": 0, "resolve_params": 0}
    find_adapter, load, resolve_params = patches.find_adapter, PatchPlan.load.__func__, MethodSpec.resolve_params

    def counting_find_adapter(*args, **kwargs):
        counts["find_adapter"] += 1
        return find_adapter(*args, **kwargs)

    def counting_load(cls, path):
        counts["load"] += 1
        return load(cls, path)

    def counting_resolve(self, params):
        counts["resolve_params"] += 1
        return resolve_params(self, params)

    plan = patch_model(model, method="local", layers="all", min_seq_len=16)
    plan.save(tmp_path / "plan.json")
    num_layers = len(plan.layers)
    monkeypatch.setattr(patches, "find_adapter", counting_find_adapter)
    monkeypatch.setattr("hf_sparse_attn.patching.find_adapter", counting_find_adapter, raising=False)
    monkeypatch.setattr(PatchPlan, "load", classmethod(counting_load))
    monkeypatch.setattr(MethodSpec, "resolve_params", counting_resolve)

    patch_model(model, method="local", layers="all", min_seq_len=16)
    assert counts == {"find_adapter": 1, "load": 0, "resolve_params": 1}

    counts.update(find_adapter=0, resolve_params=0)
    again = patch_model(model, plan=tmp_path / "plan.json")
    assert counts == {"find_adapter": 1, "load": 1, "resolve_params": num_layers}  # once per patched layer
    assert again.to_dict()["layers"] == plan.to_dict()["layers"]
