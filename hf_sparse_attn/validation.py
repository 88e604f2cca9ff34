"""Checks of every ``patch_model`` argument, run before the model is touched, and the :class:`PatchRequest` they
resolve the arguments into, once: the adapter that recognizes the model, the plan file read, the method's
parameters filled in and validated. ``patch_model`` builds its plan from the request alone.

Each bad value raises a ``ValueError`` (``TypeError`` for a model that is no ``torch.nn.Module``) whose message
names the argument, the value given and the values that are valid, so that a mistake is found at the call and
never as an unrelated error in the middle of a forward pass.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Any, Optional

import torch

from .selection import SEED_MAX, LayersArg, SelectArg, check_layers, check_seed, describe_value as _describe  # noqa: F401

def check_select(select: Any, num_layers: int, calibration: Any, vocab_size: Optional[int] = None) -> None:
    """``select``: a preset name, a list holding every layer index once (the order layers are chosen in), or a
    callable taking the ranking. ``calibration`` is needed by, and only used by, select="measured" (input ids) and
    select="retrieval" (a :class:`hf_sparse_attn.retrieval.RetrievalProbe`)."""
    from .selection import SELECT_PRESETS

    valid = f"one of {list(SELECT_PRESETS)}, a list of every layer index 0..{num_layers - 1} in the order of choice, or a callable"
    if isinstance(select, str):
        if select not in SELECT_PRESETS:
            raise ValueError(f"unknown select {select!r}; select must be {valid}")
    elif callable(select):
        pass
    elif isinstance(select, (list, tuple, range)):
        bad_type = [x for x in select if isinstance(x, bool) or not isinstance(x, numbers.Integral)]
        if bad_type:
            raise ValueError(f"select as a list must hold int layer indices; got {bad_type[:5]!r}. select must be {valid}")
        order = [int(x) for x in select]
        if sorted(order) != list(range(num_layers)):
            raise ValueError(f"select as a list must hold every layer index 0..{num_layers - 1} exactly once (the order "
                             f"layers are chosen in); got {order[:20]}. To choose layers directly, pass layers=[...]")
    else:
        raise ValueError(f"select must be {valid}; got {_describe(select)}")
    if select == "measured":
        check_calibration(calibration, vocab_size)
    elif select == "retrieval":
        from .retrieval import RetrievalProbe

        if not isinstance(calibration, RetrievalProbe):
            raise ValueError("select='retrieval' needs calibration=hf_sparse_attn.retrieval_probe(tokenizer) (a "
                             f"RetrievalProbe of pass-key prompts); got {_describe(calibration)}")
        check_calibration(calibration.input_ids, vocab_size)
    elif calibration is not None:
        raise ValueError("calibration= is used only by select='measured' (input ids) and select='retrieval' (a "
                         "retrieval probe); pass one of those or drop calibration")


def check_calibration(calibration: Any, vocab_size: Optional[int] = None) -> None:
    """``calibration``: input ids, an int tensor [batch, seq_len] with batch, seq_len >= 1 (ids < vocab_size)."""
    if calibration is None:
        raise ValueError("select='measured' needs calibration=input_ids (an int tensor [batch, seq_len] of real text) "
                         "to measure sparsity on")
    if not isinstance(calibration, torch.Tensor):
        raise ValueError(f"calibration must be a torch.Tensor of input ids [batch, seq_len]; got {_describe(calibration)}")
    if calibration.dtype.is_floating_point or calibration.dtype.is_complex or calibration.dtype == torch.bool:
        raise ValueError(f"calibration must hold integer token ids (torch.long); got dtype {calibration.dtype}")
    if calibration.dim() != 2 or calibration.shape[0] < 1 or calibration.shape[1] < 1:
        raise ValueError(f"calibration must be input ids of shape [batch, seq_len] with batch, seq_len >= 1; got shape "
                         f"{list(calibration.shape)}")
    low, high = int(calibration.min()), int(calibration.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        bound = f"0..{vocab_size - 1}" if vocab_size is not None else ">= 0"
        raise ValueError(f"calibration token ids must be in {bound}; got ids in {low}..{high}")


def check_norm(norm: Any) -> None:
    from .selection import NORMS

    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {_describe(norm)}")


def check_adapter_options(adapter_options: Any) -> None:
    """``adapter_options``: None or a dict with string keys (the names and values are checked by the adapters)."""
    if adapter_options is None:
        return
    if not isinstance(adapter_options, dict):
        raise ValueError(f"adapter_options must be a dict such as {{'chatglm_layout': 'batch_first'}} or None; got "
                         f"{_describe(adapter_options)}")
    bad = [k for k in adapter_options if not isinstance(k, str)]
    if bad:
        raise ValueError(f"adapter_options keys must be option names (strings); got {bad!r}")


def check_plan(plan: Any) -> None:
    from .plan import PatchPlan

    if plan is None or isinstance(plan, PatchPlan):
        return
    if not isinstance(plan, (str, os.PathLike)):
        raise ValueError(f"plan must be a PatchPlan, a path to its JSON file, or None; got {_describe(plan)}")
    if not os.path.isfile(plan):
        raise ValueError(f"plan file {os.fspath(plan)!r} does not exist (save one with plan.save(path))")


@dataclasses.dataclass
class OtherLayers:
    """What the layers that ``layers`` does not choose run (``patch_model(other_layers=...)``): ``method`` None keeps
    the model's own attention there; else its resolved ``params`` and the decode method with its resolved parameters
    (the chosen layers' by default)."""

    method: Optional[str] = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    decode_method: Optional[str] = None
    decode_params: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PatchRequest:
    """``patch_model``'s arguments, checked and resolved once (:func:`build_patch_request`); the plan is built from
    it and from nothing else.

    Either a plan to re-apply (``plan`` set: a private copy of the given plan or of the file, every layer's
    parameters resolved, ``plan_source`` naming it in errors) or a new one (``method`` and its resolved ``params``,
    ``layers`` as a plain int / float / "all" / list, ``select``, ``norm``, ``calibration`` for select="measured",
    ``decode_method`` and its resolved ``decode_params`` for the chosen layers' calls against a KV cache,
    ``other``: what the layers not chosen run).
    """

    adapter: Any  # the patches.base.Adapter that recognized the model
    num_layers: int
    seed: int
    strict: bool = True
    adapter_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    plan: Any = None  # a plan.PatchPlan to re-apply, or None
    plan_source: str = ""
    method: Optional[str] = None
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    layers: LayersArg = 0.5
    select: SelectArg = "weight_norm"
    norm: str = "spectral"
    calibration: Any = None  # input ids (select="measured") or a RetrievalProbe (select="retrieval")
    decode_method: Optional[str] = None
    decode_params: dict[str, Any] = dataclasses.field(default_factory=dict)
    other: OtherLayers = dataclasses.field(default_factory=lambda: OtherLayers())  # the layers not chosen


def _plain_number(value: Any) -> Any:
    """A numpy (or other numbers.Integral / numbers.Real) scalar as the Python int or float it stands for."""
    if isinstance(value, bool) or isinstance(value, (int, float, str)) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def _plan_to_apply(plan: Any) -> tuple[Any, str]:
    """A private copy of ``plan`` (a PatchPlan or the path of its JSON, read once) with every layer's parameters
    resolved, and the words that name it in errors. Raises PlanError for a plan whose values are not valid."""
    from .methods.registry import get_spec
    from .plan import PatchPlan, PlanError

    source = "the plan" if isinstance(plan, PatchPlan) else f"plan file {os.fspath(plan)}"
    loaded = plan if isinstance(plan, PatchPlan) else PatchPlan.load(plan)
    copy = PatchPlan.from_dict(loaded.to_dict(), source=source)  # our own copy (by layer_idx)
    check_seed(copy.seed, "plan seed")
    from .methods.decode import get_decode_spec

    for layer in copy.layers:
        try:
            if layer.method is not None:
                layer.params = get_spec(layer.method).resolve_params(layer.params)
            if layer.decode_method is not None:
                layer.decode_params = get_decode_spec(layer.decode_method).resolve_params(layer.decode_params)
            elif layer.decode_params:
                raise ValueError(f"decode_params {layer.decode_params} without a decode_method")
        except ValueError as err:  # unknown method, unknown parameter, value out of range
            raise PlanError(f"{source}: layer {layer.layer_idx}: {err}. Fix the plan file or rebuild it with "
                            "patch_model(model, method=..., layers=...)") from None
    return copy, source


def check_decode(decode_method: Any, decode_params: Any) -> dict[str, Any]:
    """``decode_method``: a decode method name (``hf_sparse_attn.list_decode_methods()``) or None (decode steps run
    the model's own attention); ``decode_params``: None or a dict of that method's parameters. Returns the parameters
    filled in and validated."""
    from .methods.decode import get_decode_spec, list_decode_methods

    if decode_params is not None and not isinstance(decode_params, dict):
        raise ValueError(f"decode_params must be a dict of the decode method's parameters or None; got "
                         f"{_describe(decode_params)}")
    if decode_method is None:
        if decode_params:
            raise ValueError("decode_params given without a decode_method; pass decode_method= one of "
                             f"{list_decode_methods()}")
        return {}
    if not isinstance(decode_method, str):
        raise ValueError(f"decode_method must be a decode method name (one of {list_decode_methods()}) or None; got "
                         f"{_describe(decode_method)}")
    return get_decode_spec(decode_method).resolve_params(dict(decode_params or {}))


def check_other_layers(other_layers: Any, decode_method: Optional[str] = None,
                       decode_params: Optional[dict[str, Any]] = None) -> OtherLayers:
    """``other_layers``: None (the layers ``layers`` does not choose keep the model's own attention) or a dict
    ``{"method": NAME, **params}`` they run instead, optionally with ``"decode_method"`` / ``"decode_params"`` keys of
    their own (default: ``decode_method`` / ``decode_params``, the chosen layers' decode, already resolved by
    :func:`check_decode`). Returns what they
    run, every value filled in and validated."""
    from .methods.registry import get_spec, list_methods

    if other_layers is None:
        return OtherLayers()
    example = "e.g. other_layers={'method': 'local', 'window': 512}"
    if not isinstance(other_layers, dict):
        raise ValueError(f"other_layers must be a dict with a 'method' and that method's parameters ({example}) or "
                         f"None; got {_describe(other_layers)}")
    params = dict(other_layers)
    method = params.pop("method", None)
    if not isinstance(method, str):
        raise ValueError(f"other_layers needs a 'method' (one of {', '.join(list_methods())}), {example}; got "
                         f"{_describe(method)}")
    if "decode_params" in params and "decode_method" not in params:
        raise ValueError("other_layers: 'decode_params' needs a 'decode_method' beside it, e.g. other_layers="
                         "{'method': 'block_select', 'decode_method': 'local', 'decode_params': {'window': 1024}}")
    own_decode = "decode_method" in params
    other_decode, other_decode_params = params.pop("decode_method", None), params.pop("decode_params", None)
    try:
        resolved = get_spec(method).resolve_params(params)
        if not own_decode:  # the chosen layers' decode, already resolved by the caller
            return OtherLayers(method, resolved, decode_method, dict(decode_params or {}))
        return OtherLayers(method, resolved, other_decode, check_decode(other_decode, other_decode_params))
    except ValueError as err:
        raise ValueError(f"other_layers: {err}") from None


def build_patch_request(
    model: Any,
    method: Any = "exact",
    layers: Any = 0.5,
    select: Any = "weight_norm",
    *,
    plan: Any = None,
    seed: Any = 0,
    norm: Any = "spectral",
    calibration: Any = None,
    adapter_options: Any = None,
    strict: bool = True,
    method_params: Optional[dict[str, Any]] = None,
    decode_method: Any = "exact",
    decode_params: Any = None,
    other_layers: Any = None,
) -> PatchRequest:
    """Every argument of ``patch_model`` (see its docstring), checked before the model is changed, and resolved once:
    the adapter found, a plan file read, the method's parameters filled in and validated.

    Raises ValueError naming the argument and its valid values (TypeError when ``model`` is not a module or no
    adapter recognizes it; PlanError for a plan whose values are not valid).
    """
    method_params = dict(method_params or {})
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch_model needs a torch.nn.Module (a loaded transformers model); got {_describe(model)}")
    check_adapter_options(adapter_options)
    check_plan(plan)
    from .methods.registry import get_spec
    from .patches import find_adapter

    adapter = find_adapter(model, adapter_options)  # reads the module tree only
    num_layers = len(adapter.attention_layers(model))
    options = dict(adapter_options or {})
    if plan is not None:
        if method_params or decode_params or other_layers is not None:
            raise ValueError("pass either plan= or method parameters (other_layers included), not both: the plan "
                             "holds each layer's method and parameters")
        copy, source = _plan_to_apply(plan)
        return PatchRequest(adapter=adapter, num_layers=num_layers, seed=copy.seed, strict=strict,
                            adapter_options=options, plan=copy, plan_source=source)
    if not isinstance(method, str):
        raise ValueError(f"method must be a method name (a string); got {_describe(method)}")
    params = get_spec(method).resolve_params(method_params)  # unknown names, types and ranges (registry.Param)
    decode_params = check_decode(decode_method, decode_params)
    other = check_other_layers(other_layers, decode_method, decode_params)
    seed = check_seed(seed)
    check_norm(norm)
    layers = _plain_number(layers)  # numpy.int64(1) is the count 1, numpy.float64(0.5) the fraction 0.5
    check_layers(layers, num_layers)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    check_select(select, num_layers, calibration, vocab_size if isinstance(vocab_size, int) else None)
    return PatchRequest(adapter=adapter, num_layers=num_layers, seed=seed, strict=strict, adapter_options=options,
                        method=method, params=params, layers=layers, select=select, norm=norm, calibration=calibration,
                        decode_method=decode_method, decode_params=decode_params, other=other)
