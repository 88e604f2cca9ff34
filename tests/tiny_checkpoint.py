"""A tiny random Llama checkpoint with a word-level tokenizer built offline (tokenizers), for the ecosystem tests."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the a an cat dog bird fish tree house river city sun moon star sky sea road car book door hand eye "
         "red blue green small big old new fast slow warm cold good bad one two three four five is was has had "
         "runs sees eats finds makes takes gives and or but if then so of in on at to from by with near far "
         "yes no what who where when why how answer question true false left right up down day night king queen "
         "apple bread water fire stone wind rain snow").split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def build_tokenizer():
    """A PreTrainedTokenizerFast over a fixed word list (ids 0..len-1), whitespace pre-tokenized."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_llama(vocab_size: int, seed: int = 0, num_layers: int = 3):
    import transformers as T

    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return T.LlamaForCausalLM(config).eval()


def save_tiny_checkpoint(directory: Path, seed: int = 0, with_tokenizer: bool = True):
    """(model, tokenizer) saved to ``directory`` (float32 safetensors, optionally the tokenizer files)."""
    tokenizer = build_tokenizer()
    model = tiny_llama(len(tokenizer), seed=seed)
    model.save_pretrained(directory)
    if with_tokenizer:
        tokenizer.save_pretrained(directory)
    return model, tokenizer


def greedy_steps(forward, ids, mask, cache, steps: int = 3):
    """Logits [B, steps + 1, V]: a prefill of ids [B, n] (mask [B, n]) into ``cache`` from position 0, then ``steps``
    greedy single-token steps (``forward``: a model or its compiled form)."""
    import torch

    n = ids.shape[1]
    logits = [forward(ids, attention_mask=mask, past_key_values=cache, use_cache=True,
                      cache_position=torch.arange(n)).logits[:, -1]]
    for step in range(steps):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits.append(forward(logits[-1].argmax(-1, keepdim=True), attention_mask=mask, past_key_values=cache,
                              use_cache=True, cache_position=torch.tensor([n + step])).logits[:, -1])
    return torch.stack(logits, dim=1)
