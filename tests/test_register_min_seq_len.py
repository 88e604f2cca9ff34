"""register_method(..., min_seq_len_param=...): a user-registered method names the parameter that holds its minimum
sequence length, and the one decision (patches/base.py: LayerRuntime.decide) runs exact attention below it."""

from __future__ import annotations

import pytest
import torch

from hf_sparse_attn import patch_model, unpatch_model
from hf_sparse_attn.methods import list_methods
from hf_sparse_attn.methods.exact import exact_attention
from hf_sparse_attn.methods.registry import _REGISTRY, Param, get_spec, register_method
from hf_sparse_attn.patches import reasons

pytestmark = pytest.mark.usefixtures("one_thread")

CALLS: list[int] = []  # the key count of every call the custom method served


def _counted_exact(q, k, v, *, causal, scale, key_padding_mask=None, generator=None, shortest=64, label="x"):
    """Exact attention that records each call: which calls the method itself served."""
    CALLS.append(k.shape[-2])
    return exact_attention(q, k, v, causal=causal, scale=scale, key_padding_mask=key_padding_mask)


@pytest.fixture
def register():
    """register_method for the test's methods, removed afterwards."""
    names = []

    def make(name, **kwargs):
        names.append(name)
        return register_method(name, _counted_exact, params={"shortest": Param(kind=int, low=0), "label": Param(kind=str)},
                               overwrite=True, **kwargs)

    yield make
    for name in names:
        _REGISTRY.pop(name, None)


def test_a_custom_threshold_runs_exact_below_it_and_the_method_above(tiny_model, register):
    spec = register("threshold_test", min_seq_len_param="shortest")
    assert spec.min_seq_len_param == "shortest" and spec.min_seq_len({"shortest": 24}) == 24
    model = tiny_model("llama")
    plan = patch_model(model, method="threshold_test", layers="all", shortest=24)
    try:
        CALLS.clear()
        with torch.no_grad():
            model(torch.randint(0, 100, (1, 16)))
        assert CALLS == []  # 16 tokens < 24: exact attention in every layer, counted under the one wording
        for layer in plan.layers:
            assert layer.fallbacks == {reasons.min_seq_len_reason(24): 1} and layer.served == 0
        assert reasons.min_seq_len_reason(24) == "seq_len < min_seq_len=24"
        with torch.no_grad():
            model(torch.randint(0, 100, (1, 32)))
        assert CALLS == [32] * len(plan.layers)  # 32 tokens: the method itself, in every layer
        assert all(layer.served == 1 for layer in plan.layers)
    finally:
        unpatch_model(model)


def test_without_the_keyword_only_a_parameter_named_min_seq_len_is_a_threshold(register):
    assert register("no_threshold_test").min_seq_len_param is None  # it has no parameter named min_seq_len
    assert register("opt_out_test", min_seq_len_param=None).min_seq_len({"shortest": 99}) == 0
    for name in list_methods():  # every built-in method with a threshold declares it explicitly
        spec = get_spec(name)
        assert spec.min_seq_len_param == ("min_seq_len" if "min_seq_len" in spec.params else None), name


@pytest.mark.parametrize("param", ["min_seq_len", "label"])
def test_the_keyword_must_name_a_declared_int_parameter(register, param):
    with pytest.raises(ValueError, match=rf"min_seq_len_param='{param}' must name one of its declared int parameters; "
                                         r"its parameters: shortest \(int\), label \(str\)"):
        register("bad_threshold_test", min_seq_len_param=param)
    assert "bad_threshold_test" not in list_methods()
