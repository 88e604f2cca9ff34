"""Loading a model named on the command line: the real offline models by name, or a path / hub id."""

from __future__ import annotations

from typing import Any

MODEL_HELP = "'smollm2' or 'minilm' (real offline weights), or a local path / hub id"


def load_model(name: str, trust_remote_code: bool = False, device_map: Any = None, tokenizer: bool = True):
    """(model, tokenizer). Never passes trust_remote_code=True unless asked. ``tokenizer=False``: the weights
    only (the tokenizer returned is None), for commands such as ``rank`` that never tokenize."""
    from ..eval.data import load_minilm, load_smollm2

    if name == "smollm2":
        return load_smollm2()
    if name == "minilm":
        return load_minilm()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    auto = AutoModelForCausalLM if any(a.endswith("ForCausalLM") or a.endswith("ForConditionalGeneration")
                                       for a in (getattr(config, "architectures", None) or [])) else AutoModel
    kwargs = {"trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    model = auto.from_pretrained(name, **kwargs).eval()
    if not tokenizer:
        return model, None
    return model, AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
