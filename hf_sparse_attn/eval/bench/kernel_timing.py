"""What the kernel benchmarks measure, and how: the wall time and peak extra memory of one call
(:func:`timed_call`), the dense-equivalent work of attention (:func:`dense_flops`) and the state of the machine
(:func:`machine_state`). Used by :mod:`.kernel_suite` (``hf-sparse-attn bench kernel``) and the kernel scripts.

* useful GFLOP/s: the dense-equivalent work 4 * B * H * N * N * D (halved for causal: the two matmuls QK^T and
  PV of full attention) divided by the time, for SDPA and, with the same count, for the method (a method that
  does less work than that shows more "useful" GFLOP/s than the machine has: it is the speed-up in FLOP units);
* peak extra memory: the largest resident set size (RSS, sampled every millisecond from /proc/self/statm by a
  thread) above the RSS just before the call. torch's CPU allocator returns large blocks to the OS, so RSS
  follows the tensors; tracemalloc would not see torch memory at all. On CUDA: the allocator's peak.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from typing import Any, Callable

import torch

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


def machine_state() -> dict:
    """CPU count, this process's CPU affinity, 1/5/15-min load average, torch threads and platform, now (stored with
    each run of a kernel benchmark, at its start and end)."""
    return {"cpu_count": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine()}


def timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, int, Any]:
    """(seconds, peak extra bytes, fn's result). CUDA: the queue is drained before and after (kernels run
    asynchronously) and the peak is torch's allocator peak above the memory held at entry; CPU: the peak RSS."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        return elapsed, torch.cuda.max_memory_allocated(device) - base, result
    with PeakRSS() as mem:
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
    return elapsed, mem.peak_extra, result
