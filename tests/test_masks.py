"""The compact mask path: the registered mask function hands over the [B, N] key padding mask for plain causal or
bidirectional attention and the dense mask for every other form (which then runs exact attention, with the reason
counted); padded batches give the outputs of sdpa, and a padded 32k batch costs no more memory than an unpadded one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers as T

from hf_sparse_attn import patch_model
from hf_sparse_attn.patches.masks import FULL_MASK_REASON, compact_mask, dense_mask

VOCAB = 97


def _llama(attn: str = "sdpa", **overrides):
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **overrides)
    return _set(T.LlamaModel(config).eval(), attn)


def _bert(attn: str = "sdpa"):
    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4)
    return _set(T.BertModel(config).eval(), attn)


def _set(model, attn):
    model.set_attn_implementation(attn)
    return model


def _batch(side: str, n: int = 40):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (2, n), generator=g)
    mask = torch.ones_like(ids)
    if side == "left":
        mask[1, : n // 3] = 0
    else:
        mask[1, n - n // 3:] = 0
    return ids, mask


def _hidden(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


# ---- the mask function itself -------------------------------------------------------------------------------------

def _mask_kwargs(n: int, q_length: int | None = None, offset: int = 0):
    """The keyword arguments transformers passes for the installed version (q_length from 5.x, cache_position in 5.0)."""
    import inspect

    from transformers.masking_utils import sdpa_mask

    q_length = n if q_length is None else q_length
    if "q_length" in inspect.signature(sdpa_mask).parameters:
        return dict(q_length=q_length, q_offset=offset)
    return dict(cache_position=torch.arange(offset, offset + q_length))


def test_compact_mask_hands_over_the_padding_mask_for_plain_masks_and_the_dense_mask_otherwise():
    from transformers.masking_utils import and_masks, bidirectional_mask_function, causal_mask_function, sliding_window_causal_mask_function

    n = 12
    padding = torch.ones(2, n, dtype=torch.bool)
    padding[1, :4] = False
    for fn in (causal_mask_function, bidirectional_mask_function):
        out = compact_mask(batch_size=2, kv_length=n, mask_function=fn, attention_mask=padding, **_mask_kwargs(n))
        assert out.shape == (2, n) and torch.equal(out, padding)
        assert compact_mask(batch_size=2, kv_length=n, mask_function=fn, attention_mask=torch.ones(2, n, dtype=torch.bool),
                            **_mask_kwargs(n)) is None
        assert compact_mask(batch_size=2, kv_length=n, mask_function=fn, attention_mask=None, **_mask_kwargs(n)) is None
    # sliding window, an and-overlay (what packed sequences become), a decode step: the dense mask, as sdpa_mask builds it
    other = [dict(mask_function=sliding_window_causal_mask_function(4), **_mask_kwargs(n)),
             dict(mask_function=and_masks(causal_mask_function, lambda b, h, q, k: k != 5), **_mask_kwargs(n)),
             dict(mask_function=causal_mask_function, **_mask_kwargs(n, q_length=1, offset=n - 1))]
    for kwargs in other:
        out = compact_mask(batch_size=2, kv_length=n, attention_mask=padding, allow_is_causal_skip=False, **kwargs)
        assert out.dim() == 4 and out.shape[0] == 2 and out.shape[-1] == n
    # a decoder run bidirectionally keeps is_causal on its modules: it never gets the compact form
    config = T.LlamaConfig()
    config.is_causal = False
    out = compact_mask(batch_size=2, kv_length=n, mask_function=bidirectional_mask_function, attention_mask=padding,
                       config=config, **_mask_kwargs(n))
    assert out.dim() == 4


def test_dense_mask_is_what_sdpa_mask_builds():
    n = 10
    padding = torch.ones(2, n, dtype=torch.bool)
    padding[0, 7:] = False
    padding[1, :3] = False
    causal = dense_mask(padding, causal=True)
    expected = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & padding[:, None, None, :]
    assert torch.equal(causal, expected)
    assert torch.equal(dense_mask(padding, causal=False), padding[:, None, None, :].expand(2, 1, n, n))


# ---- padded models: the outputs of sdpa ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_give_the_outputs_of_sdpa(family, side):
    build = _llama if family == "llama" else _bert
    ids, mask = _batch(side)
    reference = _hidden(build("sdpa"), ids, mask)
    valid = mask.bool()

    # loaded with attn_implementation="hf_sparse_attn" and not patched: bit-identical to sdpa
    registered = build("hf_sparse_attn")
    assert torch.equal(_hidden(registered, ids, mask), reference)

    # exact method in every layer: served through the key padding mask, never a fallback
    model = build("sdpa")
    plan = patch_model(model, method="exact", layers="all")
    out = _hidden(model, ids, mask)
    assert all(layer.served == 1 and not layer.fallbacks for layer in plan.layers)
    torch.testing.assert_close(out[valid], reference[valid], atol=2e-5, rtol=1e-4)

    # one layer patched: the other stays bit-identical to sdpa (its dense mask rebuilt as sdpa_mask builds it)
    model = build("sdpa")
    patch_model(model, method="exact", layers=[1])
    hidden = {}
    layer0 = (model.layers if family == "llama" else model.encoder.layer)[0]
    layer0.register_forward_hook(lambda m, i, o: hidden.setdefault("out", o[0] if isinstance(o, tuple) else o))
    reference_model = build("sdpa")
    ref_hidden = {}
    ref0 = (reference_model.layers if family == "llama" else reference_model.encoder.layer)[0]
    ref0.register_forward_hook(lambda m, i, o: ref_hidden.setdefault("out", o[0] if isinstance(o, tuple) else o))
    _hidden(model, ids, mask)
    _hidden(reference_model, ids, mask)
    assert torch.equal(hidden["out"], ref_hidden["out"])


def test_packed_sequences_and_sliding_windows_run_exact_attention_with_the_reason_counted():
    # packed sequences: position ids restart inside a row -> a block-diagonal causal mask, not causal + padding
    ids = torch.randint(1, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.cat([torch.arange(10), torch.arange(14)])[None]
    reference_model = _llama("sdpa")
    with torch.no_grad():
        reference = reference_model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    model = _llama("sdpa")
    plan = patch_model(model, method="exact", layers="all")
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    assert torch.equal(out, reference)
    assert all(layer.served == 0 and layer.fallbacks == {FULL_MASK_REASON: 1} for layer in plan.layers)

    # a sliding window shorter than the sequence (Mistral)
    torch.manual_seed(0)
    config = T.MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    mistral = _set(T.MistralModel(config).eval(), "sdpa")
    ids, mask = _batch("left", n=24)
    reference = _hidden(mistral, ids, mask)
    plan = patch_model(mistral, method="exact", layers="all")
    assert torch.equal(_hidden(mistral, ids, mask), reference)
    assert plan.layers[0].served == 0 and plan.layers[0].fallbacks == {FULL_MASK_REASON: 1}


# ---- memory: a padded 32k batch of 2 costs what an unpadded one costs ---------------------------------------------

_MEMORY_SCRIPT = r"""
import json, resource, sys
import torch, transformers as T
from hf_sparse_attn import patch_model
torch.set_num_threads(1)
padded = sys.argv[1] == "padded"
n = 32768
torch.manual_seed(0)
config = T.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=n)
model = T.LlamaModel(config).eval()
model.set_attn_implementation("sdpa")
plan = patch_model(model, method="local", layers="all", window=64, num_sink_tokens=16, min_seq_len=1024)
ids = torch.randint(1, 64, (2, n))
mask = torch.ones_like(ids)
if padded:
    mask[1, n - n // 4:] = 0
with torch.no_grad():
    model(input_ids=ids, attention_mask=mask)
print(json.dumps({"max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "served": plan.layers[0].served,
                  "fallbacks": plan.layers[0].fallbacks}))
"""


def _peak_rss_kb(kind: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, kind], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_padded_32k_batch_peaks_within_25_percent_of_an_unpadded_one():
    unpadded, padded = _peak_rss_kb("unpadded"), _peak_rss_kb("padded")
    assert unpadded["served"] == padded["served"] == 1 and not padded["fallbacks"]
    # a dense [2, 1, 32k, 32k] boolean mask alone would be 2 GiB
    assert padded["max_rss_kb"] <= 1.25 * unpadded["max_rss_kb"], (padded, unpadded)
