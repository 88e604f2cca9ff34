"""Loading a model named on the command line (``--model``): the real offline models by name, or a path / hub id.

One loader and one rule for every command: a checkpoint is a causal LM when its code declares one
(``auto_map`` has ``AutoModelForCausalLM``, as ChatGLM2/3 do) or one of its ``architectures`` is a causal-LM
class (``...ForCausalLM``, ``...LMHeadModel``, or ``...ForConditionalGeneration`` of a config transformers maps to
a causal LM); it then loads with ``AutoModelForCausalLM``, anything else with ``AutoModel``. Remote code runs only
when the user asked for it (``--trust-remote-code``).
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

MODEL_HELP = "'smollm2' or 'minilm' (real offline weights), or a local path / hub id"
TRUST_REMOTE_CODE_HELP = "allow the checkpoint's own code (e.g. ChatGLM2/3); off by default"
SMOLLM2_NAMES = ("smollm2", "smollm2-135m")
MINILM_NAMES = ("minilm",)


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool = True, default: Optional[str] = None,
                        aliases: tuple[str, ...] = (), help: str = MODEL_HELP) -> None:
    """``--model NAME`` (plus older spellings in ``aliases``, e.g. ``--model-dir``) and ``--trust-remote-code``."""
    parser.add_argument("--model", *aliases, dest="model", required=required and default is None, default=default,
                        help=help)
    parser.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)


def is_causal_lm(config: Any) -> bool:
    """The one causal-LM rule of the command line (see the module docstring)."""
    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return True
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return True
    if any(a.endswith("ForConditionalGeneration") for a in architectures):
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

        return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING
    return False


def _to_dtype(dtype: Any) -> Any:
    if dtype is None or dtype == "auto" or not isinstance(dtype, str):
        return dtype
    import torch

    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype: write e.g. float32, bfloat16, float16 or auto")
    return value


def load_model(name: str, trust_remote_code: bool = False, *, device: Optional[str] = None, device_map: Any = None,
               dtype: Any = None, tokenizer: bool = True, causal_lm: bool = False):
    """(model in eval mode, tokenizer). Never passes ``trust_remote_code=True`` unless asked.

    ``causal_lm=True``: the command needs next-token logits (bench model, longbench): a checkpoint the rule does
    not call a causal LM is refused with a clear error. ``tokenizer=False``: the weights only (the tokenizer
    returned is None), for commands such as ``rank`` that never tokenize. ``dtype``: a torch dtype, its name
    ("float32") or "auto" (default: transformers' default); the offline models are always fp32. ``device``:
    move the model there after loading; ``device_map``: passed to ``from_pretrained`` (accelerate placement)."""
    from ..eval.data import load_minilm, load_smollm2

    if name.lower() in SMOLLM2_NAMES:
        model, tok = load_smollm2()
    elif name.lower() in MINILM_NAMES:
        if causal_lm:
            raise ValueError("minilm is a BERT encoder, not a causal LM: this command needs one (e.g. smollm2)")
        model, tok = load_minilm()
    else:
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoModelForCausalLM,
            AutoTokenizer,
        )

        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        except ValueError:
            raise  # transformers' own message (e.g. "... set the option `trust_remote_code=True` ...")
        except Exception as err:  # noqa: BLE001 - say what to do
            raise SystemExit(f"cannot load a model config from {name!r}: {err}. Pass a local model directory, a hub id "
                             "that is in the local cache, or one of: minilm, smollm2. Models with their own code "
                             "need --trust-remote-code.") from None
        causal = is_causal_lm(config)
        if causal_lm and not causal:
            raise ValueError(f"{name} is not a causal LM (architectures {getattr(config, 'architectures', None)}); "
                             "this command needs next-token logits: give a causal-LM checkpoint")
        kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if dtype is not None:
            kwargs["dtype"] = _to_dtype(dtype)
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(name, **kwargs)
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code) if tokenizer else None
    if device is not None:
        model = model.to(device)
    return model.eval(), (tok if tokenizer else None)
