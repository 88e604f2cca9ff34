"""The reused kernel buffers (hf_sparse_attn/kernels/workspace.py): one store per thread, reused within a thread,
bounded by a per-thread limit, released for every thread by clear_all_workspaces / unpatch_model and when a
thread ends."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from hf_sparse_attn import patch_model, unpatch_model
from hf_sparse_attn.kernels import workspace as ws
from hf_sparse_attn.methods import get_method

LIKE = torch.zeros(1)


@pytest.fixture(autouse=True)
def clean():
    ws.clear_all_workspaces()
    yield
    ws.clear_all_workspaces()


def _in_thread(fn):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()))
    thread.start()
    thread.join()
    return result["value"]


def test_reused_within_a_thread_and_distinct_between_threads():
    a = ws.workspace("buf", (4, 8), LIKE)
    b = ws.workspace("buf", (2, 8), LIKE)  # smaller: a view of the same buffer
    assert a.data_ptr() == b.data_ptr() and b.shape == (2, 8)
    assert ws.workspace_bytes() == 4 * 8 * 4
    other = _in_thread(lambda: ws.workspace("buf", (4, 8), LIKE).data_ptr())
    assert other != a.data_ptr()
    grown = ws.workspace("buf", (16, 8), LIKE)  # larger: a new buffer replaces the old one
    assert grown.shape == (16, 8) and ws.workspace_bytes() == 16 * 8 * 4
    assert ws.workspace("buf", (4, 8), torch.zeros(1, dtype=torch.float64)).dtype == torch.float64  # own key


def test_clear_all_reaches_every_live_thread_and_finished_threads_release_theirs():
    started, release = threading.Event(), threading.Event()
    held = {}

    def worker():
        ws.workspace("w", (1000,), LIKE)
        held["before"] = ws.workspace_bytes()
        started.set()
        release.wait(10)
        held["after"] = ws.workspace_bytes()

    thread = threading.Thread(target=worker)
    thread.start()
    started.wait(10)
    ws.workspace("main", (10,), LIKE)
    assert ws.all_workspace_bytes() == 4000 + 40
    ws.clear_all_workspaces()
    assert ws.all_workspace_bytes() == 0 and ws.workspace_bytes() == 0
    release.set()
    thread.join()
    assert held == {"before": 4000, "after": 0}

    _in_thread(lambda: ws.workspace("gone", (5000,), LIKE))
    gc.collect()
    assert ws.all_workspace_bytes() == 0  # the finished thread's store is not kept alive by the registry


def test_limit_bounds_what_a_thread_keeps():
    old = ws.set_workspace_limit(1000)
    try:
        kept = ws.workspace("small", (100,), LIKE)  # 400 bytes: kept
        big = ws.workspace("big", (1000,), LIKE)  # 4000 bytes: over the limit, a fresh tensor, not kept
        assert big.shape == (1000,) and ws.workspace_bytes() == 400
        assert ws.workspace("small", (100,), LIKE).data_ptr() == kept.data_ptr()
        ws.set_workspace_limit(100)  # lowering the limit frees stores above it
        assert ws.workspace_bytes() == 0
        with pytest.raises(ValueError, match="max_bytes must be an int >= 0"):
            ws.set_workspace_limit(-1)
    finally:
        ws.set_workspace_limit(old)


def test_limit_from_environment(monkeypatch):
    monkeypatch.setenv("HF_SPARSE_ATTN_WORKSPACE_MB", "2.5")
    assert ws._limit_from_env() == int(2.5 * 2**20)
    monkeypatch.setenv("HF_SPARSE_ATTN_WORKSPACE_MB", "lots")
    with pytest.raises(ValueError, match="HF_SPARSE_ATTN_WORKSPACE_MB must be a number of MiB"):
        ws._limit_from_env()


def test_outputs_do_not_depend_on_the_limit():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 512, 16, generator=g) for _ in range(3))
    fn = get_method("hyper", block_size=64, sample_size=32, min_seq_len=128, num_sink_tokens=8)
    outs = []
    for limit in (ws.workspace_limit(), 0):
        old = ws.set_workspace_limit(limit)
        try:
            for causal in (False, True):
                outs.append(fn(q, k, v, causal=causal, scale=0.25, generator=torch.Generator().manual_seed(1))[0])
        finally:
            ws.set_workspace_limit(old)
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])


def test_unpatch_model_releases_the_buffers_of_every_thread(tiny_model):
    model = tiny_model("llama")
    patch_model(model, method="hyper", layers="all", block_size=16, sample_size=8, min_seq_len=32, num_sink_tokens=2)
    ids = torch.randint(3, 101, (1, 96), generator=torch.Generator().manual_seed(0))

    def forward():
        with torch.no_grad():
            model(ids)
        return ws.workspace_bytes()

    assert _in_thread(forward) > 0 and forward() > 0
    assert ws.all_workspace_bytes() > 0
    unpatch_model(model)
    assert ws.all_workspace_bytes() == 0


def test_concurrent_method_calls_equal_sequential_ones():
    """Two threads calling hyper at once on different inputs get what each gets alone (the old process-wide
    buffers let one call's gathered blocks overwrite the other's)."""
    g = torch.Generator().manual_seed(0)
    inputs = [[torch.randn(1, 4, 1024, 32, generator=g) for _ in range(3)] for _ in range(2)]
    fn = get_method("hyper", block_size=128, sample_size=64, min_seq_len=256, num_sink_tokens=16)

    def call(i):
        return fn(*inputs[i], causal=False, scale=0.2, generator=torch.Generator().manual_seed(i))[0]

    expected = [call(0), call(1)]
    barrier = threading.Barrier(2)
    results = [[], []]

    def worker(i):
        for _ in range(4):
            barrier.wait(10)
            results[i].append(call(i))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        assert len(results[i]) == 4 and all(torch.equal(r, expected[i]) for r in results[i])
