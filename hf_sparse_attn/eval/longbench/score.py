"""Scoring LongBench predictions as the official eval.py does, plus categories, averages and reports.

Per sample: the first line of the prediction for trec/triviaqa/samsum/lsht (leading newlines stripped), the task
metric against every reference answer, the max kept. Task score = ``round(100 * sum / n, 2)``; LongBench-E:
``round(100 * mean, 2)`` per bucket of the sample's ``length`` field (words, or characters for Chinese; not tokens):
``length < 4000`` -> "0-4k", ``< 8000`` -> "4-8k", else "8k+". An empty bucket is ``None`` (the official scorer
writes NaN).

Averages (``summarize``): a category score is the mean of its tasks; the LongBench average of a language is the mean
of its category scores (this reproduces the published numbers, e.g. chatglm2-6b-32k English 40.9 = mean of
32.9, 33.7, 27.6, 59.1, 52.7, 39.2). Code tasks count with English, as LongBench does.

The "Attention is Naturally Sparse" paper's Table 1 (``comparison_table``) uses another convention, reconstructed from its numbers: each category
column is the SUM of its LongBench-E task scores in the "8k+" bucket (few-shot 186.58 = trec + triviaqa + samsum)
and "Average" is the mean of the six category sums ((80.63 + 68.14 + 53.12 + 186.58 + 84.00 + 99.57) / 6 = 95.34).
"""

from __future__ import annotations

import json
import math
import os
import platform
from typing import Optional, Sequence

import numpy as np

from .metrics import get_metric
from .files import merged_records, task_prediction_files
from .tasks import CATEGORIES, get_task

__all__ = [
    "BUCKETS",
    "length_bucket",
    "sample_score",
    "score_task",
    "score_task_e",
    "score_directory",
    "summarize",
    "markdown_report",
    "comparison_table",
]

BUCKETS = ("0-4k", "4-8k", "8k+")


def length_bucket(length: float) -> str:
    """LongBench-E bucket of a sample's ``length`` field."""
    if length < 4000:
        return "0-4k"
    if length < 8000:
        return "4-8k"
    return "8k+"


def sample_score(task: str, prediction: str, answers: Sequence[str], all_classes=None) -> float:
    """Max over reference answers of the task metric (first-line rule applied), in [0, 1]."""
    spec = get_task(task)
    metric = get_metric(spec.metric)
    if spec.first_line_only:
        prediction = prediction.lstrip("\n").split("\n")[0]
    if isinstance(answers, str):
        answers = [answers]
    score = 0.0
    for answer in answers:
        score = max(score, metric(prediction, answer, all_classes=all_classes))
    return score


def score_task(task: str, records: Sequence[dict]) -> float:
    """LongBench task score (0-100, two decimals) of prediction records ``{pred, answers, all_classes}``."""
    if not records:
        raise ValueError(f"no predictions for task {task}")
    total = 0.0
    for record in records:
        total += sample_score(task, record["pred"], record["answers"], record.get("all_classes"))
    return round(100 * total / len(records), 2)


def score_task_e(task: str, records: Sequence[dict]) -> dict[str, Optional[float]]:
    """LongBench-E bucket scores {"0-4k", "4-8k", "8k+"} (None for an empty bucket)."""
    per_bucket: dict[str, list[float]] = {b: [] for b in BUCKETS}
    for record in records:
        if record.get("length") is None:
            raise ValueError(f"task {task}: a prediction has no 'length' field, needed for LongBench-E buckets")
        score = sample_score(task, record["pred"], record["answers"], record.get("all_classes"))
        per_bucket[length_bucket(record["length"])].append(score)
    return {b: (round(100 * float(np.mean(s)), 2) if s else None) for b, s in per_bucket.items()}


def _is_text_list(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) for v in value)


