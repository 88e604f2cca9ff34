"""The decode-step mask: transformers' mask for q_len < kv_len reduced to the key padding mask (patches/decode_step.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hf_sparse_attn.patches.decode_step import decode_key_padding_mask

sys.path.insert(0, str(Path(__file__).parent))
from tiny_checkpoint import tiny_llama  # noqa: E402


def _dense(padding: torch.Tensor, q_len: int) -> torch.Tensor:
    """causal over the last q_len positions AND the key padding mask: [B, 1, q_len, kv_len] bool."""
    kv_len = padding.shape[1]
    rows = torch.arange(q_len)[:, None]
    causal = torch.arange(kv_len)[None, :] <= rows + kv_len - q_len
    return (causal[None] & padding[:, None, :])[:, None]


@pytest.mark.parametrize("q_len", [1, 3])
def test_causal_plus_left_padding_is_recognised(q_len):
    padding = torch.ones(3, 10, dtype=torch.bool)
    padding[1, :4] = False
    padding[2, :1] = False
    ok, kpm = decode_key_padding_mask(_dense(padding, q_len), q_len, 10)[:2]
    assert ok and torch.equal(kpm, padding)
    ok, kpm = decode_key_padding_mask(_dense(torch.ones(2, 10, dtype=torch.bool), q_len), q_len, 10)[:2]
    assert ok and kpm is None  # nothing masked
    assert decode_key_padding_mask(None, q_len, 10)[:2] == (True, None)
    ok, kpm = decode_key_padding_mask(padding.long(), q_len, 10)[:2]  # the 2-D form (0/1)
    assert ok and torch.equal(kpm, padding)


def test_other_masks_are_not_recognised():
    padding = torch.ones(2, 10, dtype=torch.bool)
    hole = padding.clone()
    hole[0, 5] = False  # a masked key after a visible one: not left padding
    assert decode_key_padding_mask(_dense(hole, 1), 1, 10)[:2] == (False, None)
    assert decode_key_padding_mask(hole, 1, 10)[:2] == (False, None)
    not_causal = _dense(padding, 3).clone()
    not_causal[0, 0, 0, -1] = True  # row 0 sees a key after its position
    assert decode_key_padding_mask(not_causal, 3, 10)[:2] == (False, None)
    additive = torch.zeros(2, 1, 1, 10)  # only boolean dense masks are read
    assert decode_key_padding_mask(additive, 1, 10)[:2] == (False, None)
    assert decode_key_padding_mask(padding, 1, 11)[:2] == (False, None)  # wrong length


def test_the_mask_transformers_builds_for_a_left_padded_decode_step_is_recognised(monkeypatch):
    """generate() on a left-padded batch: every decode step's mask, as the attention function receives it, reduces to
    the padding of the prompt plus the generated tokens."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_llama(64)
    model.set_attn_implementation("sdpa")
    seen = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, query, key, value, attention_mask, **kwargs):
        if query.shape[2] != key.shape[2] and module.layer_idx == 0:
            seen.append((attention_mask, query.shape[2], key.shape[2]))
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert len(seen) == 3  # the steps after the prefill
    for attention_mask, q_len, kv_len in seen:
        ok, kpm = decode_key_padding_mask(attention_mask, q_len, kv_len)[:2]
        assert ok, attention_mask
        expected = torch.cat([mask.bool(), torch.ones(2, kv_len - 5, dtype=torch.bool)], dim=1)
        assert torch.equal(kpm, expected)


def test_a_static_caches_empty_slots_and_a_missing_mask_are_read_as_sdpa_reads_them():
    padding = torch.ones(2, 10, dtype=torch.bool)
    padding[1, :3] = False
    dense = _dense(padding, 2)  # causal + padding over 10 valid positions
    static = torch.cat([dense, torch.zeros(2, 1, 2, 6, dtype=torch.bool)], dim=-1)  # 6 empty slots
    ok, kpm, kv_len = decode_key_padding_mask(static, 2, 16)
    assert ok and kv_len == 10 and torch.equal(kpm, padding)
    static[0, 0, 0, 12] = True  # a slot after the valid positions seen: not a static cache's mask
    assert not decode_key_padding_mask(static, 2, 16).recognised
    # no mask: sdpa's is_causal aligns top-left (a prefill into a preallocated cache), else every key is seen
    assert decode_key_padding_mask(None, 8, 11, causal=True) == (True, None, 8)
    assert decode_key_padding_mask(None, 1, 11) == (True, None, 11)
