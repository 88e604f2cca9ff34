"""The recommended ``patch_model`` arguments for a kind of model, from the project's measurements.

    from hf_sparse_attn import patch_model, recommended
    plan = patch_model(model, **recommended(model))

Causal LMs: ``block_select`` on all layers with its defaults: 64 attention sinks + an exact window of 512 + 512 keys
per row chosen by MInference's vertical estimate (Jiang et al. 2024; the last 64 rows' attention mass, single key
columns), the same key budget per row as ``local`` w1024. Why it replaced ``local`` (StreamingLLM, Xiao et al. 2023):
``local`` loses facts far behind its window. On real SmolLM2-135M at ~8k tokens a pass key at depths 10/30/50% is kept
by ``block_select`` (3/3) and lost by ``local`` (0/3) (docs/methods/block_select.md#measured, scripts/passkey_quick.py),
at ``local``'s kernel speed at 8k (2.48x SDPA each; 9.35x at 32k, ``local`` 9.76x) with a lower per-layer error on real q/k/v (0.106
against 0.178): eval/results/kernels_block_select/results.md. Its cost: perplexity on one 8k article +3.2% against
``local``'s +2.0% (quick check; ``local`` on 20 articles: +3.5% at 1.62x prefill,
eval/results/model_bench_causal/frontier.md). Measured on all three axes at 8k
(eval/results/ruler_frontier_smollm2/frontier.md, eval/results/model_bench_block_select/results.md): of the 4 pass keys
(of 11, depths 0-100%) the unpatched model finds, ``block_select`` keeps 4 and ``local`` 1. Prefill, the exact model
and each plan timed article by article in turn on the same 10 articles: 1.50x (1.43-1.59x) against ``local`` w1024's
1.52x (1.50-1.53x) (eval/results/model_bench_block_select_w512_paired/results.md,
eval/results/model_bench_frontier_paired/results.md; in its own first run 1.77x, with the other core idle 1.66x:
eval/results/model_bench_block_select_quiet/results.md); perplexity +6.3% (+2.7..+13.0%) against ``local``'s +3.3%. On
RULER's niah_single_1 / niah_single_2 at 8k (20 samples each) it scores what the unpatched model scores (90 / 55),
keeping 18 of 18 and 10 of 11 of its answers (eval/results/ruler_niah_8k/frontier.md); the pass key at depths 0-100%
(22 keys) 45 against the unpatched 41 (keeps 9 of 9), niah_multikey_1 36 against 41 (keeps 8 of 9), vt 14 against 14;
``local`` w1024 9 (keeps 2 of 9), 0 (keeps none of 9) and 0 (eval/results/ruler_recommended_8k/frontier.md), and
niah_single_1 / niah_single_2 65 / 10 (keeps 13 of 18 and 2 of 11).
:data:`WINDOW_BY_R_RECOMMENDATION` (window 1024 on the half of the layers of largest R, 512 on the others, through
``patch_model``'s ``other_layers``) costs less perplexity, +3.6% on the same 10 articles, at 1.41x timed as above
(eval/results/model_bench_frontier_paired/results.md; 1.59x in its own run), but kept fewer facts: niah_multikey_1 27
(6 of 9), pass key 41 (8 of 9). The intervals of 22 samples overlap, so that is not a difference; facts come first, so it is not the
default. Window 768 with 256 selected columns (``local`` w1024's keys per row) runs at ``local``'s speed, 1.54x at +4.3%
(eval/results/model_bench_block_select_w768_s256_paired/results.md), but kept one niah_multikey_1 answer fewer (7 of
9). :data:`LOCAL_RECOMMENDATION` keeps ``local``'s arguments for whoever prefers its perplexity.

Decode steps, generated with ``generation_cache(model)`` (a ``GrowingCache``): ``exact`` (grouped attention over the
cache) on the two thirds of the layers of largest R and ``local`` (sinks + window 1024) on the others. On SmolLM2 at 8k
that decodes 1.53x faster per generated token than the unpatched model with a ``DynamicCache``
(eval/results/decode_split_smollm2/results.md) and keeps every pass key (9 of 9) and niah_multikey_1 answer (8 of 9,
22 samples each) that exact decode on every layer keeps (eval/results/ruler_recommended_8k/frontier.md). With a
tokenizer, ``recommended(model, tokenizer)`` ranks the layers by the needle attention of a pass-key probe instead and
decodes exactly on the third of most: 1.54x (exact decode on every layer 1.17x in the same run), the same facts kept (eval/results/decode_split_retrieval_smollm2/
results.md). ``local`` on every layer (2.1x) keeps 1 of 4 pass keys; ``quest`` keeps them at a budget of 2048 keys at
about exact decode's speed at 8k (docs/methods/decode.md, eval/results/ruler_frontier_smollm2/frontier.md). At 16k
(YaRN) the prefill itself loses pass keys (eval/results/ruler_decode_16k/frontier.md).

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
                               LOCAL_NUM_SINK_TOKENS, LOCAL_WINDOW)

# The previous causal recommendation (eval/results/model_bench_causal/frontier.md): better perplexity, loses far facts.
LOCAL_RECOMMENDATION = {"method": "local", "layers": "all", "window": LOCAL_WINDOW,
                        "num_sink_tokens": LOCAL_NUM_SINK_TOKENS, "min_seq_len": LOCAL_MIN_SEQ_LEN}
# block_select's prefill with its defaults, spelled out (every layer of the causal recommendations runs it)
BLOCK_SELECT_PREFILL = {"method": "block_select", "selection": BLOCK_SELECT_SELECTION, "window": BLOCK_SELECT_WINDOW,
                        "num_sink_tokens": BLOCK_SELECT_NUM_SINK_TOKENS, "num_selected": BLOCK_SELECT_NUM_SELECTED,
                        "block_size": BLOCK_SELECT_BLOCK_SIZE, "probe_queries": BLOCK_SELECT_PROBE_QUERIES,
                        "min_seq_len": BLOCK_SELECT_MIN_SEQ_LEN}
LOCAL_DECODE = {"decode_method": "local",
                "decode_params": {"window": LOCAL_WINDOW, "num_sink_tokens": LOCAL_NUM_SINK_TOKENS}}
# The prefill on every layer; decode exact on the layers of largest R, sinks + window on the others
# (methods/defaults.py DECODE_EXACT_LAYERS_BY_R).
CAUSAL_RECOMMENDATION = {**BLOCK_SELECT_PREFILL, "layers": DECODE_EXACT_LAYERS_BY_R, "select": "weight_norm",
                         "decode_method": "exact", "other_layers": {**BLOCK_SELECT_PREFILL, **LOCAL_DECODE}}
# The same prefill; decode sinks + window on the layers of least needle mass on a pass-key probe (select="retrieval",
# which needs the probe: recommended(model, tokenizer) adds it as ``calibration``), exact on the others
# (methods/defaults.py DECODE_LOCAL_LAYERS_BY_RETRIEVAL).
RETRIEVAL_DECODE_RECOMMENDATION = {**BLOCK_SELECT_PREFILL, "layers": DECODE_LOCAL_LAYERS_BY_RETRIEVAL,
                                   "select": "retrieval", **LOCAL_DECODE,
                                   "other_layers": {**BLOCK_SELECT_PREFILL, "decode_method": "exact"}}
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

    Causal LM: :data:`CAUSAL_RECOMMENDATION`, ``block_select``'s prefill with its defaults on every layer
    (eval/results/kernels_block_select/results.md, docs/methods/block_select.md#measured); decode exact on the two
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
