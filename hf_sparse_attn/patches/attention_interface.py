"""The adapter for every model whose attention goes through transformers' attention interface
(BERT, RoBERTa, GPT-2, Llama, Mistral, Qwen2, GLM, GLM-4 and the others built the same way).

One attention function, ``hf_sparse_attn``, is registered with ``AttentionInterface`` and a mask function with
``AttentionMaskInterface`` (:func:`~hf_sparse_attn.patches.masks.compact_mask`: the [B, N] key padding mask for
plain causal or bidirectional attention, the dense mask otherwise — without a mask function every mask arrives as
None and padding silently disappears) when the package is imported, so ``from_pretrained(...,
attn_implementation="hf_sparse_attn")`` loads. ``model.set_attn_implementation("hf_sparse_attn")`` routes every
layer through it; the function looks up the layer's :class:`LayerRuntime` on the module and either runs the method
or calls the implementation the model used before (``sdpa`` or ``eager``), with the same arguments — so layers not
chosen compute exactly what they computed before. A module with no runtime (a model loaded with
``attn_implementation="hf_sparse_attn"`` and never patched) runs ``sdpa`` with the same arguments and the dense
mask ``sdpa_mask`` would have built.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch

from .base import LayerRuntime, QKWeights, describe_call
from .compiled_cache import attend_cache_compiled, goes_to_operator
from .decode_step import decode_mask_of_call
from .masks import compact_mask, dense_mask

ATTENTION_NAME = "hf_sparse_attn"
RUNTIME_ATTR = "_hf_sparse_attn_runtime"
SUPPORTED_PREVIOUS = ("sdpa", "eager")
UNPATCHED_IMPLEMENTATION = "sdpa"  # what a module with no runtime runs

_registered = False


def register_attention() -> None:
    """Register ``hf_sparse_attn`` with transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    _register()


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, compact_mask)
    _registered = True


def _eager_forward_of(module: torch.nn.Module) -> Callable:
    """The model file's own eager attention (it returns the weights), or a generic one."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return fn if fn is not None else _generic_eager_forward


def _generic_eager_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _to_additive(attention_mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Boolean mask (True = attend) -> the additive float mask eager attention expects."""
    if attention_mask is None or attention_mask.dtype != torch.bool:
        return attention_mask
    return torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill_(
        ~attention_mask, torch.finfo(dtype).min
    )


def _previous_forward(module: torch.nn.Module, previous: str, output_attentions: bool) -> tuple[Callable, bool]:
    """(function, wants_additive_mask) for the implementation to run instead of the method."""
    if previous == "eager" or output_attentions:
        return _eager_forward_of(module), True
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[previous], False


def _unsupported_inputs(kwargs: dict[str, Any]) -> tuple[str, ...]:
    """The names of the call's keyword inputs that no method honours (a position bias, logit softcapping, a sliding
    window)."""
    names = []
    if kwargs.get("position_bias") is not None:
        names.append("position_bias")
    if kwargs.get("softcap") is not None:
        names.append("softcap")
    if kwargs.get("sliding_window"):
        names.append("sliding_window")
    return tuple(names)


def attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function. query [B, H, Nq, D], key/value [B, Hkv, Nk, D]; attention_mask as
    :func:`~hf_sparse_attn.patches.masks.compact_mask` hands it over: None, the key padding mask [B, Nk] bool (plain
    causal or bidirectional attention), or a dense [B, 1, Nq, Nk] mask (any other form: exact attention).
    Returns (out [B, Nq, H, D], weights or None)."""
    runtime: Optional[LayerRuntime] = getattr(module, RUNTIME_ATTR, None)
    is_causal = kwargs.get("is_causal")  # the rule of transformers' sdpa_attention_forward, its default included
    is_causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    n_query, n_key = query.shape[2], key.shape[2]
    causal = is_causal and n_query > 1
    compact = isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
    if runtime is None:  # not patched: exactly what sdpa runs, with the mask sdpa_mask would have built
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        mask = dense_mask(attention_mask, causal) if compact else attention_mask
        return ALL_ATTENTION_FUNCTIONS[UNPATCHED_IMPLEMENTATION](
            module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    output_attentions = bool(kwargs.get("output_attentions", False))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5

    dropout_in_training = bool(module.training and dropout and dropout > 0)
    cross_attention = bool(getattr(module, "is_cross_attention", False))
    if (not compact and not output_attentions
            and goes_to_operator(runtime, query, key, value, dropout_in_training=dropout_in_training)):
        # against a cache, traced: decided at run time (compiled_cache.py)
        out = attend_cache_compiled(runtime.token, query, key, value, attention_mask, causal=causal, scale=scale,
                                    cross_attention=cross_attention, unsupported_inputs=_unsupported_inputs(kwargs))
        return out.transpose(1, 2).contiguous(), None
    if runtime.active or runtime.capture is not None:
        recognized = attention_mask is None or compact
        key_padding_mask = attention_mask if compact else None
        valid = n_key
        if n_query != n_key and not compact:  # against a KV cache: the mask reduced to key padding (decode_step.py)
            recognized, key_padding_mask, valid = decode_mask_of_call(attention_mask, n_query, n_key, causal)
        if recognized and n_query == n_key:
            runtime.record(query, key, value, scale, causal, key_padding_mask)
        elif runtime.capture is not None:
            runtime.record(query, key, value, scale, causal, None, attend_mask=attention_mask)
        if runtime.active:
            call = describe_call(
                query, key, value, scale=scale, causal=causal, mask_recognized=recognized,
                output_attentions=output_attentions, dropout_in_training=dropout_in_training,
                cross_attention=cross_attention,
                unsupported_inputs=_unsupported_inputs(kwargs), kv_len=valid,
            )
            out = runtime.attend(query, key, value, scale=scale, causal=causal, key_padding_mask=key_padding_mask,
                                 call=call)
            if out is not None:
                return out.transpose(1, 2).contiguous(), None

    fn, additive = _previous_forward(module, runtime.previous_implementation, output_attentions)
    mask = dense_mask(attention_mask, causal) if compact else attention_mask
    mask = _to_additive(mask, query.dtype) if additive else mask
    return fn(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Where the attention modules and their Q/K weights are, per family.
# ---------------------------------------------------------------------------------------------------------

def _linear_heads(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """nn.Linear weight [num_heads * D, hidden] -> [num_heads, D, hidden]."""
    return weight.detach().float().reshape(num_heads, -1, weight.shape[-1])


class AttentionInterfaceAdapter:
    """BERT, RoBERTa, GPT-2, Llama, Mistral, Qwen2, GLM, GLM-4 (and every model with the same attention layout)."""

    name = "attention_interface"
    uses_transformers_cache = True
    families = "BERT, RoBERTa, GPT-2, Llama, Mistral, Qwen2, GLM, GLM-4"

    def matches(self, model: torch.nn.Module) -> bool:
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            return False
        layers = self.attention_layers(model)
        return bool(layers) and all(self._projections(m) is not None for m in layers)

    def attention_layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        found = []
        for name, module in model.named_modules():
            if not hasattr(module, "layer_idx") and not hasattr(module, "is_causal"):
                continue
            if self._projections(module) is None:
                continue
            if getattr(module, "is_cross_attention", False):
                continue
            found.append((name, module))
        modules = [m for _, m in found]
        # BERT-style self-attention modules carry no layer_idx in some versions: number them in model order
        if any(getattr(m, "layer_idx", None) is None for m in modules):
            return modules
        return sorted(modules, key=lambda m: m.layer_idx)

    @staticmethod
    def _projections(module: torch.nn.Module) -> Optional[str]:
        if isinstance(getattr(module, "q_proj", None), torch.nn.Linear) and isinstance(getattr(module, "k_proj", None), torch.nn.Linear):
            return "q_proj"
        if isinstance(getattr(module, "query", None), torch.nn.Linear) and isinstance(getattr(module, "key", None), torch.nn.Linear):
            return "query"
        if hasattr(module, "c_attn") and hasattr(getattr(module, "c_attn"), "weight") and hasattr(module, "split_size"):
            return "c_attn"
        return None

    def _heads(self, model, module) -> tuple[int, int]:
        config = model.config
        num_heads = getattr(module, "num_heads", None) or getattr(config, "num_attention_heads", None) or config.n_head
        num_kv = getattr(config, "num_key_value_heads", None) or num_heads
        groups = getattr(module, "num_key_value_groups", None)
        if groups:
            num_kv = num_heads // groups
        return int(num_heads), int(num_kv)

    def qk_weights(self, model: torch.nn.Module, layer_idx: int) -> QKWeights:
        modules = self.attention_layers(model)
        module = modules[layer_idx]
        num_heads, num_kv = self._heads(model, module)
        kind = self._projections(module)
        if kind == "q_proj":
            w_q, w_k = _linear_heads(module.q_proj.weight, num_heads), _linear_heads(module.k_proj.weight, num_kv)
        elif kind == "query":
            w_q, w_k = _linear_heads(module.query.weight, num_heads), _linear_heads(module.key.weight, num_heads)
        else:  # GPT-2 Conv1D: y = x @ W, W [hidden, 3 * hidden] = [Q | K | V]
            w = module.c_attn.weight.detach().float()
            hidden = module.split_size
            w_q = w[:, :hidden].t().reshape(num_heads, -1, w.shape[0])
            w_k = w[:, hidden:2 * hidden].t().reshape(num_heads, -1, w.shape[0])
        gain, norm_name = self._norm_gain(model, module, layer_idx, modules)
        return QKWeights(w_q=w_q, w_k=w_k, norm_gain=gain, norm_name=norm_name)

    @staticmethod
    def _norm_gain(model, module, layer_idx, modules) -> tuple[Optional[torch.Tensor], str]:
        """The gain of the normalization whose output is this attention's input ("Attention is Naturally Sparse", Definitions 3.1-3.2).

        Pre-norm decoders: the block's ``input_layernorm`` (Llama, Mistral, Qwen2, GLM, GLM-4) or ``ln_1`` (GPT-2).
        Post-norm BERT/RoBERTa: the previous block's output LayerNorm, or the embeddings' LayerNorm for layer 0.
        """
        names = {m: n for n, m in model.named_modules()}
        attn_name = names[module]
        parts = attn_name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            parent = model.get_submodule(".".join(parts[:cut]))
            for norm_attr in ("input_layernorm", "ln_1"):
                norm = getattr(parent, norm_attr, None)
                if norm is not None and getattr(norm, "weight", None) is not None:
                    return norm.weight.detach().float(), f"{'.'.join(parts[:cut])}.{norm_attr}"
        # post-norm (BERT family): find the block list that holds this layer
        for cut in range(len(parts) - 1, 0, -1):
            if parts[cut - 1] in ("layer", "layers") and parts[cut].isdigit():
                block_list_name = ".".join(parts[:cut])
                i = int(parts[cut])
                if i > 0:
                    prev = model.get_submodule(f"{block_list_name}.{i - 1}")
                    norm = getattr(getattr(prev, "output", None), "LayerNorm", None)
                    if norm is not None:
                        return norm.weight.detach().float(), f"{block_list_name}.{i - 1}.output.LayerNorm"
                else:
                    for n, m in model.named_modules():
                        if n.endswith("embeddings.LayerNorm") or n.endswith("embeddings.layer_norm"):
                            return m.weight.detach().float(), n
        return None, ""

    # -- install / uninstall --
    @staticmethod
    def _attach(module: torch.nn.Module, runtime: LayerRuntime) -> None:
        setattr(module, RUNTIME_ATTR, runtime)

    @staticmethod
    def _detach(module: torch.nn.Module) -> None:
        if hasattr(module, RUNTIME_ATTR):
            delattr(module, RUNTIME_ATTR)

    def install(self, model: torch.nn.Module, runtimes: list[LayerRuntime]) -> Any:
        previous = model.config._attn_implementation
        modules = self.attention_layers(model)
        if previous == ATTENTION_NAME:
            # loaded with attn_implementation="hf_sparse_attn": unpatched modules run sdpa; after uninstall they still do
            if any(hasattr(module, RUNTIME_ATTR) for module in modules):
                raise RuntimeError("model is already patched by hf_sparse_attn; unpatch it first")
            _register()
            for module, runtime in zip(modules, runtimes):
                runtime.previous_implementation = UNPATCHED_IMPLEMENTATION
                self._attach(module, runtime)
            return previous
        if previous not in SUPPORTED_PREVIOUS:
            raise ValueError(
                f"the model runs attention {previous!r}; hf_sparse_attn can patch models running {list(SUPPORTED_PREVIOUS)}. "
                "Call model.set_attn_implementation('sdpa') before patch_model."
            )
        _register()
        for module, runtime in zip(modules, runtimes):
            runtime.previous_implementation = previous
            self._attach(module, runtime)
        try:
            model.set_attn_implementation(ATTENTION_NAME)
        except Exception:
            for module in modules:
                self._detach(module)
            raise
        if model.config._attn_implementation != ATTENTION_NAME:
            for module in modules:
                self._detach(module)
            raise RuntimeError(f"{type(model).__name__} does not let its attention implementation be switched at run time")
        return previous

    def uninstall(self, model: torch.nn.Module, token: Any) -> None:
        if model.config._attn_implementation != token:
            model.set_attn_implementation(token)
        for module in self.attention_layers(model):
            self._detach(module)
