"""200 patch / unpatch / repatch cycles of one tiny model: outputs identical in every cycle (patched and unpatched),
and memory flat: no reused kernel buffer kept after unpatch, Python allocations (tracemalloc), the process RSS, the
registered attention functions and the model's own attributes do not grow with the cycles."""

from __future__ import annotations

import gc
import os
import tracemalloc

import pytest
import torch
from stress_helpers import serving_params

from hf_sparse_attn import patch_model, unpatch_model
from hf_sparse_attn.kernels.workspace import all_workspace_bytes

pytestmark = pytest.mark.stress  # CI runs the stress suite with the rest; `pytest -m stress` runs only it

CYCLES = 200
CHECK_EVERY = 20  # full forward comparisons every this many cycles (one forward per cycle otherwise)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _attention_registry_size() -> int:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return len(AttentionInterface._global_mapping) + len(AttentionMaskInterface._global_mapping)


def test_patch_unpatch_cycles_keep_outputs_and_memory_flat(tiny_model):
    model = tiny_model("llama")
    ids = torch.randint(3, 101, (2, 80), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 80, dtype=torch.long)
    mask[1, :9] = 0
    methods = ["hyper", "sparse_hyper"]

    def forward():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits

    original = forward()
    patched = {}
    for name in methods:
        patch_model(model, method=name, layers="all", **serving_params(name))
        patched[name] = forward()
        unpatch_model(model)
    assert not torch.equal(patched["hyper"], original)  # the patch does change the computation

    own_attributes = set(model.__dict__)
    registry_size = _attention_registry_size()
    tracemalloc.start()
    rss, python_bytes = [], []
    try:
        for cycle in range(CYCLES):
            name = methods[cycle % 2]
            patch_model(model, method=name, layers="all", **serving_params(name))
            if cycle % 3 == 0:  # repatch an already patched model: replaces the patch, never stacks
                patch_model(model, method=name, layers="all", **serving_params(name))
            out = forward()
            assert torch.equal(out, patched[name]), f"cycle {cycle}: {name} output changed"
            assert all_workspace_bytes() > 0
            unpatch_model(model)
            assert all_workspace_bytes() == 0, f"cycle {cycle}: reused buffers kept after unpatch"
            if cycle % CHECK_EVERY == 0:
                assert torch.equal(forward(), original), f"cycle {cycle}: unpatched output differs from the original"
                gc.collect()
                rss.append(_rss_bytes())
                python_bytes.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert set(model.__dict__) == own_attributes
    assert _attention_registry_size() == registry_size
    # After the first checkpoints (allocator warm-up), nothing grows with the number of cycles.
    growth_python = python_bytes[-1] - python_bytes[1]
    growth_rss = rss[-1] - rss[1]
    assert growth_python < 2 * 2**20, f"Python allocations grew by {growth_python / 2**20:.1f} MiB over {CYCLES} cycles"
    assert growth_rss < 64 * 2**20, f"RSS grew by {growth_rss / 2**20:.1f} MiB over {CYCLES} cycles"
