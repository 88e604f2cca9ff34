"""The recommended ``patch_model`` arguments for a kind of model, from the project's measurements.

    from hf_sparse_attn import patch_model, recommended
    plan = patch_model(model, **recommended(model))

Causal LMs: ``block_select`` on all layers with ``local`` w1024's window and sinks plus 64 selected key columns
(:data:`RECOMMENDED_PREFILL`: 64 attention sinks + an exact window of 1024 + 64 keys per row chosen by MInference's
vertical estimate, Jiang et al. 2024: the last 64 rows' attention mass, single key columns). Why not ``local``
(StreamingLLM, Xiao et al. 2023): it loses facts far behind its window. On real SmolLM2-135M at 8k (22 samples per
task, eval/results/ruler_recommended_8k/frontier.md) ``local`` w1024 keeps 2 of the unpatched model's 9 pass keys and
none of its 9 niah_multikey_1 answers; this plan keeps 9 of 9 and 7 of 9, and on a second draw of 44 multikey samples
14 of 16 (eval/results/ruler_multikey_8k_seed1/frontier.md); niah_single_1 / niah_single_2 90 / 50, keeping 18 of 18
and 10 of 11, niah_multivalue 28 finding 19 of the unpatched model's 27 values (eval/results/ruler_niah_8k/frontier.md;
``local`` 65 / 10 / 9, 6 values). Perplexity on 10 articles at 8k +3.1%
(+1.5..+5.8%), ``local``'s +3.3%; prefill 1.48x (1.45-1.51x) timed paired with the exact model, ``local`` 7% faster in
the same run (eval/results/model_bench_block_select_w1024_s64_paired/results.md). It replaced ``block_select``'s own
defaults (window 512 + 512 columns, the kernel defaults): as fast timed at the same time (1.45x against 1.43x,
eval/results/model_bench_speed_w1024_s64_beside_w512/results.md), +3.1% perplexity against +6.3%, and as many facts
(multikey over two draws 21 of 25 kept against 20). At 16k / 32k (YaRN): 2.03x / 3.41x at +2.5% / -1.3%
(eval/results/recommended_smollm2_16k/results.md, recommended_smollm2_32k/results.md).
:data:`WINDOW_BY_R_RECOMMENDATION` (``block_select``'s defaults with window 1024 on the half of the layers of largest
R, through ``patch_model``'s ``other_layers``): +3.6% at 1.41x (eval/results/model_bench_frontier_paired/results.md),
kept fewer niah_multikey_1 answers (6 of 9). :data:`LOCAL_RECOMMENDATION` keeps ``local``'s arguments for whoever
prefers its speed and accepts its lost facts.

Decode steps, generated with ``generation_cache(model)`` (a ``GrowingCache``): ``exact`` (grouped attention over the
cache) on the two thirds of the layers of largest R and ``local`` (sinks + window 1024) on the others. On SmolLM2 that
decodes 1.84x / 2.43x / 2.71x faster per generated token than the unpatched model with a ``DynamicCache`` at 8k / 16k /
32k (exact decode on every layer 1.62x / 1.99x / 2.35x; eval/results/recommended_smollm2_8k/results.md, _16k, _32k)
and keeps every pass key and niah_multikey_1 answer that exact decode on every layer keeps, with this prefill (9 of 9,
7 of 9) as with window 512's (9 of 9, 8 of 9; 22 samples each, eval/results/ruler_recommended_8k/frontier.md). At 16k
(YaRN) this plan keeps 2 of the 3 pass keys the unpatched model finds (eval/results/ruler_decode_16k/frontier.md).
With a tokenizer, ``recommended(model, tokenizer)`` ranks the layers by the needle attention of a pass-key probe
instead and decodes exactly on the third of most: 1.54x (exact decode on every layer 1.17x in the same run), the same
facts kept with window 512's prefill (eval/results/decode_split_retrieval_smollm2/results.md); with this prefill it
keeps 9 of 9 pass keys and 6 of 9 niah_multikey_1 answers, one fewer than exact decode (ruler_recommended_8k).
``local`` on every layer (2.1x) keeps 1 of 4 pass keys; ``quest`` keeps them at a budget of 2048 keys at about exact
decode's speed at 8k (docs/methods/decode.md, eval/results/ruler_frontier_smollm2/frontier.md). ``quest`` instead of
``exact`` on the 20 layers decodes 4.46x at 32k with a budget of 4096 keys (5.26x at 2048, which loses 2 of the 4 pass
keys exact decode finds at 16k; at 4096 it keeps the unpatched model's), but its facts at 32k are not measured
(eval/results/decode_quest_b4096_split_smollm2_32k/results.md, ruler_decode_16k/frontier.md).

Encoders (bidirectional attention): ``sparse_hyper`` ("Attention is Naturally Sparse", Algorithm 1) on all layers with
its defaults: 11x SDPA at 8k and 41x at 32k bidirectional (eval/results/kernels_full/results.md). Its defaults run
exact attention below 2048 tokens (eval/results/defaults_min_seq_len/results.md), so a 512-position encoder runs
exactly what it ran before.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .methods.defaults import (BLOCK_SELECT_BLOCK_SIZE, BLOCK_SELECT_MIN_SEQ_LEN, BLOCK_SELECT_NUM_SELECTED,
                               BLOCK_SELECT_NUM_SINK_TOKENS, BLOCK_SELECT_PROBE_QUERIES, BLOCK_SELECT_SELECTION,
                               BLOCK_SELECT_WIDE_LAYERS, BLOCK_SELECT_WIDE_WINDOW, BLOCK_SELECT_WINDOW,
                               DECODE_EXACT_LAYERS_BY_R, DECODE_LOCAL_LAYERS_BY_RETRIEVAL, LOCAL_MIN_SEQ_LEN,
                               LOCAL_NUM_SINK_TOKENS, LOCAL_WINDOW, RECOMMENDED_BLOCK_SELECT_NUM_SELECTED,
                               RECOMMENDED_BLOCK_SELECT_WINDOW)

# The previous causal recommendation (eval/results/model_bench_causal/frontier.md): better perplexity, loses far facts.
LOCAL_RECOMMENDATION = {"method": "local", "layers": "all", "window": LOCAL_WINDOW,
                        "num_sink_tokens": LOCAL_NUM_SINK_TOKENS, "min_seq_len": LOCAL_MIN_SEQ_LEN}
# block_select's prefill with its defaults, spelled out (every layer of the causal recommendations runs it)
BLOCK_SELECT_PREFILL = {"method": "block_select", "selection": BLOCK_SELECT_SELECTION, "window": BLOCK_SELECT_WINDOW,
                        "num_sink_tokens": BLOCK_SELECT_NUM_SINK_TOKENS, "num_selected": BLOCK_SELECT_NUM_SELECTED,
                        "block_size": BLOCK_SELECT_BLOCK_SIZE, "probe_queries": BLOCK_SELECT_PROBE_QUERIES,
                        "min_seq_len": BLOCK_SELECT_MIN_SEQ_LEN}
# The recommended prefill: block_select with local w1024's window and sinks and 64 selected columns
# (methods/defaults.py RECOMMENDED_BLOCK_SELECT_WINDOW)
RECOMMENDED_PREFILL = {**BLOCK_SELECT_PREFILL, "window": RECOMMENDED_BLOCK_SELECT_WINDOW,
                       "num_selected": RECOMMENDED_BLOCK_SELECT_NUM_SELECTED}
LOCAL_DECODE = {"decode_method": "local",
                "decode_params": {"window": LOCAL_WINDOW, "num_sink_tokens": LOCAL_NUM_SINK_TOKENS}}
# The prefill on every layer; decode exact on the layers of largest R, sinks + window on the others
# (methods/defaults.py DECODE_EXACT_LAYERS_BY_R).
CAUSAL_RECOMMENDATION = {**RECOMMENDED_PREFILL, "layers": DECODE_EXACT_LAYERS_BY_R, "select": "weight_norm",
                         "decode_method": "exact", "other_layers": {**RECOMMENDED_PREFILL, **LOCAL_DECODE}}
# The same prefill; decode sinks + window on the layers of least needle mass on a pass-key probe (select="retrieval",
# which needs the probe: recommended(model, tokenizer) adds it as ``calibration``), exact on the others
# (methods/defaults.py DECODE_LOCAL_LAYERS_BY_RETRIEVAL).
RETRIEVAL_DECODE_RECOMMENDATION = {**RECOMMENDED_PREFILL, "layers": DECODE_LOCAL_LAYERS_BY_RETRIEVAL,
                                   "select": "retrieval", **LOCAL_DECODE,
                                   "other_layers": {**RECOMMENDED_PREFILL, "decode_method": "exact"}}
# The window following R (eval/results/model_bench_hybrid_windows/results.md): less perplexity, slower, kept fewer
# multikey needles at 8k (eval/results/ruler_recommended_8k/frontier.md); exact decode.
WINDOW_BY_R_RECOMMENDATION = {**BLOCK_SELECT_PREFILL, "layers": BLOCK_SELECT_WIDE_LAYERS, "select": "weight_norm",
                              "window": BLOCK_SELECT_WIDE_WINDOW, "decode_method": "exact",
                              "other_layers": dict(BLOCK_SELECT_PREFILL)}
ENCODER_RECOMMENDATION = {"method": "sparse_hyper", "layers": "all"}

# Causal LM families whose attention modules may not say so (remote code: ChatGLM's core_attention).
_CAUSAL_MODEL_TYPES = ("chatglm", "glm")


def is_causal_lm(model: torch.nn.Module) -> bool:
    """Whether ``model`` runs causal self-attention (a decoder LM) rather than bidirectional (an encoder).

    Read from, in order: ``config.is_causal`` False (a decoder run bidirectionally), ``config.is_decoder``, the
    ``is_causal`` flag transformers puts on every attention module, the model type (remote-code GLMs), and the class
    name (``...ForCausalLM``).
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_causal", None) is False:
        return False
    if getattr(config, "is_decoder", False):
        return True
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if flags:
        return any(flags)
    model_type = str(getattr(config, "model_type", "") or "").lower()
    if model_type.startswith(_CAUSAL_MODEL_TYPES):
        return True
    return type(model).__name__.endswith("ForCausalLM")


