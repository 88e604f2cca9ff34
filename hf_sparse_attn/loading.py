"""Loading a checkpoint with its plan: :func:`from_pretrained` loads the weights and re-applies the plan saved beside
them by ``save_pretrained`` of a patched model (the plan file and the hook that writes it: :mod:`hf_sparse_attn.plan_file`).
"""

from __future__ import annotations

import os
from typing import Any, Union

from .patching import patch_model
from .plan_file import PLAN_FILE_NAME, find_plan_file, logger


def from_pretrained(path: Union[str, os.PathLike], auto_class: Any = None, *, strict: bool = True, **kwargs: Any):
    """Load a checkpoint with ``auto_class.from_pretrained(path, **kwargs)`` (default ``AutoModelForCausalLM``) and
    re-apply the plan saved beside it (``hf_sparse_attn_plan.json``). Any ``dtype``, ``device_map`` or other
    argument of ``from_pretrained`` is passed through; the plan fits whatever the dtype (see
    :func:`hf_sparse_attn.plan.model_fingerprint`). A checkpoint without a plan loads unpatched, with a warning
    on the ``hf_sparse_attn`` logger. ``strict=False``: a plan made for other weights is applied with a warning.
    """
    if auto_class is None:
        from transformers import AutoModelForCausalLM as auto_class
    model = auto_class.from_pretrained(path, **kwargs)
    plan_file = find_plan_file(path, **kwargs)
    if plan_file is None:
        logger.warning("hf_sparse_attn: %s has no %s: the model is loaded unpatched (save a patched model with "
                       "save_pretrained to store its plan, or call patch_model)", os.fspath(path), PLAN_FILE_NAME)
        return model
    if model.config._attn_implementation not in ("sdpa", "eager", "hf_sparse_attn"):
        model.set_attn_implementation("sdpa")
    plan = patch_model(model, plan=plan_file, strict=strict)
    logger.info("hf_sparse_attn: re-applied the plan of %s (%s on layers %s)", plan_file, plan.method_summary, plan.patched_layers)
    return model
