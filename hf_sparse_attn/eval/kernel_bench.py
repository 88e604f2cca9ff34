"""Kernel-level speed of attention methods against torch SDPA, measured in the same run.

``bench_kernel(method, n, causal, dtype)`` times a registered method and
``torch.nn.functional.scaled_dot_product_attention`` on the same random q, k, v [B, H, N, D], alternating the
two on every repeat (so both see the same machine load) and reporting medians. Also reported:

* useful GFLOP/s: the dense-equivalent work 4 * B * H * N * N * D (halved for causal: the two matmuls QK^T and
  PV of full attention) divided by the time, for SDPA and, with the same count, for the method (a method that
  does less work than that shows more "useful" GFLOP/s than the machine has: it is the speed-up in FLOP units);
* peak extra memory: the largest resident set size (RSS, sampled every millisecond from /proc/self/statm by a
  thread) above the RSS just before the call. torch's CPU allocator returns large blocks to the OS, so RSS
  follows the tensors; tracemalloc would not see torch memory at all.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any, Callable, Optional, Sequence

import torch

from ..methods import get_method

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """Context manager: ``peak_extra`` = max RSS during the block minus RSS at entry (bytes)."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.peak_extra = 0

    def __enter__(self) -> "PeakRSS":
        self._base = _rss_bytes()
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            time.sleep(self.interval_s)

    def __exit__(self, *exc: Any) -> None:
        self._peak = max(self._peak, _rss_bytes())
        self._stop.set()
        self._thread.join()
        self.peak_extra = self._peak - self._base


def dense_flops(batch: int, heads: int, n: int, head_dim: int, causal: bool) -> float:
    """Work of dense attention, 4 B H N^2 D (QK^T and PV), halved for causal."""
    flops = 4.0 * batch * heads * n * n * head_dim
    return flops / 2 if causal else flops


def _timed(fn: Callable[[], Any]) -> tuple[float, int]:
    with PeakRSS() as mem:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
    return elapsed, mem.peak_extra


def bench_kernels(methods: Sequence[str], n: int, causal: bool, dtype: torch.dtype = torch.float32, *,
                  batch: int = 1, heads: int = 8, head_dim: int = 64, repeats: int = 3, warmup: int = 1,
                  params: Optional[dict[str, dict]] = None, seed: int = 0, sdpa: bool = True) -> dict:
    """Time ``methods`` (registered names) and SDPA on one random problem, alternating them on each repeat.

    Returns {"n", "causal", "dtype", "batch", "heads", "head_dim", "repeats", "threads", "sdpa": {...},
    "methods": {name: {"time_s", "times_s", "peak_extra_mb", "useful_gflops", "speedup_vs_sdpa", "params"}}}.
    """
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g).to(dtype) for _ in range(3))
    scale = head_dim ** -0.5
    calls: dict[str, Callable[[], Any]] = {}
    resolved: dict[str, dict] = {}
    for name in methods:
        fn = get_method(name, **(params or {}).get(name, {}))
        resolved[name] = dict(fn.method_params)
        calls[name] = (lambda fn=fn: fn(q, k, v, causal=causal, scale=scale))
    if sdpa:
        calls["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    for _ in range(warmup):
        for call in calls.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    mems: dict[str, list[int]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            t, m = _timed(call)
            times[name].append(t)
            mems[name].append(m)
    work = dense_flops(batch, heads, n, head_dim, causal)

    def summary(name: str) -> dict:
        t = statistics.median(times[name])
        return {"time_s": t, "times_s": times[name], "peak_extra_mb": max(mems[name]) / 2**20,
                "useful_gflops": work / t / 1e9}

    result = {"n": n, "causal": causal, "dtype": str(dtype).replace("torch.", ""), "batch": batch, "heads": heads,
              "head_dim": head_dim, "repeats": repeats, "threads": torch.get_num_threads(), "methods": {}}
    if sdpa:
        result["sdpa"] = summary("sdpa")
    for name in methods:
        entry = summary(name)
        entry["params"] = resolved[name]
        if sdpa:
            entry["speedup_vs_sdpa"] = result["sdpa"]["time_s"] / entry["time_s"]
        result["methods"][name] = entry
    return result


def bench_kernel(method: str, n: int, causal: bool, dtype: torch.dtype = torch.float32, **kwargs: Any) -> dict:
    """One method against SDPA: the ``methods[method]`` entry of :func:`bench_kernels`, plus ``sdpa``."""
    res = bench_kernels([method], n, causal, dtype, **kwargs)
    out = dict(res["methods"][method])
    out.update({key: res[key] for key in ("n", "causal", "dtype", "batch", "heads", "head_dim", "repeats", "threads")})
    out["sdpa"] = res.get("sdpa")
    return out
