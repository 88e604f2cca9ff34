"""Which runtimes are installed on a model: the per-model patch state, kept in the model's ``__dict__``.

``install_runtimes`` routes every attention layer of ``model`` through its :class:`~hf_sparse_attn.patches.base.LayerRuntime`
(through the adapter) and records what ``uninstall_runtimes`` needs to undo it exactly. The public API
(:func:`hf_sparse_attn.patch_model`) and :func:`hf_sparse_attn.patches.capture_attention` both build on these; they
live here, in the adapter layer, so that adapters never import the API above them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from .base import LayerRuntime

STATE_ATTR = "_hf_sparse_attn_state"


@dataclasses.dataclass
class PatchState:
    """What is installed on one model: the adapter, the token its ``uninstall`` needs, one runtime per attention
    layer (index = layer_idx), the plan in force (None for a temporary install) and the adapter options used."""

    adapter: Any
    token: Any
    runtimes: list[LayerRuntime]
    plan: Optional[Any] = None  # a plan.PatchPlan
    adapter_options: dict[str, Any] = dataclasses.field(default_factory=dict)


def state_of(model: torch.nn.Module) -> Optional[PatchState]:
    """The patch state of ``model``, or None when nothing is installed."""
    return model.__dict__.get(STATE_ATTR)


def install_runtimes(model: torch.nn.Module, adapter: Any, runtimes: list[LayerRuntime]) -> PatchState:
    """Route each attention layer of ``model`` through ``runtimes[i]`` and record the state on the model."""
    token = adapter.install(model, runtimes)
    state = PatchState(adapter, token, runtimes)
    model.__dict__[STATE_ATTR] = state
    return state


def uninstall_runtimes(model: torch.nn.Module, state: PatchState) -> None:
    """Undo :func:`install_runtimes` exactly."""
    state.adapter.uninstall(model, state.token)
    model.__dict__.pop(STATE_ATTR, None)
