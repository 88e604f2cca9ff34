"""A small stand-in for ChatGLM2 / ChatGLM3 remote code, built from its published interface (the hub code cannot
be downloaded here). It reproduces what the adapter relies on, nothing more:

- ``model.transformer.encoder.layers[i]`` with ``input_layernorm`` (RMSNorm) and ``self_attention``;
- ``self_attention.query_key_value``: one Linear producing [q (np*hn) | k (ng*hn) | v (ng*hn)] (multi-query);
- rotary embedding on half of each head's dims, applied before the core attention; keys/values expanded to np heads;
- ``self_attention.core_attention.forward(q, k, v, attention_mask)`` in the ``seq_first`` layout [sq, b, np, hn]
  (returns [sq, b, np*hn]) or the ``batch_first`` layout [b, np, sq, hn] (returns [b, sq, np*hn]);
  ``attention_mask`` boolean, True = masked, or None = causal when sq == sk;
- ``config.num_attention_heads``, ``kv_channels``, ``multi_query_attention``, ``multi_query_group_num``.
"""

from __future__ import annotations

import math
import types

import torch
from torch import nn


def make_config(layout: str = "batch_first", num_layers: int = 3, hidden_size: int = 64, num_heads: int = 4, groups: int = 2,
                vocab: int = 97):
    return types.SimpleNamespace(layout=layout, num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_heads,
                                 kv_channels=hidden_size // num_heads, multi_query_attention=True, multi_query_group_num=groups,
                                 padded_vocab_size=vocab, ffn_hidden_size=2 * hidden_size, attention_dropout=0.0)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class CoreAttention(nn.Module):
    def __init__(self, config, layer_number: int):
        super().__init__()
        self.layout = config.layout
        self.layer_number = max(1, layer_number)
        self.hidden_size_per_attention_head = config.kv_channels
        self.num_attention_heads_per_partition = config.num_attention_heads
        self.attention_dropout = nn.Dropout(config.attention_dropout)

    def forward(self, query_layer, key_layer, value_layer, attention_mask):
        if self.layout == "seq_first":  # [sq, b, np, hn] -> [b, np, sq, hn]
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query_layer, key_layer, value_layer))
        else:
            q, k, v = query_layer, key_layer, value_layer
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if attention_mask is None and scores.shape[2] == scores.shape[3]:
            attention_mask = ~torch.ones(scores.shape[2], scores.shape[3], dtype=torch.bool).tril()
        if attention_mask is not None:
            scores = scores.masked_fill(attention_mask, float("-inf"))
        probs = self.attention_dropout(torch.softmax(scores, dim=-1))
        context = probs @ v  # [b, np, sq, hn]
        b, h, s, d = context.shape
        if self.layout == "seq_first":
            return context.permute(2, 0, 1, 3).reshape(s, b, h * d)
        return context.transpose(1, 2).reshape(b, s, h * d)


def rotate(x, positions):
    """Rotary embedding on the first half of the head dims. x [b, s, h, d], positions [s]."""
    d = x.shape[-1] // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    angles = positions[:, None].float() * freqs[None]  # [s, d/2]
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
    rot, rest = x[..., :d], x[..., d:]
    x1, x2 = rot[..., 0::2], rot[..., 1::2]
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, config, layer_number: int):
        super().__init__()
        self.config = config
        self.np, self.ng, self.hn = config.num_attention_heads, config.multi_query_group_num, config.kv_channels
        self.hidden_size_per_attention_head = config.kv_channels
        self.query_key_value = nn.Linear(config.hidden_size, (self.np + 2 * self.ng) * self.hn, bias=True)
        self.core_attention = CoreAttention(config, layer_number)
        self.dense = nn.Linear(self.np * self.hn, config.hidden_size, bias=False)

    def forward(self, hidden_states, attention_mask, positions, kv_cache=None):  # hidden_states [b, s, h]
        b, s, _ = hidden_states.shape
        q, k, v = self.query_key_value(hidden_states).split([self.np * self.hn, self.ng * self.hn, self.ng * self.hn], dim=-1)
        q = rotate(q.view(b, s, self.np, self.hn), positions)
        k = rotate(k.view(b, s, self.ng, self.hn), positions)
        v = v.view(b, s, self.ng, self.hn)
        if kv_cache is not None:
            k, v = torch.cat([kv_cache[0], k], dim=1), torch.cat([kv_cache[1], v], dim=1)
        new_cache = (k, v)
        k = k.repeat_interleave(self.np // self.ng, dim=2)
        v = v.repeat_interleave(self.np // self.ng, dim=2)
        if self.config.layout == "seq_first":
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [s, b, h, d]
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, h, s, d]
        context = self.core_attention(q, k, v, attention_mask)
        if self.config.layout == "seq_first":
            context = context.transpose(0, 1)
        return self.dense(context), new_cache


class GLMBlock(nn.Module):
    def __init__(self, config, layer_number: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size)
        self.self_attention = SelfAttention(config, layer_number)
        self.post_attention_layernorm = RMSNorm(config.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, config.ffn_hidden_size), nn.GELU(),
                                 nn.Linear(config.ffn_hidden_size, config.hidden_size))

    def forward(self, x, attention_mask, positions, kv_cache=None):
        attn, cache = self.self_attention(self.input_layernorm(x), attention_mask, positions, kv_cache)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class ChatGLMStandIn(nn.Module):
    """``forward(input_ids [b, s], attention_mask [b, s] (1 = token) or None, past=None) -> (logits [b, s, V], cache)``."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.Module()
        self.transformer.embedding = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.transformer.encoder = nn.Module()
        self.transformer.encoder.layers = nn.ModuleList(GLMBlock(config, i + 1) for i in range(config.num_layers))
        self.transformer.encoder.final_layernorm = RMSNorm(config.hidden_size)
        self.transformer.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)

    def forward(self, input_ids, attention_mask=None, past=None):
        b, s = input_ids.shape
        past_len = 0 if past is None else past[0][0].shape[1]
        positions = torch.arange(past_len, past_len + s)
        mask = None  # True = masked, ChatGLM's convention; built like the published get_masks
        if attention_mask is not None and not bool(attention_mask.all()):
            full = torch.ones(b, s, past_len + s).tril(diagonal=past_len)
            full = full * attention_mask[:, None, :].float()
            if past is None:  # padded query rows attend everything (never a fully masked row)
                full = full - (attention_mask[:, :, None].float() - 1)
            mask = (full < 0.5)[:, None]
        x = self.transformer.embedding(input_ids)
        caches = []
        for i, layer in enumerate(self.transformer.encoder.layers):
            x, cache = layer(x, mask, positions, None if past is None else past[i])
            caches.append(cache)
        return self.transformer.output_layer(self.transformer.encoder.final_layernorm(x)), caches
