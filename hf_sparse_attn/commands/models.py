"""Loading a model named on the command line (``--model``): the real offline models by name, or a path / hub id.

One loader and one rule for every command: a checkpoint is a causal LM when its code declares one
(``auto_map`` has ``AutoModelForCausalLM``, as ChatGLM2/3 do) or one of its ``architectures`` is a causal-LM
class (``...ForCausalLM``, ``...LMHeadModel``, or ``...ForConditionalGeneration`` of a config transformers maps to
a causal LM); it then loads with ``AutoModelForCausalLM``, anything else with ``AutoModel``. Remote code runs only
when the user asked for it (``--trust-remote-code``).

The name is checked before anything loads (:func:`check_model_name`, also the ``type`` of ``--model``): a name that
looks like a path but does not exist is an error at once, and a name close to one of the offline models' names
that is neither a local path nor in the local hub cache is answered with "did you mean ...?" instead of minutes of
hub retries. Nothing here imports torch or transformers at module level: the command line's ``--help`` and its
argument errors stay fast.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import Any, Optional

MODEL_HELP = "'smollm2' or 'minilm' (real offline weights), or a local path / hub id"
TRUST_REMOTE_CODE_HELP = "allow the checkpoint's own code (e.g. ChatGLM2/3); off by default"
SMOLLM2_NAMES = ("smollm2", "smollm2-135m")
MINILM_NAMES = ("minilm",)
MODEL_ALIASES = SMOLLM2_NAMES + MINILM_NAMES


def looks_like_path(name: str) -> bool:
    """A name no hub id can have: absolute, starting with ./ ../ ~, holding a backslash or two slashes, or ending in
    a file suffix. (``org/name`` and ``gpt2`` are hub ids as much as relative paths: they are not "path-looking".)"""
    return (os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\", "..\\")) or name in (".", "..")
            or "\\" in name or name.count("/") >= 2
            or name.lower().endswith((".json", ".gguf", ".safetensors", ".bin", ".pt", ".zip", ".jsonl", ".parquet")))


def hub_cache_has(repo_id: str, kind: str = "models") -> bool:
    """Whether the local Hugging Face hub cache holds ``repo_id`` (no network)."""
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return False
    return os.path.isdir(os.path.join(HF_HUB_CACHE, f"{kind}--{repo_id.replace('/', '--')}"))


def check_model_name(name: str) -> str:
    """``name`` if it can name a model: an offline alias, an existing local path, or something a hub id may be.
    Raises ValueError at once for a path-looking name that does not exist, and for a name close to an alias that
    is neither a local path nor in the local hub cache ("did you mean smollm2?")."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a model name is needed: {', '.join(MODEL_ALIASES)}, a local model directory or a hub id")
    if name.lower() in MODEL_ALIASES or os.path.exists(os.path.expanduser(name)):
        return name
    if looks_like_path(name):
        raise ValueError(f"{name}: no such model directory or file (give an existing local model directory, a hub id "
                         f"such as org/name, or one of: {', '.join(MODEL_ALIASES)})")
    close = difflib.get_close_matches(name.lower(), MODEL_ALIASES, n=1, cutoff=0.6)
    if close and not hub_cache_has(name):
        raise ValueError(f"unknown model {name!r}: did you mean {close[0]}? (a model is one of "
                         f"{', '.join(MODEL_ALIASES)}, a local model directory, or a hub id)")
    return name


def model_name(text: str) -> str:
    """argparse ``type`` of ``--model``: :func:`check_model_name`, so a bad name is a usage error before anything
    loads."""
    try:
        return check_model_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def check_local_or_hub(value: str, option: str, accepts: str) -> str:
    """``value`` of a data option (e.g. longbench ``--data``) if it exists locally or has the form of a hub id
    ``org/name``; else ValueError at once (a hub lookup of a mistyped directory costs minutes of retries offline).
    ``accepts`` says what the option takes, for the message."""
    if os.path.exists(os.path.expanduser(value)):
        return value
    org, sep, repo = value.partition("/")
    if sep and org and repo and "/" not in repo and not looks_like_path(value):
        return value
    raise ValueError(f"{option} {value}: no such file or directory, and not a hub id (org/name); {option} takes "
                     f"{accepts}")


def add_model_arguments(parser: argparse.ArgumentParser, *, required: bool = True, default: Optional[str] = None,
                        aliases: tuple[str, ...] = (), help: str = MODEL_HELP) -> None:
    """``--model NAME`` (plus older spellings in ``aliases``, e.g. ``--model-dir``) and ``--trust-remote-code``."""
    parser.add_argument("--model", *aliases, dest="model", required=required and default is None, default=default,
                        type=model_name, help=help)
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

    try:
        check_model_name(name)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if name.startswith("~"):
        name = os.path.expanduser(name)
    if name.lower() in SMOLLM2_NAMES:
        model, tok = load_smollm2()
    elif name.lower() in MINILM_NAMES:
        if causal_lm:
            raise ValueError("minilm is a BERT encoder, not a causal LM: this command needs one (e.g. smollm2)")
        model, tok = load_minilm()
    else:
        if not os.path.exists(os.path.expanduser(name)) and not hub_cache_has(name):
            print(f"{name} is not a local path and not in the local hub cache: asking the Hugging Face hub "
                  "(HF_HUB_OFFLINE=1 makes this fail at once)", file=sys.stderr)
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
