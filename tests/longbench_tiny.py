"""Tiny random models and LongBench-format samples for the LongBench, CLI and stress tests.

``tiny_llama(dir)``: a 2-layer random Llama (hidden 64) with a small byte-level BPE tokenizer trained here and a
chat template, saved to ``dir`` so that subprocesses load it with ``--model dir``. ``tiny_bert(dir)``: the same for
a 2-layer random BERT (head-tail / sparsity)."""

from __future__ import annotations

import json
import os
import random

import torch

WORDS = ("river city music history school north station paper light garden winter army village market "
         "bridge island church mountain river valley summer king queen island road").split()


def sentence(rng: random.Random, n: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def samples(task: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` LongBench-format samples (context, input, answers, length, all_classes, _id) of random sentences."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        context = " ".join(sentence(rng) for _ in range(rng.randint(5, 60)))
        out.append({"input": f"Which word comes first in sample {i}?", "context": context,
                    "answers": [context.split()[0]], "length": len(context.split()) * 100,
                    "all_classes": None, "dataset": task, "language": "en", "_id": f"{task}-{i:03d}"})
    return out


def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    texts = [sentence(rng) for _ in range(300)] + ["Question: Answer: Paragraph Summary:\n\n"] * 20
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>", "<pad>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = ("{% for m in messages %}<s>[USER] {{ m['content'] }}{% endfor %}"
                               "{% if add_generation_prompt %} [BOT]{% endif %}")
    return tokenizer


def tiny_llama(model_dir: str):
    """(model, tokenizer) of a tiny random Llama, also saved to ``model_dir``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model, tokenizer


def tiny_bert(model_dir: str, max_positions: int = 128):
    """(model, tokenizer) of a tiny random BERT encoder (2 layers, 4 heads), also saved to ``model_dir``."""
    from transformers import BertConfig, BertModel

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=max_positions, pad_token_id=2,
                        architectures=["BertModel"])
    model = BertModel(config).eval()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model, tokenizer


def cli_env() -> dict:
    """Environment of a CLI subprocess: one thread, offline, the repository importable."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
