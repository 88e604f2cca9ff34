"""A plan made layer by layer (a calibrated plan) is what it is: ``method`` None, a method per layer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from hf_sparse_attn import PatchPlan, PlanError, patch_model, unpatch_model

sys.path.insert(0, str(Path(__file__).parent))
from tiny_checkpoint import tiny_llama  # noqa: E402


def _mixed_plan(model) -> PatchPlan:
    plan = patch_model(model, method="exact", layers="all")
    unpatch_model(model)
    data = plan.to_dict()
    data["method"], data["select"] = None, "calibrated"
    data["layers"][0].update(method="local", params={"window": 4, "num_sink_tokens": 1, "min_seq_len": 1})
    data["layers"][2].update(method=None, params={}, decode_method=None, decode_params={})
    return PatchPlan.from_dict(data)


def test_a_mixed_plan_round_trips_and_applies_each_layers_method(tmp_path):
    model = tiny_llama(64)
    model.set_attn_implementation("sdpa")
    plan = _mixed_plan(model)
    assert plan.method is None and plan.methods == ["exact", "local"]
    assert plan.method_summary == "exact+local" and "method='exact+local'" in str(plan)
    plan.save(tmp_path / "plan.json")
    assert json.loads((tmp_path / "plan.json").read_text())["method"] is None
    applied = patch_model(model, plan=tmp_path / "plan.json")
    try:
        ids = torch.randint(4, 64, (1, 16))
        with torch.no_grad():
            model(input_ids=ids)
        assert [l.method for l in applied.layers] == ["local", "exact", None]
        assert applied.layer(0).served == 1 and applied.layer(1).served == 1 and applied.layer(2).served == 0
    finally:
        unpatch_model(model)


def test_a_plan_method_that_is_neither_a_name_nor_null_is_refused():
    model = tiny_llama(64)
    model.set_attn_implementation("sdpa")
    data = _mixed_plan(model).to_dict()
    for bad in ("", 5):
        data["method"] = bad
        with pytest.raises(PlanError, match="'method' must be a method name, or null"):
            PatchPlan.from_dict(data)
