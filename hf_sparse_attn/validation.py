"""Checks of every ``patch_model`` argument, run before the model is read or touched.

Each bad value raises a ``ValueError`` (``TypeError`` for a model that is no ``torch.nn.Module``) whose message
names the argument, the value given and the values that are valid, so that a mistake is found at the call and
never as an unrelated error in the middle of a forward pass.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Optional

import torch

SEED_MAX = 2**32 - 1  # per-layer generator seeds are seed * 1_000_003 + layer_idx: must stay within int64


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def check_seed(seed: Any, name: str = "seed") -> int:
    """``seed``: an int in 0..2**32 - 1 (bools, floats, strings and None are refused). Returns it as an int."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"{name} must be an int in 0..{SEED_MAX}, got {_describe(seed)}")
    seed = int(seed)
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{name}={seed} is out of range: it must be an int in 0..{SEED_MAX}")
    return seed


def check_layers(layers: Any, num_layers: int) -> None:
    """``layers``: "all", an int count in 0..num_layers, a float fraction in (0, 1], or a list/tuple/range of
    distinct int layer indices in 0..num_layers - 1."""
    valid = (f"'all', an int count in 0..{num_layers}, a float fraction in (0, 1], or a list of distinct layer "
             f"indices in 0..{num_layers - 1}")
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be {valid}; got {_describe(layers)}")
        return
    if isinstance(layers, bool) or layers is None:
        raise ValueError(f"layers must be {valid}; got {_describe(layers)}")
    if isinstance(layers, numbers.Integral):
        if not 0 <= int(layers) <= num_layers:
            raise ValueError(f"layers={int(layers)} is not a layer count: the model has {num_layers} attention layers; "
                             f"layers must be {valid}")
        return
    if isinstance(layers, numbers.Real):
        value = float(layers)
        if not (math.isfinite(value) and 0.0 < value <= 1.0):
            raise ValueError(f"layers={layers!r} as a fraction must be in (0, 1] (use layers=0 for no layer); "
                             f"layers must be {valid}")
        if round(value * num_layers) == 0:  # selection.resolve_layers takes round(fraction * num_layers) layers
            smallest = 1 / num_layers if num_layers else 1.0
            raise ValueError(f"layers={layers!r} selects no layer: round({value:g} x {num_layers} layers) = 0. Pass a "
                             f"fraction of at least {smallest:.4g} (one layer), a count such as layers=1, or layers=0 "
                             f"to patch no layer on purpose")
        return
    if not isinstance(layers, (list, tuple, range)):
        raise ValueError(f"layers must be {valid}; got {_describe(layers)}")
    bad_type = [x for x in layers if isinstance(x, bool) or not isinstance(x, numbers.Integral)]
    if bad_type:
        raise ValueError(f"layer indices must be ints; got {bad_type[:5]!r} in layers. layers must be {valid}")
    indices = [int(x) for x in layers]
    outside = [i for i in indices if not 0 <= i < num_layers]
    if outside:
        raise ValueError(f"layer indices {outside[:10]} are outside 0..{num_layers - 1} (the model has {num_layers} "
                         f"attention layers)")
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise ValueError(f"layer indices {duplicates} appear more than once in layers; list each layer once")


def check_select(select: Any, num_layers: int, calibration: Any, vocab_size: Optional[int] = None) -> None:
    """``select``: a preset name, a list holding every layer index once (the order layers are chosen in), or a
    callable taking the ranking. ``calibration`` is needed by, and only used by, select="measured"."""
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
    elif calibration is not None:
        raise ValueError("calibration= is used only by select='measured'; pass select='measured' or drop calibration")


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


def check_patch_arguments(model: Any, method: Any, layers: Any, select: Any, *, plan: Any, seed: Any, norm: Any,
                          calibration: Any, adapter_options: Any, method_params: dict[str, Any]) -> None:
    """Every argument of ``patch_model`` (see its docstring), checked before the model is read or changed.

    Raises ValueError naming the argument and its valid values (TypeError when ``model`` is not a module or no
    adapter recognizes it).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch_model needs a torch.nn.Module (a loaded transformers model); got {_describe(model)}")
    check_adapter_options(adapter_options)
    check_plan(plan)
    from .methods.registry import get_spec
    from .patches import find_adapter

    adapter = find_adapter(model, adapter_options)  # reads the module tree only
    num_layers = len(adapter.attention_layers(model))
    if plan is not None:
        from .plan import PatchPlan

        from .plan import PlanError

        source = "the plan" if isinstance(plan, PatchPlan) else f"plan file {os.fspath(plan)}"
        loaded = plan if isinstance(plan, PatchPlan) else PatchPlan.load(plan)
        check_seed(loaded.seed, "plan seed")
        for layer in loaded.layers:
            if layer.method is not None:
                try:
                    get_spec(layer.method).resolve_params(layer.params)
                except ValueError as err:  # unknown method, unknown parameter, value out of range
                    raise PlanError(f"{source}: layer {layer.layer_idx}: {err}. Fix the plan file or rebuild it with "
                                    "patch_model(model, method=..., layers=...)") from None
        return
    if not isinstance(method, str):
        raise ValueError(f"method must be a method name (a string); got {_describe(method)}")
    get_spec(method).resolve_params(method_params)  # unknown names, types and ranges (registry.Param)
    check_seed(seed)
    check_norm(norm)
    check_layers(layers, num_layers)
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    check_select(select, num_layers, calibration, vocab_size if isinstance(vocab_size, int) else None)