def check_records(task: str, records: Sequence[dict], where: str, longbench_e: bool = False) -> None:
    """Raise ValueError naming the file and the records unless every record has a text ``pred``, ``answers`` (a
    string or a list of strings), ``all_classes`` absent, null or a list of strings, and with ``longbench_e`` a
    finite numeric ``length``."""
    def bad_length(v) -> bool:
        return isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)

    checks = [("pred", lambda r: not isinstance(r.get("pred"), str)),
              ("answers", lambda r: not (isinstance(r.get("answers"), str) or _is_text_list(r.get("answers")))),
              ("all_classes", lambda r: r.get("all_classes") is not None and not _is_text_list(r.get("all_classes")))]
    if longbench_e:
        checks.append(("length", lambda r: bad_length(r.get("length"))))
    problems = []
    for field, bad in checks:
        numbers = [i for i, r in enumerate(records, 1) if bad(r)]
        if numbers:
            shown = ", ".join(str(n) for n in numbers[:5]) + (", ..." if len(numbers) > 5 else "")
            problems.append(f"'{field}' missing or invalid in {len(numbers)} of {len(records)} records (record {shown})")
    if problems:
        raise ValueError(f"{where}: task {task}: " + "; ".join(problems) + ". A prediction line is {\"pred\": text, "
                         "\"answers\": [text, ...], \"all_classes\": [text, ...] or null"
                         + (", \"length\": number" if longbench_e else "") + "}")


def _empty_score(longbench_e: bool):
    return {b: None for b in BUCKETS} if longbench_e else None


