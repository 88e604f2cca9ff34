"""LongBench (v1) metrics, scoring exactly as the official scorer does.

Every function takes ``(prediction: str, ground_truth: str, all_classes=None)`` and returns a float in [0, 1];
the dataset score is ``100 * mean over samples of (max over reference answers)``, done in ``score.py``.

Equality with the official numbers (to the second decimal) rests on three choices:

- ROUGE-L F comes from the pip package ``rouge`` (``Rouge().get_scores([pred], [ref], avg=True)["rouge-l"]["f"]``),
  the library the official scorer imports. It is *not* rouge-score: ``rouge`` splits on "." into sentences and
  computes summary-level ROUGE-L, which gives different numbers. ``rouge`` raises on an empty hypothesis
  ("Hypothesis is empty.") and hits ``RecursionError`` on very long sentences; the official code catches every
  exception and scores 0.0, and so do we.
- The fuzzy ratio of the code tasks is fuzzywuzzy's ``fuzz.ratio`` *as the official requirements install it*,
  i.e. without python-Levenshtein, where fuzzywuzzy falls back to ``difflib.SequenceMatcher``. We compute it
  with difflib ourselves (``fuzzy_ratio``), so installing python-Levenshtein (whose ratio is
  2*LCS/(len1+len2), not difflib's greedy matching-block ratio) cannot change our scores.
- Chinese words come from ``jieba.cut(text, cut_all=False)`` with jieba's default dictionary.

``classification_score`` reproduces two quirks of the official code on purpose, because they change numbers:
the "drop a matched class that is a substring of the ground truth" loop removes items from the list it iterates
(so it skips the element after each removal), and the difflib fallback for "no class matched" is unreachable
(the official guard is ``if em_match_list != 0``, always true for a list), so a prediction matching no class
scores 0.
"""

from __future__ import annotations

import difflib
import logging
import re
import string
from collections import Counter
from typing import Callable, Optional, Sequence

__all__ = [
    "normalize_answer",
    "normalize_zh_answer",
    "qa_f1_score",
    "qa_f1_zh_score",
    "rouge_score",
    "rouge_zh_score",
    "classification_score",
    "retrieval_score",
    "retrieval_zh_score",
    "count_score",
    "code_sim_score",
    "fuzzy_ratio",
    "METRICS",
    "get_metric",
]

_EN_PUNCTUATION = set(string.punctuation)
# Chinese / full-width punctuation removed by the official normalize_zh_answer (plus ASCII punctuation).
_ZH_PUNCTUATION = set(
    string.punctuation
    + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """English SQuAD-style normalization: lowercase, drop ASCII punctuation, drop the articles a/an/the,
    collapse whitespace (in that order)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _EN_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Chinese normalization: lowercase, drop ASCII + Chinese punctuation, remove all whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _ZH_PUNCTUATION)
    return "".join(text.split())


def _jieba_words(text: str) -> list[str]:
    import jieba  # imported lazily: loading its dictionary takes ~1 s

    jieba.setLogLevel(logging.WARNING)
    return list(jieba.cut(text, cut_all=False))


def _token_f1(prediction_tokens: Sequence[str], ground_truth_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1 (multiset overlap)."""
    num_same = sum((Counter(prediction_tokens) & Counter(ground_truth_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    """Token F1 after English normalization (narrativeqa, qasper, multifieldqa_en, hotpotqa, 2wikimqa, musique,
    triviaqa)."""
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    """Token F1 over jieba words, each word normalized, empty words dropped (multifieldqa_zh)."""

    def words(text: str) -> list[str]:
        normalized = (normalize_zh_answer(w) for w in _jieba_words(text))
        return [w for w in normalized if w]

    return _token_f1(words(prediction), words(ground_truth))


def rouge_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    """ROUGE-L F of the ``rouge`` package (summary level, sentences split on "."); 0.0 where it raises
    (empty hypothesis or reference, recursion limit on very long sentences), as the official code does."""
    from rouge import Rouge

    try:
        scores = Rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # the official scorer uses a bare except and returns 0.0
        return 0.0
    return float(scores["rouge-l"]["f"])


def rouge_zh_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    """ROUGE-L F over jieba words joined by spaces (dureader, vcsum)."""
    return rouge_score(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(ground_truth)))


def classification_score(prediction: str, ground_truth: str, all_classes: Optional[Sequence[str]] = None) -> float:
    """Class-name matching (trec, lsht): 1/len(matches) if the ground truth is among the class names found in the
    prediction, else 0. See the module docstring for the two official quirks reproduced here."""
    if not all_classes:
        raise ValueError("classification_score needs all_classes (the task's list of class names)")
    matches = [name for name in all_classes if name in prediction]
    # Official loop: `for m in matches: if m in gt and m != gt: matches.remove(m)`. Removing while iterating
    # skips the element right after each removal; we replay the same index walk explicitly.
    index = 0
    while index < len(matches):
        name = matches[index]
        if name in ground_truth and name != ground_truth:
            matches.remove(name)  # removes the first equal element, as list.remove does in the official loop
        index += 1
    if ground_truth in matches:
        return 1.0 / len(matches)
    return 0.0


def _answer_number_score(prediction: str, answer_number: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(1 for n in numbers if n == answer_number) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    """passage_retrieval_en: the ground truth reads "Paragraph k"; score = share of the numbers in the
    prediction equal to k."""
    found = re.findall(r"Paragraph (\d+)", ground_truth)
    if not found:
        raise ValueError(f"retrieval ground truth must contain 'Paragraph <n>', got {ground_truth!r}")
    return _answer_number_score(prediction, found[0])


def retrieval_zh_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    """passage_retrieval_zh: the ground truth reads "段落k"."""
    found = re.findall(r"段落(\d+)", ground_truth)
    if not found:
        raise ValueError(f"retrieval_zh ground truth must contain '段落<n>', got {ground_truth!r}")
    return _answer_number_score(prediction, found[0])


def count_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    """passage_count: share of the numbers in the prediction equal to the ground truth."""
    return _answer_number_score(prediction, str(ground_truth))


def fuzzy_ratio(a: str, b: str) -> int:
    """fuzzywuzzy ``fuzz.ratio`` on its pure-Python path: 100 if equal, 0 if either is empty, else
    ``int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))`` (autojunk on, Python's round-half-even)."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    """lcc, repobench-p: fuzzy ratio / 100 between the ground truth and the first line of the prediction
    (leading newlines stripped) that contains no "`", "#" or "//"; the empty string if there is none."""
    first_code_line = ""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            first_code_line = line
            break
    return fuzzy_ratio(first_code_line, ground_truth) / 100


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score,
    "qa_f1_zh": qa_f1_zh_score,
    "rouge": rouge_score,
    "rouge_zh": rouge_zh_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "retrieval_zh": retrieval_zh_score,
    "count": count_score,
    "code_sim": code_sim_score,
}


def get_metric(name: str) -> Callable[..., float]:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"unknown LongBench metric {name!r}; choose one of {sorted(METRICS)}") from None
