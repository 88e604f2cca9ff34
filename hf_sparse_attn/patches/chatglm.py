"""The adapter for ChatGLM2 / ChatGLM3 (hub remote code, ``trust_remote_code=True`` by the user's choice).

Layout handled (from the published ``modeling_chatglm.py`` of THUDM/chatglm2-6b, chatglm2-6b-32k, chatglm3-6b and
chatglm3-6b-32k):

- ``model.transformer.encoder.layers[i]`` is a ``GLMBlock`` with ``input_layernorm`` (RMSNorm or LayerNorm) and
  ``self_attention``; ``self_attention.query_key_value`` is one ``nn.Linear`` of output size
  ``np * hn + 2 * ng * hn`` (multi-query: ``config.multi_query_group_num = ng`` KV groups) or ``3 * np * hn``.
- ``self_attention.core_attention.forward(query_layer, key_layer, value_layer, attention_mask)`` gets the keys and
  values already expanded to ``np`` heads, after rotary embedding, in one of two layouts:
  * ``seq_first`` — ``[sq, b, np, hn]``, returns ``[sq, b, np * hn]`` (ChatGLM2 and ChatGLM3 up to their late-2023
    revisions);
  * ``batch_first`` — ``[b, np, sq, hn]``, returns ``[b, sq, np * hn]`` (the 2024 revisions, which also added the
    ``SdpaAttention`` / ``FlashAttention2`` core-attention classes).
  ``attention_mask`` is boolean with **True = masked** ``[b, 1, sq, sk]``, or None: causal when ``sq == sk``,
  no mask otherwise (decode steps). The softmax scale is ``1 / sqrt(hn)`` (the layer-number coefficient of
  ``apply_query_key_layer_scaling`` cancels).

The layout is read off the shapes on each call (``np`` is known); where both layouts fit (``b == np`` and
``sq == np``) the adapter option ``chatglm_layout`` decides. The remote code cannot be downloaded here: the tests run
the adapter on a local remote-code checkpoint written from this published interface (tests/fixtures/chatglm, loaded
with ``from_pretrained(dir, trust_remote_code=True)``, both layouts, generate() with its own KV cache).

The core attention's ``forward`` is replaced on the instance (on ``_old_forward`` when an accelerate hook wraps it),
and put back by ``uninstall``; no module, parameter or state-dict key changes.
"""

from __future__ import annotations

import types
from typing import Any

import torch

from .base import LayerRuntime, QKWeights, describe_call
from .compiled_cache import attend_cache_compiled, goes_to_operator
from .decode_step import decode_mask_of_call
from .masks import split_attend_mask

LAYOUTS = ("auto", "seq_first", "batch_first")