def score_directory(pred_dir: str, longbench_e: bool = False, write: bool = True,
                    tasks: Optional[Sequence[str]] = None) -> dict:
    """Score every ``<task>.jsonl`` (and shard parts) of ``pred_dir``; write ``pred_dir/result.json`` (official
    format: task -> score, or task -> {bucket: score} with ``longbench_e``).

    Every task of ``tasks`` (the tasks asked for) and every task with a file appears; a task without predictions
    (an empty file, or none) scores ``None`` (``null``), never silently left out. :func:`count_samples` gives the
    number of predictions behind each score."""
    files = task_prediction_files(pred_dir)
    if not files and not tasks:
        raise FileNotFoundError(f"no <task>.jsonl prediction files in {pred_dir}")
    result: dict = {}
    for task in sorted(set(files) | set(tasks or ())):
        get_task(task)  # a task asked for that is not a known task: a clear error
        records = merged_records(files.get(task, []))
        check_records(task, records, ", ".join(files.get(task, [])) or pred_dir, longbench_e)
        if not records:
            result[task] = _empty_score(longbench_e)
            continue
        result[task] = score_task_e(task, records) if longbench_e else score_task(task, records)
    if write:
        with open(os.path.join(pred_dir, "result.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, ensure_ascii=False, indent=4)
    return result


def count_samples(pred_dir: str, tasks: Optional[Sequence[str]] = None) -> dict[str, int]:
    """task -> number of predictions in ``pred_dir`` (shard parts merged), 0 for a task of ``tasks`` without any."""
    files = task_prediction_files(pred_dir)
    return {task: len(merged_records(files.get(task, []))) for task in sorted(set(files) | set(tasks or ()))}


def _mean(values: list[float]) -> Optional[float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return round(float(np.mean(values)), 2) if values else None


def summarize(result: dict, bucket: Optional[str] = None) -> dict:
    """Category scores and averages from a result dict (task -> score, or task -> buckets with ``bucket``).

    Returns {"categories": {lang: {category: score}}, "average": {lang: score}, "task_average": {lang: score}}
    with lang in "en" (English + code tasks), "zh" and "all"."""
    scores: dict[str, float] = {}
    for task, value in result.items():
        if isinstance(value, dict):
            if bucket is None:
                raise ValueError("LongBench-E results have buckets: pass bucket='0-4k', '4-8k' or '8k+'")
            value = value.get(bucket)
        if value is not None:
            scores[task] = value
    by_language: dict[str, dict[str, list[float]]] = {"en": {}, "zh": {}, "all": {}}
    for task, value in scores.items():
        spec = get_task(task)
        language = "zh" if spec.language == "zh" else "en"
        for lang in (language, "all"):
            by_language[lang].setdefault(spec.category, []).append(value)
    out: dict = {"categories": {}, "average": {}, "task_average": {}}
    for lang, categories in by_language.items():
        if not categories:
            continue
        category_scores = {c: _mean(categories[c]) for c in CATEGORIES if c in categories}
        out["categories"][lang] = category_scores
        out["average"][lang] = _mean(list(category_scores.values()))
        out["task_average"][lang] = _mean([v for vs in categories.values() for v in vs])
    return out


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown_report(result: dict, meta: Optional[dict] = None, title: str = "LongBench results",
                    samples: Optional[dict[str, int]] = None) -> str:
    """Markdown: metadata, a per-task table (buckets as columns for LongBench-E, and the number of predictions
    per task where ``samples`` is given), categories and averages."""
    lines = [f"# {title}", ""]
    if meta:
        for key, value in meta.items():
            if isinstance(value, (dict, list)):
                value = json.dumps(value, ensure_ascii=False)
            lines.append(f"- **{key}**: {value}")
        lines.append("")
    is_e = any(isinstance(v, dict) for v in result.values())
    columns = (list(BUCKETS) if is_e else ["score"]) + (["samples"] if samples is not None else [])
    lines += ["| task | category | metric | " + " | ".join(columns) + " |",
              "|---|---|---|" + "---|" * len(columns)]
    for task, value in result.items():
        spec = get_task(task)
        cells = [_fmt((value or {}).get(b)) for b in BUCKETS] if is_e else [_fmt(value)]
        if samples is not None:
            cells.append(str(samples.get(task, 0)))
        lines.append(f"| {task} | {spec.category} | {spec.metric} | " + " | ".join(cells) + " |")
    lines.append("")
    for bucket in (BUCKETS if is_e else [None]):
        summary = summarize(result, bucket)
        heading = "Categories and averages" + (f" ({bucket})" if bucket else "")
        lines += [f"## {heading}", "", "| language | " + " | ".join(CATEGORIES) + " | average | task average |",
                  "|---|" + "---|" * (len(CATEGORIES) + 2)]
        for lang, categories in summary["categories"].items():
            cells = [_fmt(categories.get(c)) for c in CATEGORIES]
            lines.append(f"| {lang} | " + " | ".join(cells)
                         + f" | {_fmt(summary['average'][lang])} | {_fmt(summary['task_average'][lang])} |")
        lines.append("")
    return "\n".join(lines)


_TABLE1_COLUMNS = (("single-qa", "single-doc QA"), ("multi-qa", "multi-doc QA"), ("summarization", "summarization"),
                   ("few-shot", "few-shot"), ("synthetic", "synthetic"), ("code", "code"))


def table1_row(result: dict, bucket: Optional[str] = "8k+") -> dict:
    """"Attention is Naturally Sparse" Table 1 numbers of one run: per category the SUM of its task scores, and the mean of the six."""
    sums: dict[str, Optional[float]] = {}
    for column, category in _TABLE1_COLUMNS:
        values = []
        for task, value in result.items():
            if get_task(task).category != category:
                continue
            if isinstance(value, dict):
                value = value.get(bucket)
            if value is not None:
                values.append(value)
        sums[column] = round(sum(values), 2) if values else None
    present = [v for v in sums.values() if v is not None]
    sums["Average"] = round(sum(present) / len(present), 2) if present else None
    return sums


def comparison_table(runs: Sequence[tuple[str, int, dict]], bucket: Optional[str] = "8k+") -> str:
    """Markdown table in the layout of "Attention is Naturally Sparse" Table 1: one row per (method, number of replaced layers, result),
    columns single-qa, multi-qa, summarization, few-shot, synthetic, code (sums of task scores) and Average."""
    header = ["Algorithm with Number of Replaced Layers"] + [c for c, _ in _TABLE1_COLUMNS] + ["Average"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for method, layers, result in runs:
        row = table1_row(result, bucket)
        name = "0 (exact)" if layers == 0 else f"{method}-{layers}"
        lines.append(f"| {name} | " + " | ".join(_fmt(row[c]) for c, _ in _TABLE1_COLUMNS)
                     + f" | {_fmt(row['Average'])} |")
    return "\n".join(lines)


def environment_info() -> dict:
    """Versions and hardware for run metadata."""
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import hf_sparse_attn

        info["hf_sparse_attn"] = getattr(hf_sparse_attn, "__version__", None)
    except Exception:
        pass
    return info
