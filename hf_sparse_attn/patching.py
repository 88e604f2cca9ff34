"""patch_model / unpatch_model / patched: the one call of the plugin.

Everything that can fail (adapter lookup, method and parameter validation, plan checks, ranking) happens before
the model is touched; installing is undone if it fails half-way, and a model patched before is left as it was. A
patched model is never patched twice: a new patch replaces the old one.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional, Union

import torch

from .kernels.workspace import clear_all_workspaces
from .plan_file import install_save_hook
from .patches import LayerRuntime, find_adapter
from .patches.runtime import PatchState, install_runtimes, state_of as _state_of, uninstall_runtimes
from .plan import LayerPlan, PatchPlan, check_plan_matches, library_versions, model_fingerprint, now_iso
from .retrieval import retrieval_scores
from .row_sparsity import measured_sparsity_scores
from .selection import LayersArg, SelectArg, rank_layers, resolve_layers, selection_order
from .validation import PatchRequest, build_patch_request

def _install_runtimes(model, adapter, runtimes) -> PatchState:
    """Install the runtimes and the ``save_pretrained`` hook that writes the plan beside the weights."""
    state = install_runtimes(model, adapter, runtimes)
    if hasattr(model, "save_pretrained"):
        install_save_hook(model)
    return state


def _uninstall_runtimes(model, state: PatchState) -> None:
    """The runtimes only: the ``save_pretrained`` hook stays, so that saving the unpatched model removes a stale plan
    file of ours from the target folder (plan_file.py)."""
    uninstall_runtimes(model, state)


def _build_plan(model, request: PatchRequest) -> PatchPlan:
    """The plan of a new patch: rank the layers, order them by ``request.select``, take ``request.layers`` of them."""
    adapter = request.adapter
    measured = retrieval = None
    if request.select == "measured":  # calibration checked by the request
        measured = measured_sparsity_scores(model, request.calibration)
    elif request.select == "retrieval":
        retrieval = retrieval_scores(model, request.calibration)
    ranking = rank_layers(model, norm=request.norm, adapter=adapter)
    order = selection_order(ranking, request.select, seed=request.seed, measured_scores=measured,
                            retrieval_scores=retrieval)
    chosen = set(resolve_layers(request.layers, order, len(ranking)))
    rank_of = {layer: r for r, layer in enumerate(order)}
    method, params, select = request.method, request.params, request.select
    other = request.other  # the layers not chosen: another method, or the model's own attention (method None)

    def layer_plan(i: int) -> LayerPlan:
        if i in chosen:
            runs, runs_params, decode, decode_params = method, params, request.decode_method, request.decode_params
        else:
            runs, runs_params, decode, decode_params = other.method, other.params, other.decode_method, \
                other.decode_params
        return LayerPlan(
            layer_idx=i, weight_norm=ranking.weight_norms[i], rank=rank_of[i],
            method=runs, params=dict(runs_params) if runs else {}, head_weight_norms=ranking.head_weight_norms[i],
            decode_method=decode if runs else None, decode_params=dict(decode_params) if runs else {},
        )

    layer_plans = [layer_plan(i) for i in range(len(ranking))]
    if other.method is not None and len(chosen) < len(ranking):
        method = None  # a mixed plan: each layer says what it runs (PatchPlan.methods)
    select_name = select if isinstance(select, str) else ("callable" if callable(select) else "explicit")
    if not isinstance(request.layers, (int, float, str)):
        select_name = "explicit"
    return PatchPlan(
        method=method, select=select_name, layers=layer_plans, seed=request.seed, norm=request.norm,
        model_fingerprint=model_fingerprint(model, adapter), model_class=type(model).__name__, adapter=adapter.name,
        versions=library_versions(), created=now_iso(),
    )


def _applied_plan(model, request: PatchRequest) -> PatchPlan:
    """The request's plan to re-apply, checked against the model, its counters reset."""
    new_plan = request.plan
    check_plan_matches(new_plan, model_fingerprint(model, request.adapter), request.num_layers, type(model).__name__,
                       strict=request.strict, source=request.plan_source)
    new_plan.reset_counts()
    return new_plan


