"""Every patch_model argument is checked before the model is read or changed: a clear error naming the valid
values, and the model (patched or not) left exactly as it was."""

from __future__ import annotations

import pytest
import torch

from hf_sparse_attn import patch_model, unpatch_model
from hf_sparse_attn.patching import current_plan
from hf_sparse_attn.validation import SEED_MAX, check_calibration, check_layers, check_seed

NUM_LAYERS = 3  # the tiny models of conftest.py


@pytest.fixture
def llama(tiny_model):
    return tiny_model("llama")


def _snapshot(model):
    return (model.config._attn_implementation, dict(model.__dict__).keys() - {"_modules"},
            {n: p.detach().clone() for n, p in model.state_dict().items()})


def _assert_unchanged(model, before):
    impl, attrs, state = before
    assert model.config._attn_implementation == impl
    assert dict(model.__dict__).keys() - {"_modules"} == attrs
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[n], state[n]) for n in state)


def _refused(model, match, **kwargs):
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        patch_model(model, **kwargs)
    _assert_unchanged(model, before)
    assert current_plan(model) is None


@pytest.mark.parametrize("seed", [None, "x", 1.5, 2**70, -1, True, SEED_MAX + 1, float("nan")])
def test_bad_seed(llama, seed):
    _refused(llama, rf"seed.*0\.\.{SEED_MAX}", method="exact", layers=1, seed=seed)


def test_good_seeds_accepted(llama):
    import numpy as np

    for seed in (0, 7, SEED_MAX, np.int64(3)):
        assert patch_model(llama, method="hyper", layers=1, seed=seed).seed == int(seed)
    unpatch_model(llama)
    assert check_seed(np.int32(5)) == 5


@pytest.mark.parametrize("layers, match", [
    (None, "layers must be 'all', an int count in 0..3"),
    ("half", "layers must be 'all'"),
    (True, "layers must be"),
    ({"a": 1}, "layers must be"),
    ({0, 1}, "layers must be"),
    (4, "layers=4 is not a layer count: the model has 3"),
    (-1, "layers=-1 is not a layer count"),
    (2**70, "is not a layer count"),
    (0.0, r"fraction must be in \(0, 1\]"),
    (1.5, r"fraction must be in \(0, 1\]"),
    (-0.5, r"fraction must be in \(0, 1\]"),
    (float("nan"), r"fraction must be in \(0, 1\]"),
    (float("inf"), r"fraction must be in \(0, 1\]"),
    ([0, 3], r"layer indices \[3\] are outside 0..2"),
    ([-1], r"outside 0..2"),
    ([0, 0], r"layer indices \[0\] appear more than once"),
    ([0, 1.0], "layer indices must be ints"),
    ([0, "1"], "layer indices must be ints"),
    ([True], "layer indices must be ints"),
])
def test_bad_layers(llama, layers, match):
    _refused(llama, match, method="exact", layers=layers)


def test_good_layers_accepted(llama):
    for layers, chosen in ((0, []), (3, [0, 1, 2]), ("all", [0, 1, 2]), ([2, 0], [0, 2]), ((1,), [1]),
                           (range(2), [0, 1]), (1.0, [0, 1, 2])):
        assert patch_model(llama, method="exact", layers=layers, select="first").patched_layers == chosen
    unpatch_model(llama)


@pytest.mark.parametrize("select, match", [
    ("weights", r"unknown select 'weights'; select must be one of \['weight_norm'"),
    (None, "select must be one of"),
    (3, "select must be one of"),
    ([0, 1], r"every layer index 0..2 exactly once"),
    ([0, 1, 1], r"every layer index 0..2 exactly once"),
    ([0, 1, 5], r"every layer index 0..2 exactly once"),
    ([0, 1, 2.0], "int layer indices"),
])
def test_bad_select(llama, select, match):
    _refused(llama, match, method="exact", layers=1, select=select)


def test_select_list_and_callable_accepted(llama):
    assert patch_model(llama, method="exact", layers=1, select=[2, 0, 1]).patched_layers == [2]
    assert patch_model(llama, method="exact", layers=1, select=lambda ranking: [1, 2, 0]).patched_layers == [1]
    unpatch_model(llama)


