"""lm-evaluation-harness integration: the model type ``hf-sparse``, a patched Hugging Face model.

Importing this module registers ``hf-sparse`` with lm-eval's model registry (lm-eval has no plugin entry points,
so ``hf-sparse-attn lm-eval ...`` imports it and then runs lm-eval's own command line). Install with
``pip install "hf_sparse_attn[lm_eval]"``.

``--model_args`` take everything lm-eval's ``hf`` model takes (``pretrained=PATH``, ``dtype=``, ``batch_size`` ...)
plus either

- ``plan=PLAN.json``: re-apply a saved plan (``strict=false`` applies one made for other weights, with a warning);
- or ``method=NAME`` with ``layers=`` (a count, a fraction, ``all``, or indices separated by ``;``), ``select=``,
  ``seed=``, ``norm=`` and the method's own parameters (``block_size=256``, ...);
- or neither: the plan saved in the checkpoint (``hf_sparse_attn_plan.json``), if there is one; otherwise the
  model runs unpatched, with a warning.

The plan in force, with how many calls each layer served and why calls fell back, goes into the results'
``config`` (``hf_sparse_attn_plan``) and the log.

    lm_eval --model hf-sparse --model_args pretrained=DIR,method=sparse_hyper,layers=0.5,block_size=256 --tasks ...
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from typing import Any, Optional, Sequence, Union

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .plan_file import find_plan_file
from .methods.registry import get_spec, list_methods
from .patching import current_plan, patch_model
from .plan import PatchPlan

logger = logging.getLogger("hf_sparse_attn")

MODEL_TYPE = "hf-sparse"
_HFLM_ARGUMENTS = set(inspect.signature(HFLM.__init__).parameters)


def parse_layers(layers: Any) -> Any:
    """lm-eval splits model_args on commas, so a list of layers is written with ';': "3;5;7" -> [3, 5, 7]."""
    if isinstance(layers, str) and layers != "all":
        parts = [p for p in layers.replace(" ", ";").split(";") if p]
        try:
            return [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"layers={layers!r}: give a count, a fraction, 'all', or layer indices separated by ';'") from None
    return layers


@register_model(MODEL_TYPE)
class SparseHFLM(HFLM):
    """lm-eval's ``HFLM`` with the attention of chosen layers replaced by a hf_sparse_attn method."""

    def __init__(
        self,
        pretrained: Any,
        plan: Optional[Union[str, os.PathLike, PatchPlan]] = None,
        method: Optional[str] = None,
        layers: Any = 0.5,
        select: str = "weight_norm",
        seed: int = 0,
        norm: str = "spectral",
        strict: bool = True,
        **kwargs: Any,
    ) -> None:
        method_params: dict[str, Any] = {}
        if method is not None and not isinstance(method, str):
            raise ValueError(f"hf-sparse: method={method!r} must be a method name, one of {', '.join(list_methods())}")
        # names of some method's parameter that are not lm-eval's own (lm-eval's hf model has e.g. delta= too)
        all_params = {name for m in list_methods() for name in get_spec(m).params} - _HFLM_ARGUMENTS
        if method is not None:
            names = set(get_spec(method).params)
            method_params = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            foreign = sorted(k for k in kwargs if k in all_params)
            if foreign:
                raise ValueError(f"hf-sparse: method {method!r} has no parameter {', '.join(foreign)}; its parameters "
                                 f"are: {', '.join(sorted(names)) or '(none)'}")
        else:
            leftover = sorted(k for k in kwargs if k in all_params)
            if leftover:
                if plan is not None:
                    raise ValueError(f"hf-sparse: method parameter(s) {', '.join(leftover)} given with plan=: the plan "
                                     "holds each layer's parameters; drop them, or give method=NAME instead of plan=")
                raise ValueError(f"hf-sparse: method parameter(s) {', '.join(leftover)} given without method=NAME; add "
                                 f"method=NAME (one of {', '.join(list_methods())}) or drop them")
        try:
            super().__init__(pretrained, **kwargs)
        except TypeError as err:
            if "unexpected keyword argument" not in str(err):
                raise
            valid = sorted(get_spec(method).params) if method is not None else []
            raise ValueError(f"hf-sparse: a model argument is unknown to lm-eval's hf model, to transformers and to "
                             f"hf_sparse_attn ({err}). hf-sparse takes lm-eval's hf arguments plus plan=, method=, "
                             f"layers=, select=, seed=, norm=, strict="
                             + (f" and the parameters of {method!r}: {', '.join(valid)}" if method is not None else "")
                             ) from None
        model = self._model
        if plan is not None:
            if method is not None:
                raise ValueError("give either plan=PATH or method=NAME, not both (a plan holds each layer's method)")
            self.plan = patch_model(model, plan=plan, strict=strict)
        elif method is not None:
            self.plan = patch_model(model, method=method, layers=parse_layers(layers), select=select, seed=seed,
                                    norm=norm, **method_params)
        else:
            where = {k: v for k, v in kwargs.items() if k in ("subfolder", "revision") and v}
            saved = find_plan_file(pretrained, **where) if isinstance(pretrained, (str, os.PathLike)) else None
            if saved is not None:
                self.plan = patch_model(model, plan=saved, strict=strict)
            else:
                self.plan = current_plan(model)
                if self.plan is None:
                    logger.warning("hf-sparse: no plan=, no method= and no saved plan: the model runs unpatched")
        if self.plan is not None:
            logger.info("hf-sparse: patched %s\n%s", type(model).__name__, self.plan)

    def get_model_info(self) -> dict:
        """lm-eval's model info plus the plan in force, with its run-time counters (served, fallbacks)."""
        info = super().get_model_info()
        plan = current_plan(self._model)
        if plan is not None:
            info["hf_sparse_attn_plan"] = plan.to_dict()
            info["hf_sparse_attn_served"] = sum(layer.served for layer in plan.layers)
            info["hf_sparse_attn_fallbacks"] = plan.fallback_counts()
            logger.info("hf-sparse: plan after the run\n%s", plan)
        return info


def main(argv: Optional[Sequence[str]] = None) -> int:
    """lm-eval's own command line (``lm_eval ...``) with ``hf-sparse`` registered."""
    from lm_eval.__main__ import cli_evaluate

    saved_argv = sys.argv
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    except SystemExit as stop:
        return int(stop.code or 0) if not isinstance(stop.code, str) else 1
    finally:
        sys.argv = saved_argv
    return 0
