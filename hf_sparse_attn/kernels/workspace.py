"""Reused scratch buffers, one set per thread, bounded in size and released on demand.

Large fresh allocations page-fault on every call on small CPU machines and cost more than the gathers they
feed, so the sorted-block kernels write their intermediates into buffers kept between calls. Those buffers
must never be shared by two calls running at once: each thread gets its own store (``threading.local``), so
two threads running patched models (or one model called from two threads) never write into each other's
buffers. Within one thread, calls run one after the other and each buffer name is used by one intermediate
of a call at a time.

Memory is bounded and released:

- a thread keeps at most :func:`workspace_limit` bytes (default 1 GiB, or ``HF_SPARSE_ATTN_WORKSPACE_MB``);
  a request that would go over it gets a fresh tensor that is not kept;
- a thread's store is freed when the thread ends (``threading.local``);
- :func:`clear_all_workspaces` frees the stores of every thread (``unpatch_model`` calls it). A call running
  in another thread at that moment keeps the views it already holds and is not disturbed; its next request
  allocates anew.

The stores of all threads are found through a registry that holds them weakly, so it never keeps a finished
thread's buffers alive.
"""

from __future__ import annotations

import os
import threading
import weakref

import torch

_DEFAULT_LIMIT_BYTES = 1 << 30


def _limit_from_env() -> int:
    text = os.environ.get("HF_SPARSE_ATTN_WORKSPACE_MB")
    if text is None or text.strip() == "":
        return _DEFAULT_LIMIT_BYTES
    try:
        mb = float(text)
    except ValueError:
        raise ValueError(f"HF_SPARSE_ATTN_WORKSPACE_MB must be a number of MiB >= 0, got {text!r}") from None
    if not mb >= 0:
        raise ValueError(f"HF_SPARSE_ATTN_WORKSPACE_MB must be a number of MiB >= 0, got {text!r}")
    return int(mb * 2**20)


class _ThreadStore:
    """The buffers of one thread: one flat tensor per (name, dtype, device)."""

    __slots__ = ("buffers", "lock", "__weakref__")

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}
        # Taken by the owning thread on every change and by clear_all_workspaces from other threads.
        self.lock = threading.Lock()

    def nbytes(self) -> int:
        with self.lock:
            return sum(b.numel() * b.element_size() for b in self.buffers.values())


_local = threading.local()
_all_stores: "weakref.WeakSet[_ThreadStore]" = weakref.WeakSet()
_registry_lock = threading.Lock()
_limit_bytes = _limit_from_env()


def _store() -> _ThreadStore:
    store = getattr(_local, "store", None)
    if store is None:
        store = _ThreadStore()
        _local.store = store
        with _registry_lock:
            _all_stores.add(store)
    return store


def workspace(name: str, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A buffer of ``shape`` with the dtype/device of ``like`` (contents undefined), reused by this thread.

    One flat buffer per (name, dtype, device) and thread, grown when a larger one is asked for and kept between
    calls. Only for intermediates that do not outlive the call and do not need autograd. When keeping the
    buffer would take this thread over :func:`workspace_limit` bytes, a fresh tensor is returned and not kept.
    """
    numel = 1
    for size in shape:
        numel *= int(size)
    store = _store()
    key = (name, like.dtype, like.device)
    buf = store.buffers.get(key)
    if buf is not None and buf.numel() >= numel:
        return buf[:numel].view(shape)
    with store.lock:
        old = store.buffers.pop(key, None)
        held = sum(b.numel() * b.element_size() for b in store.buffers.values())
        del old
        buf = torch.empty(numel, dtype=like.dtype, device=like.device)
        if held + buf.numel() * buf.element_size() <= _limit_bytes:
            store.buffers[key] = buf
    return buf.view(shape)


def workspace_bytes() -> int:
    """Bytes held by the reused buffers of the calling thread."""
    store = getattr(_local, "store", None)
    return 0 if store is None else store.nbytes()


def clear_workspace() -> None:
    """Free the calling thread's reused buffers (they are re-created on its next call)."""
    store = getattr(_local, "store", None)
    if store is not None:
        with store.lock:
            store.buffers.clear()


def all_workspace_bytes() -> int:
    """Bytes held by the reused buffers of every live thread."""
    with _registry_lock:
        stores = list(_all_stores)
    return sum(store.nbytes() for store in stores)


def clear_all_workspaces() -> None:
    """Free the reused buffers of every thread. Safe while other threads run calls (see the module docstring)."""
    with _registry_lock:
        stores = list(_all_stores)
    for store in stores:
        with store.lock:
            store.buffers.clear()


def workspace_limit() -> int:
    """The most bytes one thread keeps in reused buffers."""
    return _limit_bytes


def set_workspace_limit(max_bytes: int) -> int:
    """Set the most bytes one thread keeps (0 keeps nothing: every request allocates). Returns the old limit.

    Buffers already held over the new limit are freed in every thread.
    """
    global _limit_bytes
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"max_bytes must be an int >= 0 (bytes), got {max_bytes!r}")
    old, _limit_bytes = _limit_bytes, max_bytes
    with _registry_lock:
        stores = list(_all_stores)
    for store in stores:
        with store.lock:
            if sum(b.numel() * b.element_size() for b in store.buffers.values()) > max_bytes:
                store.buffers.clear()
    return old