def recommended(model: torch.nn.Module, tokenizer: Any = None) -> dict[str, Any]:
    """Keyword arguments of :func:`hf_sparse_attn.patch_model` recommended for this kind of model (a new dict).

    Causal LM: :data:`CAUSAL_RECOMMENDATION`, ``block_select``'s prefill (window 1024 + 64 selected columns,
    :data:`RECOMMENDED_PREFILL`) on every layer (docs/methods/block_select.md#measured); decode exact on the two
    thirds of the layers of largest R and ``local`` on the others. With the model's ``tokenizer``,
    :data:`RETRIEVAL_DECODE_RECOMMENDATION`: the same prefill, decode ``local`` on the two thirds of the layers that
    carry the least attention from a pass-key question to its key and exact on the others, ranked on a pass-key probe
    made with the tokenizer (``calibration``: :func:`hf_sparse_attn.retrieval_probe`, 4 prompts of 2048 tokens or the
    model's positions; ``patch_model`` runs the model once on it). Encoder: :data:`ENCODER_RECOMMENDATION`,
    ``sparse_hyper`` on all layers with its defaults (eval/results/kernels_full/results.md); no tokenizer needed.
    The measurements behind each choice: the module docstring and methods/defaults.py.
    """
    if not is_causal_lm(model):
        return copy.deepcopy(ENCODER_RECOMMENDATION)
    if tokenizer is None:
        return copy.deepcopy(CAUSAL_RECOMMENDATION)
    from .retrieval import probe_length, retrieval_probe

    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    probe = retrieval_probe(tokenizer, length=probe_length(positions))
    return {**copy.deepcopy(RETRIEVAL_DECODE_RECOMMENDATION), "calibration": probe}