class ChatGLMAdapter:
    name = "chatglm"
    uses_transformers_cache = False  # the remote code keeps its own (tuple) cache
    families = "ChatGLM2, ChatGLM3 (remote code)"

    def __init__(self, chatglm_layout: str = "auto"):
        if chatglm_layout not in LAYOUTS:
            raise ValueError(f"chatglm_layout must be one of {LAYOUTS}, got {chatglm_layout!r}")
        self.chatglm_layout = chatglm_layout

    def matches(self, model: torch.nn.Module) -> bool:
        layers = self._blocks(model)
        return bool(layers) and all(hasattr(b, "self_attention") and hasattr(b.self_attention, "core_attention") for b in layers)

    @staticmethod
    def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
        encoder = getattr(getattr(model, "transformer", None), "encoder", None)
        layers = getattr(encoder, "layers", None)
        return list(layers) if layers is not None else []

    def attention_layers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return [block.self_attention.core_attention for block in self._blocks(model)]

    def qk_weights(self, model: torch.nn.Module, layer_idx: int) -> QKWeights:
        block = self._blocks(model)[layer_idx]
        attn = block.self_attention
        config = model.config
        num_heads = config.num_attention_heads
        head_dim = getattr(attn, "hidden_size_per_attention_head", None) or config.kv_channels
        num_kv = config.multi_query_group_num if getattr(config, "multi_query_attention", False) else num_heads
        weight = attn.query_key_value.weight.detach().float()  # [np*hn + 2*ng*hn, hidden]
        hidden = weight.shape[1]
        if getattr(config, "multi_query_attention", False):
            w_q = weight[: num_heads * head_dim].reshape(num_heads, head_dim, hidden)
            w_k = weight[num_heads * head_dim: (num_heads + num_kv) * head_dim].reshape(num_kv, head_dim, hidden)
        else:  # per head [q | k | v] interleaved: [np, 3 * hn, hidden]
            per_head = weight.reshape(num_heads, 3 * head_dim, hidden)
            w_q, w_k = per_head[:, :head_dim], per_head[:, head_dim: 2 * head_dim]
        norm = getattr(block, "input_layernorm", None)
        gain = norm.weight.detach().float() if norm is not None and getattr(norm, "weight", None) is not None else None
        return QKWeights(w_q=w_q, w_k=w_k, norm_gain=gain, norm_name=f"transformer.encoder.layers.{layer_idx}.input_layernorm")

    def _layout(self, query: torch.Tensor, num_heads: int) -> str:
        seq_first = query.shape[2] == num_heads
        batch_first = query.shape[1] == num_heads
        if seq_first and batch_first:
            if self.chatglm_layout == "auto":
                raise ValueError(
                    f"ChatGLM core attention got q {tuple(query.shape)}: both the [sq, b, np, hn] and the [b, np, sq, hn] "
                    "layouts fit. Pass adapter_options={'chatglm_layout': 'seq_first' or 'batch_first'} to patch_model "
                    "(batch_first for the 2024 chatglm3 revisions, seq_first for chatglm2 and older chatglm3)."
                )
            return self.chatglm_layout
        if seq_first:
            return "seq_first"
        if batch_first:
            return "batch_first"
        raise ValueError(f"ChatGLM core attention got q {tuple(query.shape)}, which fits neither known layout ({num_heads} heads)")

    def install(self, model: torch.nn.Module, runtimes: list[LayerRuntime]) -> Any:
        saved = []
        for core, runtime in zip(self.attention_layers(model), runtimes):
            runtime.previous_implementation = "chatglm"
            attr = "_old_forward" if hasattr(core, "_hf_hook") and hasattr(core, "_old_forward") else "forward"
            had_instance_attr = attr in core.__dict__
            original = getattr(core, attr)
            saved.append((core, attr, had_instance_attr, original))
            setattr(core, attr, types.MethodType(_make_forward(self, runtime, original), core))
        return saved

    def uninstall(self, model: torch.nn.Module, token: Any) -> None:
        for core, attr, had_instance_attr, original in token:
            if had_instance_attr:
                setattr(core, attr, original)
            else:
                delattr(core, attr)


def _make_forward(adapter: ChatGLMAdapter, runtime: LayerRuntime, original):
    def forward(core, query_layer, key_layer, value_layer, attention_mask):
        num_heads = core.num_attention_heads_per_partition
        layout = adapter._layout(query_layer, num_heads)
        if layout == "seq_first":  # [sq, b, np, hn] -> [b, np, sq, hn]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query_layer, key_layer, value_layer))
        else:
            q, k, v = query_layer, key_layer, value_layer
        n_query, n_key = q.shape[2], k.shape[2]
        scale = q.shape[-1] ** -0.5
        dropout_in_training = bool(core.training and getattr(core.attention_dropout, "p", 0.0) > 0)
        if goes_to_operator(runtime, q, k, v, dropout_in_training=dropout_in_training):
            # against its cache, traced: decided at run time by the operator (compiled_cache.py); no mask = no mask
            out = attend_cache_compiled(runtime.token, q, k, v, None if attention_mask is None else ~attention_mask,
                                        causal=attention_mask is not None and n_query > 1, scale=scale,
                                        cross_attention=False, unsupported_inputs=())
            return _to_layout(out, layout)
        valid = n_key
        if attention_mask is None:
            causal, key_padding_mask, recognized = n_query == n_key and n_query > 1, None, True
        elif n_query != n_key:  # against the KV cache: the mask reduced to key padding (decode_step.py)
            causal = n_query > 1
            recognized, key_padding_mask, valid = decode_mask_of_call(~attention_mask, n_query, n_key)
        else:
            causal, key_padding_mask, recognized = split_attend_mask(~attention_mask, n_query > 1, n_query)
        if recognized and n_query == n_key:
            runtime.record(q, k, v, scale, causal, key_padding_mask)
        call = describe_call(q, k, v, scale=scale, causal=causal, mask_recognized=recognized, kv_len=valid,
                             dropout_in_training=dropout_in_training)
        out = runtime.attend(q, k, v, scale=scale, causal=causal, key_padding_mask=key_padding_mask, call=call)
        if out is None:
            return original(query_layer, key_layer, value_layer, attention_mask)
        return _to_layout(out, layout)

    return forward


def _to_layout(out: torch.Tensor, layout: str) -> torch.Tensor:
    """out [b, np, sq, hn] -> the core attention's output: [sq, b, np * hn] (seq_first) or [b, sq, np * hn]."""
    b, h, s, d = out.shape
    if layout == "seq_first":
        return out.permute(2, 0, 1, 3).reshape(s, b, h * d)
    return out.transpose(1, 2).reshape(b, s, h * d)
