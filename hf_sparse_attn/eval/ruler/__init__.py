"""RULER's synthetic long-context tasks, generated offline, plus a pass key at a controlled depth.

Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?". The 11 tasks
without QA (niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery, vt, cwe, fwe) with the official
templates, answer prefixes, output lengths and metrics; the essay haystack is replaced by offline Wikipedia articles.
``passkey`` is the classic pass-key retrieval (filler "The grass is green. ...", 5-digit key at depth 0-100 %).

    from hf_sparse_attn.eval.ruler import TASKS, generate_sample, predict, score
    sample = generate_sample("niah_single_1", tokenizer, 4096, seed=0, index=0)
    pred = predict(model, tokenizer, sample)
    score(sample.task, [pred], [sample.answers])   # 0-100

The command: ``hf-sparse-attn ruler`` (cli.py; docs/ruler.md). Importing this package loads neither torch nor
transformers.
"""

from __future__ import annotations

from typing import Optional

from .metrics import score, string_match_all, string_match_part
from .tasks import (
    PASSKEY_DEPTHS,
    RULER_TASKS,
    TASK_SPECS,
    TASKS,
    LengthTooShortError,
    RulerSample,
    encode_prompt,
    generate_sample,
    minimum_length,
)

__all__ = ["TASKS", "RULER_TASKS", "TASK_SPECS", "PASSKEY_DEPTHS", "RulerSample", "LengthTooShortError",
           "generate_sample", "predict", "score", "string_match_all", "string_match_part", "encode_prompt",
           "minimum_length"]


def predict(model, tokenizer, sample: RulerSample, *, chat_template: bool = True,
            prefill_chunk_size: Optional[int] = None) -> str:
    """Greedy generation of at most ``sample.max_new_tokens`` tokens after the sample's model input
    (:func:`encode_prompt`: the chat template applied to the user turn when ``chat_template`` and the tokenizer has
    one, then the answer prefix); returns the decoded continuation (special tokens skipped). Input ids ``[1, L]``
    on the model's device; the output ``[1, L + new]``. ``prefill_chunk_size``: feed the prompt in chunks of that
    many tokens (transformers' ``generate(prefill_chunk_size=...)``); None: at once."""
    import torch

    ids = encode_prompt(tokenizer, sample.user_text, sample.answer_prefix, chat_template)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    from ...patches.decode_cache import cache_keyword
    from ...patching import generation_cache

    cache = generation_cache(model)  # a GrowingCache where a decode method keeps its index with the cache
    extra = {} if cache is None else {cache_keyword(model): cache}
    if prefill_chunk_size is not None:
        extra["prefill_chunk_size"] = int(prefill_chunk_size)
        if cache is None:  # some transformers releases chunk only into a cache they are given
            from transformers import DynamicCache

            extra[cache_keyword(model)] = DynamicCache()
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=sample.max_new_tokens, do_sample=False, num_beams=1,
                                pad_token_id=pad, **extra)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
