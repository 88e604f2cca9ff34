"""Reading LongBench samples: a local directory of the released JSONL files, the released ``data.zip``, a parquet
copy (read through ``datasets``), or a ``datasets`` id. Remote code is never trusted: the official loading script
does not run with ``datasets`` >= 4, and we never pass ``trust_remote_code``.

Layouts accepted for a task ``T`` (LongBench-E files are ``T_e``):

- directory: ``DIR/T.jsonl`` or ``DIR/data/T.jsonl``
- zip: a member ``.../T.jsonl`` (the release has ``data/T.jsonl``)
- parquet: ``DIR/T.parquet``, ``DIR/T/*.parquet`` or ``DIR/T/test-*.parquet`` (also under ``DIR/data/``), or a
  single ``.parquet`` file holding many tasks with a ``dataset`` column
- anything else is taken as a ``datasets`` hub id: ``load_dataset(id, T, split="test")``, then its parquet
  conversion ``revision="refs/convert/parquet"``.

Every sample gets an ``_id`` (the released files have one; otherwise a hash of its content) so that predictions
can be resumed and shards merged. :func:`check_samples` checks a task's samples before any model is loaded: a task
with no samples, or samples that lack a field the prompt or the scorer needs, is an error that names the file,
the samples and the fields.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import string
import zipfile
from glob import glob
from typing import Iterable, Optional

__all__ = ["load_task", "file_name", "assign_ids", "read_jsonl_lines", "check_samples", "template_fields"]


def file_name(task: str, longbench_e: bool) -> str:
    """Released file stem of a task: ``T`` or ``T_e`` (LongBench-E)."""
    return f"{task}_e" if longbench_e else task


def read_jsonl_lines(lines: Iterable[str], where: str) -> list[dict]:
    samples = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: line {number} is not valid JSON ({err})") from None
        if not isinstance(sample, dict):
            raise ValueError(f"{where}: line {number} is a JSON {type(sample).__name__}, not an object; a LongBench "
                             "sample is one JSON object per line ({\"context\": ..., \"input\": ..., ...})")
        try:
            json.dumps(sample, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"{where}: line {number} holds text that is not valid Unicode ({err.reason}: a lone "
                             "surrogate escape such as \\ud800); fix or drop that line") from None
        samples.append(sample)
    return samples


def assign_ids(samples: list[dict], task: str, where: Optional[str] = None) -> list[dict]:
    """Give each sample a stable ``_id``: its own if present (a string or an integer, unique in the task: a
    repeated or malformed id is an error naming it, since predictions are resumed and merged by id), else a hash of
    its content (repeated content gets a ``-k`` suffix, chosen so that it never collides with another id)."""
    where = where or task
    bad = [n for n, s in enumerate(samples, 1) if s.get("_id") not in (None, "")
           and (isinstance(s["_id"], bool) or not isinstance(s["_id"], (str, int)))]
    if bad:
        shown = ", ".join(str(n) for n in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise ValueError(f"{where}: task {task}: '_id' must be a string or an integer; sample {shown} has "
                         f"{json.dumps(samples[bad[0] - 1]['_id'])[:40]}")
    given: dict[str, int] = {}
    repeated: list[str] = []
    for sample in samples:
        if sample.get("_id") not in (None, ""):
            key = str(sample["_id"])
            given[key] = given.get(key, 0) + 1
            if given[key] == 2:
                repeated.append(key)
    if repeated:
        raise ValueError(f"{where}: task {task}: {len(repeated)} '_id' value(s) repeated ({', '.join(repeated[:5])}); "
                         "predictions are resumed and merged by id, so each sample needs its own. Remove the repeated "
                         "samples (or their '_id' fields, to get content-hash ids)")
    taken = set(given)
    for sample in samples:
        if sample.get("_id") not in (None, ""):
            continue
        digest = hashlib.sha1(json.dumps(sample, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]
        candidate, k = f"{task}-{digest}", 0
        while candidate in taken:
            k += 1
            candidate = f"{task}-{digest}-{k}"
        sample["_id"] = candidate
        taken.add(candidate)
    return samples


def _from_dir_jsonl(source: str, stem: str) -> Optional[list[dict]]:
    for path in (os.path.join(source, f"{stem}.jsonl"), os.path.join(source, "data", f"{stem}.jsonl")):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return read_jsonl_lines(f, path)
    return None


def _from_zip(source: str, stem: str) -> Optional[list[dict]]:
    with zipfile.ZipFile(source) as archive:
        members = [m for m in archive.namelist() if os.path.basename(m) == f"{stem}.jsonl"]
        if not members:
            return None
        members.sort(key=len)  # prefer the shallowest path
        with archive.open(members[0]) as raw:
            return read_jsonl_lines(io.TextIOWrapper(raw, encoding="utf-8"), f"{source}:{members[0]}")


def _parquet_files(source: str, stem: str) -> list[str]:
    found: list[str] = []
    for root in (source, os.path.join(source, "data")):
        found += glob(os.path.join(root, f"{stem}.parquet"))
        found += sorted(glob(os.path.join(root, stem, "*.parquet")))
        found += sorted(glob(os.path.join(root, stem, "*", "*.parquet")))
    return found


def _load_parquet(files: list[str]) -> list[dict]:
    from datasets import load_dataset

    dataset = load_dataset("parquet", data_files={"test": files}, split="test")
    return [dict(row) for row in dataset]


def _from_hub(source: str, stem: str) -> list[dict]:
    from datasets import load_dataset

    errors = []
    for kwargs in ({}, {"revision": "refs/convert/parquet"}):
        try:
            dataset = load_dataset(source, stem, split="test", **kwargs)
            return [dict(row) for row in dataset]
        except Exception as err:  # the hub copy's loading script fails on datasets>=4; try its parquet conversion
            errors.append(f"{kwargs or 'default'}: {type(err).__name__}: {err}")
    raise ValueError(f"could not load task {stem!r} from datasets id {source!r} (no remote code is run):\n  "
                     + "\n  ".join(errors)
                     + "\nDownload the released data.zip (or the parquet files) and pass its path to --data.")


def load_task(source: str, task: str, longbench_e: bool = False, max_samples: Optional[int] = None) -> list[dict]:
    """Samples of one task (dicts with context, input, answers, length, all_classes, _id, ...), in file order."""
    stem = file_name(task, longbench_e)
    samples: Optional[list[dict]] = None
    if os.path.isdir(source):
        samples = _from_dir_jsonl(source, stem)
        if samples is None:
            files = _parquet_files(source, stem)
            if files:
                samples = _load_parquet(files)
        if samples is None:
            raise FileNotFoundError(f"no {stem}.jsonl or {stem} parquet file under {source} (looked in {source} "
                                    f"and {os.path.join(source, 'data')})")
    elif os.path.isfile(source) and source.endswith(".zip"):
        samples = _from_zip(source, stem)
        if samples is None:
            raise FileNotFoundError(f"{source} has no member named {stem}.jsonl")
    elif os.path.isfile(source) and source.endswith(".parquet"):
        samples = _load_parquet([source])
        if samples and "dataset" in samples[0]:  # one file holding many tasks: keep this task's rows
            samples = [s for s in samples if s["dataset"] in (stem, task)]
            if not samples:
                raise ValueError(f"{source} has no rows with dataset == {stem!r}")
    elif os.path.isfile(source) and source.endswith(".jsonl"):
        with open(source, encoding="utf-8") as f:
            samples = read_jsonl_lines(f, source)
    elif os.path.exists(source):
        raise ValueError(f"--data {source}: expected a directory, a .zip, a .parquet or a .jsonl file")
    else:
        samples = _from_hub(source, stem)
    if max_samples is not None:
        samples = samples[:max_samples]
    return assign_ids(samples, stem, where=source)


def template_fields(template: str) -> list[str]:
    """The sample fields a ``str.format`` template reads ({context}, {input}, ...), in order of appearance."""
    fields = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in fields:
            fields.append(name.split(".")[0].split("[")[0])
    return fields


def _answers_ok(value) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(a, str) for a in value)


def check_samples(spec, samples: list[dict], where: str, longbench_e: bool = False) -> None:
    """Raise ``ValueError`` unless every sample of the task has what prediction and scoring need.

    ``spec`` is the task's ``TaskSpec``; ``where`` names the data (file or source) in the message. Needed: at least
    one sample; the template's fields; ``answers`` (a string or a non-empty list of strings); ``all_classes`` (a
    non-empty list) for classification tasks; a numeric ``length`` for LongBench-E buckets."""
    if not samples:
        raise ValueError(f"{where}: task {spec.name} has no samples (empty file?); re-extract the data, or leave "
                         "the task out of --tasks")
    needed = [(field, None) for field in template_fields(spec.template)]
    needed.append(("answers", _answers_ok))
    if spec.metric == "classification":
        needed.append(("all_classes", lambda v: isinstance(v, (list, tuple)) and len(v) > 0
                       and all(isinstance(c, str) for c in v)))
    if longbench_e:
        needed.append(("length", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v)))
    problems: dict[str, list[int]] = {}
    for number, sample in enumerate(samples, 1):
        for field, ok in needed:
            if field not in sample or sample[field] is None or (ok is not None and not ok(sample[field])):
                problems.setdefault(field, []).append(number)
        classes = sample.get("all_classes")
        if spec.metric != "classification" and classes is not None and not (
                isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            problems.setdefault("all_classes", []).append(number)  # optional here, but a list of strings if given
    if problems:
        parts = []
        for field, numbers in problems.items():
            shown = ", ".join(str(n) for n in numbers[:5]) + (", ..." if len(numbers) > 5 else "")
            parts.append(f"'{field}' missing or invalid in {len(numbers)} of {len(samples)} samples (sample {shown})")
        raise ValueError(f"{where}: task {spec.name}: " + "; ".join(parts) + ". LongBench samples need "
                         + ", ".join(f"'{f}'" for f, _ in needed) + "; check that this is the released data of "
                         "the task")
