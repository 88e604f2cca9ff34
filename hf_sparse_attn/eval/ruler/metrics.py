"""RULER's scoring (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?";
the official ``scripts/eval/synthetic/constants.py`` and ``evaluate.py``), written from the published definitions.

- Post-processing of a prediction: strip, replace every non-printable character (``\\x00``-``\\x1f``) with a newline,
  strip again.
- ``string_match_all`` (niah, vt, cwe, fwe, and our passkey): per sample, the fraction of the reference strings found
  in the prediction (case-insensitive substring); task score = mean x 100, rounded to 2 decimals.
- ``string_match_part`` (the QA tasks): per sample, 1 if any reference is found; mean x 100, rounded to 2 decimals.
"""

from __future__ import annotations

import re
from typing import Sequence

__all__ = ["postprocess", "string_match_all", "string_match_part", "sample_hits", "score", "METRICS", "task_metric"]

_NON_PRINTABLE = re.compile(r"[\x00-\x1f]")


def postprocess(prediction: str) -> str:
    """strip, non-printable characters -> newline, strip (official ``postprocess_pred``)."""
    return _NON_PRINTABLE.sub("\n", prediction.strip()).strip()


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    for refs in references:
        if isinstance(refs, str) or not refs:
            raise ValueError(f"each sample's references must be a non-empty list of strings, got {refs!r}")


def sample_hits(prediction: str, references: Sequence[str]) -> list[bool]:
    """For each reference string: found in the (post-processed) prediction, ignoring case."""
    pred = postprocess(prediction).lower()
    return [ref.lower() in pred for ref in references]


def string_match_all(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over samples of the fraction of references found, x 100, rounded to 2 decimals."""
    _check(predictions, references)
    total = sum(sum(sample_hits(p, refs)) / len(refs) for p, refs in zip(predictions, references))
    return round(total / len(predictions) * 100, 2)


def string_match_part(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over samples of 1 if any reference is found, x 100, rounded to 2 decimals."""
    _check(predictions, references)
    total = sum(float(any(sample_hits(p, refs))) for p, refs in zip(predictions, references))
    return round(total / len(predictions) * 100, 2)


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def task_metric(task: str) -> str:
    """The metric name of a task: string_match_all for every generated task (qa_1 / qa_2 would use
    string_match_part)."""
    from .tasks import TASK_SPECS

    if task in ("qa_1", "qa_2"):
        return "string_match_part"
    if task not in TASK_SPECS:
        raise ValueError(f"unknown RULER task {task!r}; the tasks are: {', '.join(TASK_SPECS)}")
    return TASK_SPECS[task].metric


def score(task: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """The task's score in [0, 100]: RULER's post-processing and its metric for ``task``."""
    return METRICS[task_metric(task)](predictions, references)
