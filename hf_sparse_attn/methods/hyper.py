"""``hyper``: HyperAttention (Han et al. 2023), written from the paper.

Non-causal (HyperAttention Algorithms 1-3 with the sortLSH of lsh.py):
  1. sortLSH: hash queries and keys with ``lsh_num_projs`` random hyperplanes per head, order the bucket codes
     in Gray order, sort the queries once and the keys once (lsh.py).
  2. Block diagonal: query block b of the sorted order (``block_size`` queries) attends key block b exactly.
  3. Sampled residual: ``sample_size`` = s keys drawn uniformly with replacement from the n valid keys of the
     row group, each weighted n/s (score + log(n/s)); a sample inside the query's own key block is masked out,
     since that block is already counted exactly (the public code double-counts it on its CPU/fp32 path).
  4. Both parts are merged through their log-sum-exp values:
         lse = log(e^{lse_block} + e^{lse_sample}),  out = sum_part e^{lse_part - lse} out_part
     (done inside one softmax over the concatenated key set, see sorted_blocks.py).
Causal: recursive halving - the two diagonal halves causal (recursively), the off-diagonal quadrant with the
non-causal algorithm above - down to exact causal attention once a piece is <= ``min_seq_len``
(flattened into one batched call per level, see causal_recursion.py). ``causal_mode="single_pass"`` instead attends,
in one pass, the sinks, an exact window of the previous ``window`` positions, the most recent ``block_size`` keys of
the query's own LSH bucket before that window, and ``sample_size`` uniform samples of the remaining earlier keys with
the unbiased weight n_c / s (single_pass.single_pass_causal_attention; docs/methods/hyper.md "Single pass").

Attention sinks (``num_sink_tokens`` = S, our addition; StreamingLLM's observation that LLM heads put much of each
row's mass on the first tokens): every query also attends keys 0..S-1 exactly (causal: those <= its position),
merged with the result above through lse; those keys are removed from the sorted blocks and from the samples
(sinks.split_sink_keys / sink_attention; docs/methods/hyper.md "Attention sinks"). A left-padded row is
first rolled past its padding (padding.move_leading_padding_to_end), so its sinks are its first real tokens.
Default: NUM_SINK_TOKENS below, chosen from the SmolLM2 measurement.

Tensors: q [B, H, Nq, D], k/v [B, H, Nk, D] (GQA expanded), key_padding_mask [B, Nk] bool (True = attend);
returns out [B, H, Nq, D] in q's dtype (float32 accumulation) and lse [B, H, Nq] float32 (-inf, out 0 for a
row with no key). Padded keys are never attended: they sort after every bucket, are masked in their block,
and are never sampled. Hashing and sampling come from ``generator`` (or a CPU generator seeded with ``seed``).
No [N, N] tensor is formed: the largest score tile is [block_size, block_size + sample_size] per block.

min_seq_len default: the measured crossover where ``hyper`` becomes faster than torch SDPA on the project's
2-core CPU VM (B=1, H=8, D=64, fp32): ``MIN_SEQ_LEN`` in defaults.py, with the result that chose it.
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import check_inputs
from .defaults import (BLOCK_SIZE, SAMPLE_SIZE, CAUSAL_CROSSOVER_FACTOR, CAUSAL_MIN_SEQ_LEN, CAUSAL_MODE, CAUSAL_MODES, MIN_SEQ_LEN,  # noqa: F401
                       NUM_SINK_TOKENS, SINGLE_PASS_WINDOW)
from .lsh import make_generator
from .registry import MAX_SAMPLES_PER_KEY, MAX_TOKENS, Param, register_method, self_attention_only
from .causal_recursion import sorted_lsh_attention
from .padding import leading_padding, move_leading_padding_to_end
from .single_pass import single_pass_causal_attention
from .sinks import add_sinks_and_restore, split_sink_keys

# Measured defaults (each with the result that chose it): defaults.py.
WINDOW = SINGLE_PASS_WINDOW


def causal_threshold(params: dict) -> int:
    """The causal fallback length of ``params``: ``causal_min_seq_len``, or when it is 0 (auto) the measured causal
    crossover CAUSAL_CROSSOVER_FACTOR x min_seq_len (the same factor for both causal modes)."""
    explicit = int(params.get("causal_min_seq_len", CAUSAL_MIN_SEQ_LEN) or 0)
    if explicit > 0:
        return explicit
    return CAUSAL_CROSSOVER_FACTOR * int(params.get("min_seq_len", MIN_SEQ_LEN))


def hyper_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float,
    key_padding_mask: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    lsh_num_projs: int = 7,
    block_size: int = BLOCK_SIZE,
    sample_size: int = SAMPLE_SIZE,
    min_seq_len: int = MIN_SEQ_LEN,
    seed: int = 0,
    causal_min_seq_len: int = CAUSAL_MIN_SEQ_LEN,
    num_sink_tokens: int = NUM_SINK_TOKENS,
    causal_mode: str = CAUSAL_MODE,
    window: int = WINDOW,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HyperAttention. q [B, H, Nq, D], k/v [B, H, Nk, D] -> (out [B, H, Nq, D] q's dtype, lse [B, H, Nq] float32).

    ``causal_min_seq_len`` is read only by the adapter's check (``check_sorted_lsh``): called directly, the method
    always approximates (recursive: exact for causal N <= min_seq_len, a single leaf; single pass: exact for
    N <= num_sink_tokens + window + 1, where the window holds every key).

    ``causal_mode`` picks the causal algorithm: "recursive" (HyperAttention's) or "single_pass" (sinks + exact
    window of ``window`` positions + causal LSH block + ``sample_size`` samples of the rest, one pass;
    docs/methods/hyper.md "Single pass"). Non-causal calls ignore ``causal_mode`` and ``window``.
    """
    check_inputs(q, k, v, causal, key_padding_mask)
    if block_size < 1 or sample_size < 0 or num_sink_tokens < 0 or window < 0:
        raise ValueError(f"hyper: block_size must be >= 1, sample_size, num_sink_tokens and window >= 0, got "
                         f"{block_size}, {sample_size}, {num_sink_tokens}, {window}")
    if causal_mode not in CAUSAL_MODES:
        raise ValueError(f"hyper: causal_mode must be one of {list(CAUSAL_MODES)}, got {causal_mode!r}")
    gen = make_generator(generator, seed)
    # sizes past the sequence length are capped at it (same output as the capped value; memory follows the input)
    n_keys, n_max = max(1, k.shape[2]), max(1, q.shape[2], k.shape[2])
    block_size, window = min(block_size, n_max), min(window, n_keys)
    sample_size = min(sample_size, MAX_SAMPLES_PER_KEY * n_keys)
    num_sinks = min(num_sink_tokens, k.shape[2])
    shift = leading_padding(key_padding_mask) if num_sinks > 0 else None
    if shift is not None:  # left padding: the sinks must be each row's first real tokens, not its padding
        q, k, v, key_padding_mask = move_leading_padding_to_end(q, k, v, key_padding_mask, shift)
    if causal and causal_mode == "single_pass":
        out, lse, _ = single_pass_causal_attention(q, k, v, scale=scale, key_valid=key_padding_mask, generator=gen,
                                                   lsh_num_projs=lsh_num_projs, block_size=block_size,
                                                   sample_size=sample_size, window=window, num_sink_tokens=num_sinks)
    else:
        k_rest, v_rest, rest_mask = split_sink_keys(k, v, key_padding_mask, num_sinks, causal)
        out, lse, _ = sorted_lsh_attention(q, k_rest, v_rest, causal=causal, scale=scale, key_padding_mask=rest_mask,
                                           generator=gen, lsh_num_projs=lsh_num_projs, block_size=block_size,
                                           sample_size=sample_size, min_seq_len=min_seq_len)
    out, lse = add_sinks_and_restore(out, lse, q, k, v, num_sinks=num_sinks, causal=causal, scale=scale,
                                     key_padding_mask=key_padding_mask, shift=shift)
    return out.to(q.dtype), lse