def patch_model(
    model: torch.nn.Module,
    method: str = "exact",
    layers: LayersArg = 0.5,
    select: SelectArg = "weight_norm",
    *,
    plan: Union[None, PatchPlan, str, os.PathLike] = None,
    seed: int = 0,
    norm: str = "spectral",
    calibration: Any = None,
    adapter_options: Optional[dict[str, Any]] = None,
    strict: bool = True,
    decode_method: Optional[str] = "exact",
    decode_params: Optional[dict[str, Any]] = None,
    other_layers: Optional[dict[str, Any]] = None,
    **method_params: Any,
) -> PatchPlan:
    """Run ``method`` in the chosen attention layers of ``model``; return the :class:`PatchPlan`.

    layers: a count (int), a fraction of the layers (float), "all", or a list of layer indices.
    select: the order layers are chosen in — "weight_norm" (largest Q/K weight norm R first; "Attention is Naturally Sparse" §5.1),
        "last", "first", "even", "odd", "random" (with ``seed``), "measured" (most k-sparse first on ``calibration``
        input ids), "retrieval" (least needle attention first on ``calibration=retrieval_probe(tokenizer)``), a list,
        or a callable taking the :class:`LayerRanking`.
    plan: a PatchPlan or a path to its JSON: re-apply it; method/layers/select are then ignored. It must fit the model:
        same architecture, layer count, head layout and Q/K weights (whatever the dtype or run-time config fields);
        layers are matched by ``layer_idx``. A misfit is an error naming what differs; ``strict=False`` applies it
        with a warning (a layer index the model lacks is an error either way).
    seed: drives the hashing and sampling of every layer (per layer: seed and layer index).
    method_params: the method's parameters (``hf_sparse_attn.list_methods()``; errors name the valid ones).
    adapter_options: e.g. ``{"chatglm_layout": "batch_first"}``.
    decode_method: what the chosen layers run for the calls against a KV cache (decode steps of ``generate()``, a
        prompt fed in chunks): "exact" (grouped attention over the cache, one fused call; the default), "local"
        (sinks + window), "lsh" (sinks + window + the keys an LSH index finds, needs a
        :class:`~hf_sparse_attn.GrowingCache`), any name of ``hf_sparse_attn.list_decode_methods()``, or None (the
        model's own attention, counted as a fallback). decode_params: its parameters (docs/methods/decode.md).
    other_layers: what the layers that ``layers`` does not choose run, as ``{"method": NAME, **its parameters}``,
        e.g. ``{"method": "local", "window": 512}`` (default None: the model's own attention). They run the same
        decode method unless the dict has its own ``"decode_method"`` (and ``"decode_params"``), e.g.
        ``{"method": "block_select", "decode_method": "local"}`` beside ``decode_method="exact"``: exact decode on
        the chosen layers, sinks + window on the others. The plan is then mixed (``plan.method`` None,
        ``plan.methods`` lists both).
    """
    request = build_patch_request(model, method, layers, select, plan=plan, seed=seed, norm=norm,
                                  calibration=calibration, adapter_options=adapter_options, strict=strict,
                                  method_params=method_params, decode_method=decode_method,
                                  decode_params=decode_params, other_layers=other_layers)
    new_plan = _applied_plan(model, request) if request.plan is not None else _build_plan(model, request)
    adapter, num_layers = request.adapter, request.num_layers
    by_index = {layer.layer_idx: layer for layer in new_plan.layers}  # adapters install runtimes in layer order
    runtimes = [LayerRuntime(i, by_index[i].method, by_index[i].params, new_plan.seed, by_index[i],
                             decode_method=by_index[i].decode_method, decode_params=by_index[i].decode_params)
                for i in range(num_layers)]

    old_state = _state_of(model)
    if old_state is not None:
        _uninstall_runtimes(model, old_state)
    try:
        state = _install_runtimes(model, adapter, runtimes)
    except Exception:
        if old_state is not None:  # leave the model exactly as it was: patched with its previous plan
            _install_runtimes(model, old_state.adapter, old_state.runtimes).plan = old_state.plan
        raise
    state.plan = new_plan
    state.adapter_options = request.adapter_options
    return new_plan


def unpatch_model(model: torch.nn.Module) -> Optional[PatchPlan]:
    """Put back the model's own attention in every layer (outputs bit-identical to before patching).
    Returns the plan that was in force (with its run-time counters), or None if the model was not patched.
    ``model.save_pretrained`` stays hooked: an unpatched save removes a stale ``hf_sparse_attn_plan.json`` of ours
    from the folder it writes to (so the checkpoint reloads unpatched)."""
    state = _state_of(model)
    if state is None:
        return None
    _uninstall_runtimes(model, state)
    clear_all_workspaces()  # the reused kernel buffers of every thread (re-created by the next call)
    return state.plan


def current_plan(model: torch.nn.Module) -> Optional[PatchPlan]:
    """The plan in force on ``model``, or None."""
    state = _state_of(model)
    return None if state is None else state.plan


def generation_cache(model: torch.nn.Module) -> Optional[Any]:
    """The KV cache ``model.generate`` should use for the plan in force: a :class:`~hf_sparse_attn.GrowingCache` when a
    patched layer has a decode method (``lsh`` and ``quest`` keep their index on it and serve no other cache; for
    every decode method it appends without copying the cache: 1.20x faster decode steps than ``DynamicCache`` on
    SmolLM2 at 8k, eval/results/decode_cache_smollm2/results.md), else None (the model's default cache serves; also
    for a model that keeps its own cache, as ChatGLM's remote code does).
    Pass it as ``model.generate(..., past_key_values=cache)``; a cache is for one generation."""
    from .patches import find_adapter
    from .patches.decode_cache import GrowingCache

    plan = current_plan(model)
    if plan is None or not plan.decode_methods:
        return None
    if not getattr(find_adapter(model), "uses_transformers_cache", False):
        return None  # the model keeps its own cache (e.g. ChatGLM's remote code)
    return GrowingCache(getattr(model, "config", None))


@contextlib.contextmanager
def patched(model: torch.nn.Module, method: str = "exact", layers: LayersArg = 0.5, select: SelectArg = "weight_norm",
            **kwargs: Any) -> Iterator[PatchPlan]:
    """``with patched(model, method="hyper", layers=[3, 5]) as plan: ...`` — patched inside the block, and on exit
    the model is as before the block (unpatched, or patched with its earlier plan)."""
    earlier = current_plan(model)
    earlier_options = _state_of(model).adapter_options if earlier is not None else None
    plan = patch_model(model, method, layers, select, **kwargs)
    try:
        yield plan
    finally:
        unpatch_model(model)
        if earlier is not None:
            counts = [(l.served, dict(l.fallbacks), l.decode_served, dict(l.decode_fallbacks)) for l in earlier.layers]
            earlier = PatchPlan.from_dict(earlier.to_dict())
            # the plan was in force on this very model: it fits the weights as they are now (trained in the block or not)
            earlier.model_fingerprint = model_fingerprint(model, find_adapter(model, earlier_options))
            restored = patch_model(model, plan=earlier, adapter_options=earlier_options)
            for layer, (served, fallbacks, decode_served, decode_fallbacks) in zip(restored.layers, counts):
                layer.served, layer.fallbacks = served, fallbacks
                layer.decode_served, layer.decode_fallbacks = decode_served, decode_fallbacks
