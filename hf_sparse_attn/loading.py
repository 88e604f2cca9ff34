"""Plans that travel with the checkpoint: ``save_pretrained`` of a patched model writes its plan beside the weights,
and :func:`from_pretrained` loads a checkpoint and re-applies that plan.

The plan is a file of its own, ``hf_sparse_attn_plan.json`` beside ``config.json`` (the same JSON that
``plan.save(path)`` writes), not an entry in ``config.json``: every loader reads ``config.json`` and keeps unknown
keys as config attributes, so a plain ``AutoModel.from_pretrained`` of the checkpoint would carry the plan on an
unpatched model and write it again into every later save of that model (fine-tuned or not) — a stale plan that
looks valid. A separate file is written only while a model is patched, is read only by this package, and can be
given to ``patch_model(model, plan=path)`` as it is. The weights and their keys are those of the unpatched model:
patching adds no parameter or buffer.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Union

import torch

from .plan import PatchPlan

PLAN_FILE_NAME = "hf_sparse_attn_plan.json"
logger = logging.getLogger("hf_sparse_attn")


class _SavePretrainedWithPlan:
    """Stands in for ``model.save_pretrained`` while the model is patched: the model's own save, then the plan.

    An object rather than a closure so that ``copy.deepcopy(model)`` gives the copy a hook bound to the copy."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, save_directory: Union[str, os.PathLike], *args: Any, **kwargs: Any) -> Any:
        result = type(self.model).save_pretrained(self.model, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_plan(self.model, save_directory)
        return result


def install_save_hook(model: torch.nn.Module) -> None:
    model.__dict__["save_pretrained"] = _SavePretrainedWithPlan(model)


def remove_save_hook(model: torch.nn.Module) -> None:
    if isinstance(model.__dict__.get("save_pretrained"), _SavePretrainedWithPlan):
        del model.__dict__["save_pretrained"]


def write_plan(model: torch.nn.Module, save_directory: Union[str, os.PathLike]) -> Optional[str]:
    """Write the plan in force on ``model`` (run-time counters reset) as ``save_directory/hf_sparse_attn_plan.json``;
    return its path, or None when the model is not patched."""
    from .patching import current_plan

    plan = current_plan(model)
    if plan is None:
        return None
    saved = PatchPlan.from_dict(plan.to_dict())
    saved.reset_counts()
    path = os.path.join(os.fspath(save_directory), PLAN_FILE_NAME)
    saved.save(path)
    return path


def find_plan_file(path: Union[str, os.PathLike], **hub_kwargs: Any) -> Optional[str]:
    """The plan file of a checkpoint (a local directory, or a hub id through transformers' cache), or None."""
    path = os.fspath(path)
    if os.path.isdir(path):
        candidate = os.path.join(path, PLAN_FILE_NAME)
        return candidate if os.path.isfile(candidate) else None
    from transformers.utils import cached_file

    keep = {k: v for k, v in hub_kwargs.items() if k in ("revision", "cache_dir", "token", "local_files_only", "subfolder")}
    try:
        return cached_file(path, PLAN_FILE_NAME, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **keep)
    except OSError:
        return None


def from_pretrained(path: Union[str, os.PathLike], auto_class: Any = None, *, strict: bool = True, **kwargs: Any):
    """Load a checkpoint with ``auto_class.from_pretrained(path, **kwargs)`` (default ``AutoModelForCausalLM``) and
    re-apply the plan saved beside it (``hf_sparse_attn_plan.json``). Any ``dtype``, ``device_map`` or other
    argument of ``from_pretrained`` is passed through; the plan fits whatever the dtype (see
    :func:`hf_sparse_attn.plan.model_fingerprint`). A checkpoint without a plan loads unpatched, with a warning
    on the ``hf_sparse_attn`` logger. ``strict=False``: a plan made for other weights is applied with a warning.
    """
    from .patching import patch_model

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
    logger.info("hf_sparse_attn: re-applied the plan of %s (%s on layers %s)", plan_file, plan.method, plan.patched_layers)
    return model
