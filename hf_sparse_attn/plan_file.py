"""The plan file beside a checkpoint and the ``save_pretrained`` hook that writes it (the loading side is
:func:`hf_sparse_attn.loading.from_pretrained`). ``patching.py`` installs the hook and ``loading.py`` reads the file;
both import this module, which imports neither.

The plan is a file of its own, ``hf_sparse_attn_plan.json`` beside ``config.json`` (the same JSON that
``plan.save(path)`` writes), not an entry in ``config.json``: every loader reads ``config.json`` and keeps unknown
keys as config attributes, so a plain ``AutoModel.from_pretrained`` of the checkpoint would carry the plan on an
unpatched model and write it again into every later save of that model (fine-tuned or not) — a stale plan that
looks valid. A separate file is written only while a model is patched, is read only by this package, and can be
given to ``patch_model(model, plan=path)`` as it is. The weights and their keys are those of the unpatched model:
patching adds no parameter or buffer.

What the plan file says is kept true:

- it describes the weights saved beside it: the fingerprint is taken from the model at ``save_pretrained`` time,
  not at patch time, so a model patched, then fine-tuned, then saved reloads with its plan;
- a model that was patched once keeps the ``save_pretrained`` hook after ``unpatch_model``: saving it unpatched
  deletes a ``hf_sparse_attn_plan.json`` it finds in the target folder when that file is a plan of this package (a
  JSON object with a plan's keys), so that a stale plan never re-patches the unpatched weights saved over it. A file
  of that name that is no plan is never deleted nor overwritten: the save is refused before anything is written;
- ``from_pretrained(path, subfolder=...)`` reads the plan of the subfolder, never the parent's.

A model that this process never patched (a plain ``AutoModel.from_pretrained`` of a patched checkpoint) has no hook:
saving it over its own folder keeps the plan file, which is then re-applied only if the Q/K weights still match its
fingerprint (otherwise ``from_pretrained`` refuses it naming the difference).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional, Union

import torch

from .plan import PatchPlan, PlanError, model_fingerprint

PLAN_FILE_NAME = "hf_sparse_attn_plan.json"
logger = logging.getLogger("hf_sparse_attn")


class _SavePretrainedWithPlan:
    """Stands in for ``model.save_pretrained`` once the model has been patched: the model's own save, then the plan
    (while patched) or the removal of a stale plan file of ours (after ``unpatch_model``).

    An object rather than a closure so that ``copy.deepcopy(model)`` gives the copy a hook bound to the copy."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, save_directory: Union[str, os.PathLike], *args: Any, **kwargs: Any) -> Any:
        from .patches.runtime import state_of

        main = kwargs.get("is_main_process", True)
        if main and state_of(self.model) is not None:  # the plan will be written: never over a file of the user's
            check_plan_file_is_ours(os.path.join(os.fspath(save_directory), PLAN_FILE_NAME))
        result = type(self.model).save_pretrained(self.model, save_directory, *args, **kwargs)
        if main and os.path.isdir(save_directory):
            if write_plan(self.model, save_directory) is None:
                remove_stale_plan(save_directory)
        return result


def install_save_hook(model: torch.nn.Module) -> None:
    if not isinstance(model.__dict__.get("save_pretrained"), _SavePretrainedWithPlan):
        model.__dict__["save_pretrained"] = _SavePretrainedWithPlan(model)


def remove_save_hook(model: torch.nn.Module) -> None:
    if isinstance(model.__dict__.get("save_pretrained"), _SavePretrainedWithPlan):
        del model.__dict__["save_pretrained"]


def is_our_plan_file(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` holds a plan of this package: a JSON object whose keys are a plan's (the required ones
    present, no unknown one). Damaged values still count as ours; another file of the same name does not."""
    from .plan import _PLAN_KEYS, _PLAN_REQUIRED, MAX_PLAN_BYTES

    try:
        if os.path.getsize(path) > MAX_PLAN_BYTES:
            return False
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8").lstrip("\ufeff"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and _PLAN_REQUIRED <= set(data) <= _PLAN_KEYS


def check_plan_file_is_ours(path: str) -> None:
    """Refuse to save where a file named like our plan exists that is not one of our plans (it is the user's)."""
    if os.path.lexists(path) and (not os.path.isfile(path) or os.path.islink(path) or not is_our_plan_file(path)):
        raise PlanError(f"{path} exists and is not a plan written by hf_sparse_attn; it is left as it is and nothing "
                        f"was saved. Move or rename it, or save to another folder")


def remove_stale_plan(save_directory: Union[str, os.PathLike]) -> Optional[str]:
    """After an unpatched save: delete our plan file in ``save_directory`` (it would re-patch the unpatched weights
    saved there). Returns its path, or None when there was none."""
    path = os.path.join(os.fspath(save_directory), PLAN_FILE_NAME)
    if not os.path.isfile(path) or os.path.islink(path) or not is_our_plan_file(path):
        return None
    os.remove(path)
    logger.warning("hf_sparse_attn: removed the stale %s from %s: the model was saved unpatched", PLAN_FILE_NAME,
                   os.fspath(save_directory))
    return path


def write_plan(model: torch.nn.Module, save_directory: Union[str, os.PathLike]) -> Optional[str]:
    """Write the plan in force on ``model`` (run-time counters reset, the fingerprint taken from the weights being
    saved) as ``save_directory/hf_sparse_attn_plan.json``; return its path, or None when the model is not patched."""
    from .patches.runtime import state_of

    state = state_of(model)
    if state is None or state.plan is None:
        return None
    saved = PatchPlan.from_dict(state.plan.to_dict())
    saved.reset_counts()
    saved.model_fingerprint = model_fingerprint(model, state.adapter)  # the weights saved now, trained or not
    path = os.path.join(os.fspath(save_directory), PLAN_FILE_NAME)
    saved.save(path)
    return path


def find_plan_file(path: Union[str, os.PathLike], **hub_kwargs: Any) -> Optional[str]:
    """The plan file of a checkpoint (a local directory, or a hub id through transformers' cache), or None.
    With ``subfolder=`` the plan is looked up in that subfolder only, where the weights are read from."""
    path = os.fspath(path)
    subfolder = hub_kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        candidate = os.path.join(path, subfolder, PLAN_FILE_NAME)
        return candidate if os.path.isfile(candidate) else None
    from transformers.utils import cached_file

    keep = {k: v for k, v in hub_kwargs.items() if k in ("revision", "cache_dir", "token", "local_files_only", "subfolder")}
    try:
        return cached_file(path, PLAN_FILE_NAME, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **keep)
    except OSError:
        return None
