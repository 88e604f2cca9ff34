"""N threads x M calls of patched tiny models, for every registered method: one model shared by all threads, and
one model per thread. Every output must equal, bit for bit, the output of the same call run alone, and the plan's
counters must count every call once.

With the process-wide buffers of earlier versions (one workspace shared by all calls) hyper and sparse_hyper
gave outputs 6-20% off under this test, without any error."""

from __future__ import annotations

import threading

import pytest
import torch
from stress_helpers import serving_params

from hf_sparse_attn import patch_model, unpatch_model
from hf_sparse_attn.methods import list_methods

pytestmark = pytest.mark.stress  # CI runs the stress suite with the rest; `pytest -m stress` runs only it

THREADS = 4
CALLS = 3
SLOW = {"feature_sketch": 1, "kmv": 2}  # calls per thread of the methods that take ~0.2-1.5 s per tiny forward
N_TOKENS = 96


def _inputs(count: int, seed: int):
    """``count`` (input_ids [2, N], attention_mask [2, N]) pairs; row 1 left-padded by a varying amount."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(count):
        ids = torch.randint(3, 101, (2, N_TOKENS), generator=g)
        mask = torch.ones(2, N_TOKENS, dtype=torch.long)
        mask[1, : 5 + 3 * i] = 0
        batches.append((ids, mask))
    return batches


def _forward(model, batch):
    ids, mask = batch
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _run_threads(work):
    """Run work(thread_index) in THREADS threads started together; re-raise the first error."""
    barrier = threading.Barrier(THREADS)
    errors = []

    def target(i):
        try:
            barrier.wait(30)
            work(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    if errors:
        raise errors[0]


def _calls_counted(plan):
    return [layer.served + sum(layer.fallbacks.values()) for layer in plan.layers]


@pytest.mark.parametrize("name", list_methods())
def test_one_shared_model_called_from_many_threads(tiny_model, name):
    model = tiny_model("llama")
    plan = patch_model(model, method=name, layers="all", **serving_params(name))
    calls = SLOW.get(name, CALLS)
    batches = _inputs(THREADS * calls, seed=1)
    expected = [_forward(model, b) for b in batches]
    assert sum(layer.served for layer in plan.layers) > 0, f"{name} never served: {plan.fallback_counts()}"
    results = {}

    def work(i):
        for j in range(calls):
            index = i * calls + j
            results[index] = _forward(model, batches[index])

    _run_threads(work)
    for index, want in enumerate(expected):
        assert torch.equal(results[index], want), f"{name}: call {index} differs from the same call run alone"
    assert _calls_counted(plan) == [2 * THREADS * calls] * len(plan.layers)
    unpatch_model(model)


@pytest.mark.parametrize("name", list_methods())
def test_one_model_per_thread(tiny_model, name):
    models, plans = [], []
    for i in range(THREADS):
        model = tiny_model("llama", seed=i)  # different weights per thread
        plans.append(patch_model(model, method=name, layers="all", seed=i, **serving_params(name)))
        models.append(model)
    calls = SLOW.get(name, CALLS)
    batches = _inputs(calls, seed=2)
    expected = [[_forward(models[i], b) for b in batches] for i in range(THREADS)]
    results = [[None] * calls for _ in range(THREADS)]

    def work(i):
        for j in range(calls):
            results[i][j] = _forward(models[i], batches[j])

    _run_threads(work)
    for i in range(THREADS):
        for j in range(calls):
            assert torch.equal(results[i][j], expected[i][j]), f"{name}: model {i} call {j} differs"
        assert _calls_counted(plans[i]) == [2 * calls] * len(plans[i].layers)
        unpatch_model(models[i])


def test_bare_method_calls_from_many_threads_at_long_length():
    """Method calls large enough to use several reused buffers of the sorted-block kernel (hyper and
    sparse_hyper, causal and not), many at once."""
    from hf_sparse_attn.methods import get_method

    g = torch.Generator().manual_seed(3)
    inputs = [[torch.randn(1, 2, 2048, 32, generator=g) for _ in range(3)] for _ in range(THREADS)]
    fns = [get_method("hyper", block_size=128, sample_size=64, min_seq_len=256, num_sink_tokens=16),
           get_method("sparse_hyper", block_size=128, min_seq_len=256, num_sink_tokens=16)]

    def call(i, j):
        fn = fns[(i + j) % 2]
        return fn(*inputs[i], causal=bool(j % 2), scale=0.2, generator=torch.Generator().manual_seed(i))[0]

    expected = {(i, j): call(i, j) for i in range(THREADS) for j in range(CALLS + 1)}
    results = {}

    def work(i):
        for j in range(CALLS + 1):
            results[(i, j)] = call(i, j)

    _run_threads(work)
    for key, want in expected.items():
        assert torch.equal(results[key], want), f"thread {key[0]} call {key[1]} differs from the call run alone"
