"""``patch_model(..., other_layers={"method": ..., ...})``: the layers ``layers`` does not choose run a second method."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hf_sparse_attn import current_plan, patch_model, unpatch_model
from hf_sparse_attn.eval import bench as mb

sys.path.insert(0, str(Path(__file__).parent))
from tiny_checkpoint import tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LOCAL_WIDE = {"method": "local", "window": 64, "num_sink_tokens": 1, "min_seq_len": 1}
SELECT_WIDE = {"window": 64, "num_selected": 8, "num_sink_tokens": 1, "min_seq_len": 1}


def _model():
    model = tiny_llama(64)
    model.set_attn_implementation("sdpa")
    return model


def test_the_layers_not_chosen_run_the_other_method_and_the_plan_says_which():
    model = _model()
    plan = patch_model(model, method="block_select", layers=1, other_layers=LOCAL_WIDE, **SELECT_WIDE)
    try:
        chosen = plan.layers[[l.rank for l in plan.layers].index(0)].layer_idx  # largest R: the one layer chosen
        assert [l.method for l in plan.layers] == ["block_select" if i == chosen else "local" for i in range(3)]
        assert plan.method is None and plan.methods == ["block_select", "local"]
        assert plan.method_summary == "block_select+local" and plan.patched_layers == [0, 1, 2]
        assert plan.layer(chosen).params["window"] == 64 and plan.layer(chosen).params["num_selected"] == 8
        other = next(l for l in plan.layers if l.layer_idx != chosen)
        assert other.params == {"window": 64, "num_sink_tokens": 1, "min_seq_len": 1}
        assert {l.decode_method for l in plan.layers} == {"exact"}  # the same decode method everywhere
        with torch.no_grad():
            model(input_ids=torch.randint(4, 64, (1, 24)))
        assert all(l.served == 1 for l in plan.layers)  # every layer ran its own method
    finally:
        unpatch_model(model)


def test_a_mixed_plan_is_exact_where_every_window_covers_the_sequence():
    model = _model()
    ids = torch.randint(4, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    patch_model(model, method="block_select", layers=2, other_layers=LOCAL_WIDE, **SELECT_WIDE)
    try:
        with torch.no_grad():
            got = model(input_ids=ids).logits
    finally:
        unpatch_model(model)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_mixed_plan_changes_the_output_where_the_other_window_is_short():
    model = _model()
    ids = torch.randint(4, 64, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    short = dict(LOCAL_WIDE, window=4)
    plan = patch_model(model, method="block_select", layers=1, other_layers=short, **SELECT_WIDE)
    try:
        with torch.no_grad():
            got = model(input_ids=ids).logits
    finally:
        unpatch_model(model)
    assert [l.params["window"] for l in plan.layers if l.method == "local"] == [4, 4]
    assert (got - expected).abs().max() > 1e-3  # the other layers' window does cut the context


def test_a_mixed_plan_round_trips_through_its_file(tmp_path):
    model = _model()
    plan = patch_model(model, method="block_select", layers=1, other_layers=LOCAL_WIDE, **SELECT_WIDE)
    plan.save(tmp_path / "plan.json")
    unpatch_model(model)
    again = patch_model(model, plan=tmp_path / "plan.json")
    try:
        assert [(l.method, l.params) for l in again.layers] == [(l.method, l.params) for l in plan.layers]
        assert again.method is None
    finally:
        unpatch_model(model)


def test_all_layers_chosen_leaves_no_other_layer_and_the_plan_single():
    model = _model()
    plan = patch_model(model, method="local", layers="all", other_layers={"method": "block_select"}, window=8)
    unpatch_model(model)
    assert plan.method == "local" and plan.methods == ["local"]


@pytest.mark.parametrize("other, message", [
    ("local", "other_layers must be a dict with a 'method'"),
    ({"window": 4}, "other_layers needs a 'method'"),
    ({"method": "nope"}, "unknown method 'nope'; available methods: .*local"),
    ({"method": "local", "bogus": 1}, "other_layers: .*bogus"),
    ({"method": "local", "window": -3}, "other_layers: .*window"),
])
def test_bad_other_layers_are_refused_before_the_model_changes(other, message):
    model = _model()
    with pytest.raises(ValueError, match=message):
        patch_model(model, method="block_select", layers=1, other_layers=other)
    assert current_plan(model) is None


def test_other_layers_with_a_plan_is_refused(tmp_path):
    model = _model()
    plan = patch_model(model, method="local", layers=1)
    unpatch_model(model)
    with pytest.raises(ValueError, match="either plan= or method parameters"):
        patch_model(model, plan=plan, other_layers=LOCAL_WIDE)


def test_a_bench_cell_records_both_methods_parameters():
    model = _model()
    texts = [("a", torch.randint(4, 64, (1, 24), generator=torch.Generator().manual_seed(2)))]
    cell = mb.Cell("block_select", 24, 1, "weight_norm")
    record = mb.run_cell(model, cell, texts, method_params={"block_select": {**SELECT_WIDE,
                                                                            "other_layers": LOCAL_WIDE}})
    assert record["params"]["window"] == 64 and record["params"]["num_selected"] == 8
    assert record["params"]["other_layers"] == LOCAL_WIDE
    assert record["served"] == 3


def test_a_bench_cell_with_one_method_and_two_windows_records_each_window():
    model = _model()
    texts = [("a", torch.randint(4, 64, (1, 24), generator=torch.Generator().manual_seed(3)))]
    cell = mb.Cell("block_select", 24, 1, "weight_norm")
    narrow = {"method": "block_select", **dict(SELECT_WIDE, window=8)}
    record = mb.run_cell(model, cell, texts, method_params={"block_select": {**SELECT_WIDE, "other_layers": narrow}})
    assert record["params"]["window"] == 64  # the chosen layer's (largest R), not layer 0's
    assert record["params"]["other_layers"]["window"] == 8 and record["params"]["other_layers"]["method"] == "block_select"


SHORT_DECODE = {"window": 8, "num_sink_tokens": 2}


def _split_decode_plan(model):
    """Exact prefill everywhere; exact decode on the one layer of largest R, sinks + a window of 8 on the other two."""
    return patch_model(model, method="exact", layers=1, decode_method="exact",
                       other_layers={"method": "exact", "decode_method": "local", "decode_params": SHORT_DECODE})


def test_the_other_layers_can_run_their_own_decode_method_and_the_plan_says_which(tmp_path):
    model = _model()
    plan = _split_decode_plan(model)
    unpatch_model(model)
    chosen = next(l.layer_idx for l in plan.layers if l.rank == 0)
    assert [l.decode_method for l in plan.layers] == ["exact" if i == chosen else "local" for i in range(3)]
    local = next(l for l in plan.layers if l.layer_idx != chosen)
    assert local.decode_params["window"] == 8 and local.decode_params["num_sink_tokens"] == 2
    assert plan.layer(chosen).decode_params == {} and plan.decode_methods == ["exact", "local"]
    plan.save(tmp_path / "plan.json")
    again = patch_model(model, plan=tmp_path / "plan.json")
    unpatch_model(model)
    assert [(l.decode_method, l.decode_params) for l in again.layers] == \
        [(l.decode_method, l.decode_params) for l in plan.layers]


def test_each_layer_decodes_with_its_own_method():
    """One decode step over a cache whose middle keys and values are replaced: in the layers running local decode
    (sinks 2 + window 8) the step cannot tell; in the layer running exact decode it can."""
    from transformers import DynamicCache

    model = _model()
    ids = torch.randint(4, 64, (1, 48), generator=torch.Generator().manual_seed(4))
    step = torch.tensor([[5]])
    plan = _split_decode_plan(model)
    chosen = next(l.layer_idx for l in plan.layers if l.rank == 0)

    def step_logits(replace_in: list[int]) -> torch.Tensor:
        cache = DynamicCache()
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache)
            for i in replace_in:
                layer = cache.layers[i]
                gen = torch.Generator().manual_seed(i)
                layer.keys[:, :, 4:30] = torch.randn(layer.keys[:, :, 4:30].shape, generator=gen)
                layer.values[:, :, 4:30] = torch.randn(layer.values[:, :, 4:30].shape, generator=gen)
            return model(input_ids=step, past_key_values=cache).logits

    try:
        reference = step_logits([])
        in_local_layers = step_logits([i for i in range(3) if i != chosen])
        in_exact_layer = step_logits([chosen])
    finally:
        unpatch_model(model)
    torch.testing.assert_close(in_local_layers, reference)
    assert not torch.allclose(in_exact_layer, reference, atol=1e-3)
    assert [l.decode_served for l in plan.layers] == [3, 3, 3]  # three decode steps, each served in every layer


def test_the_other_layers_inherit_the_chosen_layers_decode_unless_they_name_their_own():
    model = _model()
    plan = patch_model(model, method="exact", layers=1, decode_method="local", decode_params=SHORT_DECODE,
                       other_layers={"method": "exact"})
    unpatch_model(model)
    assert {(l.decode_method, l.decode_params["window"]) for l in plan.layers} == {("local", 8)}
    plan = patch_model(model, method="exact", layers=1, decode_method="local", decode_params=SHORT_DECODE,
                       other_layers={"method": "exact", "decode_method": "local"})
    unpatch_model(model)
    chosen = next(l.layer_idx for l in plan.layers if l.rank == 0)
    assert [l.decode_params["window"] == 8 for l in plan.layers] == [i == chosen for i in range(3)]  # own defaults


@pytest.mark.parametrize("other, message", [
    ({"method": "exact", "decode_params": {"window": 8}}, "'decode_params' needs a 'decode_method'"),
    ({"method": "exact", "decode_method": "nope"}, "other_layers: .*nope.*exact.*local"),
    ({"method": "exact", "decode_method": "local", "decode_params": {"bogus": 1}}, "other_layers: .*bogus"),
    ({"method": "exact", "decode_method": "local", "decode_params": 8}, "other_layers: decode_params must be a dict"),
])
def test_bad_decode_in_other_layers_is_refused_before_the_model_changes(other, message):
    model = _model()
    with pytest.raises(ValueError, match=message):
        patch_model(model, method="exact", layers=1, other_layers=other)
    assert current_plan(model) is None