@pytest.mark.parametrize("norm", ["spectrall", None, 2, "fro"])
def test_bad_norm(llama, norm):
    _refused(llama, r"norm must be one of \['spectral', 'frobenius'\]", method="exact", layers=1, norm=norm)


@pytest.mark.parametrize("calibration, match", [
    (None, "needs calibration=input_ids"),
    ([[1, 2, 3]], "calibration must be a torch.Tensor"),
    (torch.rand(1, 8), "integer token ids"),
    (torch.ones(8, dtype=torch.long), r"shape \[batch, seq_len\]"),
    (torch.ones(1, 0, dtype=torch.long), r"shape \[batch, seq_len\]"),
    (torch.full((1, 8), 101), r"token ids must be in 0..100; got ids in 101..101"),
    (torch.full((1, 8), -1), r"token ids must be in 0..100"),
])
def test_bad_calibration(llama, calibration, match):
    _refused(llama, match, method="exact", layers=1, select="measured", calibration=calibration)


def test_calibration_without_measured_is_refused(llama):
    _refused(llama, "calibration= is used only by select='measured'", method="exact", layers=1,
             calibration=torch.ones(1, 8, dtype=torch.long))


@pytest.mark.parametrize("options, match", [
    ("batch_first", "adapter_options must be a dict"),
    ([("chatglm_layout", "auto")], "adapter_options must be a dict"),
    ({1: "x"}, "keys must be option names"),
    ({"layout": "x"}, r"unknown adapter option\(s\) \['layout'\]; adapter options are: \['chatglm_layout'\]"),
])
def test_bad_adapter_options(llama, options, match):
    _refused(llama, match, method="exact", layers=1, adapter_options=options)


@pytest.mark.parametrize("method, params, match", [
    ("hyperr", {}, "unknown method 'hyperr'; available methods: .*hyper"),
    (None, {}, "method must be a method name"),
    ("hyper", {"block_size": 2**70}, r"'block_size'=\d+ does not fit in 64 bits; it must be an int in \[1, "),
    ("hyper", {"block_size": 0}, "below its minimum 1"),
    ("hyper", {"block_size": 1.5}, "must be an integer"),
    ("hyper", {"block_size": float("inf")}, "must be an integer"),
    ("hyper", {"block_size": "256"}, "must be a int"),
    ("kmv", {"lsh_num_tables": 2**64}, "does not fit in 64 bits"),
    ("hyper", {"blocksize": 256}, "has no parameter 'blocksize'; its parameters are: .*block_size"),
    ("kmv", {"eps": float("nan")}, r"'eps' must be a finite number, got nan; valid: \[0.0001, 1.0\]"),
    ("kmv", {"budget": "fast"}, r"is not one of \['variance', 'two_level', 'kde'\]"),
    ("poly", {"allow_out_of_regime": 1}, "must be a bool"),
])
def test_bad_method_and_parameters(llama, method, params, match):
    _refused(llama, match, method=method, layers=1, **params)


def test_bad_plan_argument(llama, tmp_path):
    _refused(llama, "plan must be a PatchPlan, a path to its JSON file, or None", plan=123)
    _refused(llama, "does not exist", plan=str(tmp_path / "missing.json"))
    plan = patch_model(llama, method="hyper", layers=1)
    unpatch_model(llama)
    data = plan.to_dict()
    data["seed"] = -5
    import json

    path = tmp_path / "bad_seed.json"
    path.write_text(json.dumps(data))
    _refused(llama, r"plan seed=-5 is out of range", plan=str(path))


def test_not_a_module():
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        patch_model("model", method="exact")


def test_bad_arguments_leave_a_patched_model_patched_as_before(llama):
    plan = patch_model(llama, method="hyper", layers=[1], seed=3)
    ids = torch.randint(3, 101, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = llama(ids).logits
    for kwargs in (dict(seed="x"), dict(layers=[5]), dict(select="nope"), dict(block_size=-1), dict(norm=None)):
        with pytest.raises(ValueError):
            patch_model(llama, method="hyper", **kwargs)
        assert current_plan(llama) is plan
    with torch.no_grad():
        assert torch.equal(llama(ids).logits, before)
    unpatch_model(llama)


def test_checks_directly():
    check_layers("all", 3)
    check_calibration(torch.ones(2, 4, dtype=torch.long), vocab_size=10)
    with pytest.raises(ValueError, match="layers=4"):
        check_layers(4, 3)