def check_sorted_lsh(q: torch.Tensor, k: torch.Tensor, causal: bool, key_padding_mask: Optional[torch.Tensor],
                     params: dict) -> Optional[str]:
    """Why ``hyper`` / ``sparse_hyper`` cannot serve a call (None when it can): a call that is not self-attention
    (q_len != kv_len: the adapter's decision sends those to exact attention before it asks this check; a direct call
    gets the same words), or a causal call shorter than ``causal_min_seq_len`` (where the causal recursion is slower
    than exact attention; the bidirectional threshold is ``min_seq_len``, applied by the adapter's decision to every
    call)."""
    reason = self_attention_only(q, k)
    if reason:
        return reason
    causal_min = causal_threshold(params)
    if causal and k.shape[2] < causal_min:
        return f"causal seq_len < causal_min_seq_len={causal_min}"
    return None


HYPER_PARAMS = {
    "lsh_num_projs": Param(kind=int, low=1, high=16, help="random hyperplanes of the angular sortLSH (2^P Gray-ordered buckets)"),
    "block_size": Param(kind=int, low=1, high=MAX_TOKENS, help="queries per sorted block; each attends one key block exactly"),
    "sample_size": Param(kind=int, low=0, high=MAX_TOKENS, help="keys sampled uniformly per head, weight n/s, own block masked"),
    "min_seq_len": Param(kind=int, low=1, high=MAX_TOKENS, help="exact attention below this length; leaf size of the causal recursion"),
    "seed": Param(kind=int, low=0, help="seed of hashing and sampling when no generator is passed"),
    "causal_min_seq_len": Param(kind=int, low=0, high=MAX_TOKENS,
                                help="the adapter runs exact attention for causal calls shorter than this; "
                                     f"0 = auto = {CAUSAL_CROSSOVER_FACTOR} x min_seq_len (the measured causal crossover of both modes)"),
    "num_sink_tokens": Param(kind=int, low=0, high=MAX_TOKENS,
                             help="every query also attends the first num_sink_tokens real keys exactly (attention sinks; left padding skipped), "
                                  "merged via lse; they are excluded from the sorted blocks and the samples"),
    "causal_mode": Param(kind=str, choices=CAUSAL_MODES,
                         help="causal algorithm: 'single_pass' (sinks + exact window + causal LSH block + samples, one pass) "
                              "or 'recursive' (HyperAttention's recursive halving with exact leaves of min_seq_len)"),
    "window": Param(kind=int, low=0, high=MAX_TOKENS,
                    help="single_pass: every query attends the previous `window` positions (and the earlier ones of its "
                         "64-query chunk) exactly"),
}

register_method(
    "hyper",
    hyper_attention,
    params=HYPER_PARAMS,
    check=check_sorted_lsh,
    min_seq_len_param="min_seq_len",
    source="HyperAttention (Han et al. 2023), Algorithms 1-3; causal recursion",
    summary="sortLSH block diagonal + uniformly sampled residual, merged via lse",
)
