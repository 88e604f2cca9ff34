"""The prediction files of a LongBench output directory (no torch: ``longbench-score`` reads them alone).

A directory holds ``<task>.jsonl`` per task (``task`` a LongBench task, a LongBench-E ``<task>_e`` name or an offline
task), and while a sharded run is in flight its parts ``<task>.hfsa-partRR-of-NN.<run id>.jsonl``: the ``hfsa-part``
infix is a name no user picks, and the run id (a hash of the run's settings, ``run_dir.RunDir.run_id``) records
which run wrote the part. Any other file is not ours: never read as predictions, never merged, never deleted
(:func:`stray_files` lists the ``.jsonl`` ones so the scorer can say it skipped them).

Readers merge a task's files into one record per ``_id``. The same ``_id`` twice with the same prediction (a merge
killed before it removed the parts, or an old run appended twice) counts once; with different predictions it is
refused (:class:`DuplicatePredictionError`), naming the ids and the files.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Optional

from ..store import read_records, replace_records

__all__ = ["PART_FILE", "part_file_name", "is_task_name", "task_prediction_files", "stray_files", "read_predictions",
           "merged_records", "done_ids", "missing_ids", "merge_shards", "DuplicatePredictionError"]

PART_FILE = re.compile(r"^(?P<task>[A-Za-z0-9_\-]+)\.hfsa-part(?P<rank>\d+)-of-(?P<world>\d+)\.(?P<run>[0-9a-z]+)\.jsonl$")


def part_file_name(task: str, process_index: int, num_processes: int, run_id: str) -> str:
    """The shard part of process ``process_index`` of ``num_processes`` of the run ``run_id``."""
    return f"{task}.hfsa-part{process_index:02d}-of-{num_processes:02d}.{run_id}.jsonl"


def is_task_name(name: str) -> bool:
    from .tasks import get_task

    try:
        get_task(name)
    except ValueError:
        return False
    return True


def task_prediction_files(out_dir: str, run_id: Optional[str] = None) -> dict[str, list[str]]:
    """task -> its prediction files in ``out_dir``: ``<task>.jsonl`` first, then shard parts (of the run ``run_id``
    only, where given). Files that are neither (a user's ``qasper.methodA.jsonl``, ``notes.jsonl``) are left out."""
    files: dict[str, list[str]] = {}
    if not os.path.isdir(out_dir):
        return files
    for name in sorted(os.listdir(out_dir)):
        if not name.endswith(".jsonl") or not os.path.isfile(os.path.join(out_dir, name)):
            continue
        match = PART_FILE.match(name)
        if match:
            if not is_task_name(match.group("task")) or (run_id is not None and match.group("run") != run_id):
                continue
            task = match.group("task")
        else:
            task = name[: -len(".jsonl")]
            if "." in task or not is_task_name(task):
                continue
        files.setdefault(task, []).append(os.path.join(out_dir, name))
    for paths in files.values():
        paths.sort(key=lambda p: (bool(PART_FILE.match(os.path.basename(p))), p))
    return files


def stray_files(out_dir: str) -> list[str]:
    """``.jsonl`` files of ``out_dir`` that are no prediction file (skipped by readers)."""
    ours = {p for paths in task_prediction_files(out_dir).values() for p in paths}
    if not os.path.isdir(out_dir):
        return []
    return [name for name in sorted(os.listdir(out_dir))
            if name.endswith(".jsonl") and os.path.join(out_dir, name) not in ours]


def read_predictions(path: str) -> list[dict]:
    """Records of one prediction file; a trailing partial line (cut by a kill) is ignored, any other bad line
    raises. A line that is not a JSON object raises too."""
    records = read_records(path, strict=True)
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {number} is not a JSON object ({type(record).__name__}); a prediction "
                             "line is {\"pred\": ..., \"answers\": ...}")
    return records


class DuplicatePredictionError(ValueError):
    """An ``_id`` has two different prediction records (two shards, or two runs appending to one file)."""


def _same_prediction(a: dict, b: dict) -> bool:
    return a.get("pred") == b.get("pred") and a.get("answers") == b.get("answers")


def _hashable(sample_id):
    return json.dumps(sample_id, sort_keys=True) if isinstance(sample_id, (list, dict)) else sample_id


def merged_records(paths: Iterable[str]) -> list[dict]:
    """Records of several files of one task, one per ``_id`` (records without an id, as in official prediction
    files, are all kept). An id with two records of the same prediction counts once (the first); with different
    predictions raises :class:`DuplicatePredictionError` naming the ids and their files."""
    first: dict = {}  # _id -> (record, path)
    conflicts: dict = {}  # _id -> paths holding it
    records = []
    for path in paths:
        for record in read_predictions(path):
            sample_id = record.get("_id")
            if sample_id is not None:
                key = _hashable(sample_id)
                if key in first:
                    if not _same_prediction(record, first[key][0]):
                        conflicts.setdefault(key, [first[key][1]]).append(path)
                    continue
                first[key] = (record, path)
            records.append(record)
    if conflicts:
        shown = "; ".join(f"{sample_id!r} in {', '.join(sorted(set(os.path.basename(p) for p in where)))}"
                          for sample_id, where in list(conflicts.items())[:5])
        more = f" (and {len(conflicts) - 5} more)" if len(conflicts) > 5 else ""
        directory = os.path.dirname(os.path.abspath(first[next(iter(conflicts))][1]))
        raise DuplicatePredictionError(
            f"{len(conflicts)} sample id(s) predicted more than once with different results in {directory}: "
            f"{shown}{more}. Each sample must be predicted once; delete the extra lines (or the files of one of "
            "the runs) and rerun the same command to redo what is missing.")
    return records


def done_ids(out_dir: str, task: str, run_id: Optional[str] = None) -> set:
    return {_hashable(r["_id"]) for r in merged_records(task_prediction_files(out_dir, run_id).get(task, []))
            if "_id" in r}


def missing_ids(out_dir: str, task: str, ids: Iterable, run_id: Optional[str] = None) -> list:
    """The ids among ``ids`` that have no prediction in ``out_dir`` (in the order given)."""
    done = done_ids(out_dir, task, run_id)
    return [sample_id for sample_id in ids if sample_id not in done]


def merge_shards(out_dir: str, task: str, order: Optional[list] = None, run_id: Optional[str] = None) -> str:
    """Merge ``<task>.jsonl`` and its shard parts (of the run ``run_id``, where given) into ``<task>.jsonl``
    (atomic replace), ordered as ``order`` (a list of ids) where given, then delete the parts merged. Returns the
    merged path."""
    paths = task_prediction_files(out_dir, run_id).get(task, [])
    target = os.path.join(out_dir, f"{task}.jsonl")
    parts = [p for p in paths if p != target]
    if not parts:
        return target
    records = merged_records(paths)
    if order is not None:
        rank = {sample_id: i for i, sample_id in enumerate(order)}
        records.sort(key=lambda r: rank.get(r.get("_id"), len(rank)))
    replace_records(target, records, merged_parts=parts)
    return target
