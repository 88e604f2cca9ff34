"""LongBench prediction: prompt, middle truncation, chat-template rule, greedy decoding, crash-safe JSONL output,
resume, and sharding across processes.

Per sample (as the official pred.py does):

1. ``prompt = template.format(**sample)``.
2. Middle truncation: if the prompt has more than ``max_length`` tokens (tokenized with special tokens), keep the
   first ``max_length // 2`` and the last ``max_length // 2`` tokens, decode each half with
   ``skip_special_tokens=True`` and concatenate the two strings (the instructions sit at both ends).
3. Chat template: applied (``tokenizer.apply_chat_template``, generation prompt added) unless the task is one of
   trec, triviaqa, samsum, lsht, lcc, repobench-p or the tokenizer has no chat template.
4. Greedy decoding of at most the task's output length; samsum also stops at a newline token (after at least one
   new token).

Output: one ``<task>.jsonl`` per task in the output directory, one line per sample
``{"pred", "answers", "all_classes", "length", "_id", ...}``, appended, flushed and fsync'ed after each sample. A
rerun skips every ``_id`` already written; a line cut by a kill (the only possible damage: the sample in flight)
is cut off before appending again.

Sharding (N processes started by ``torchrun`` / ``accelerate launch``, see ``distributed.py``): before any process
writes, every process lists the samples not yet predicted in any file of the output directory
(:func:`pending_samples`, all tasks in order) and the processes check that their lists agree; process r then
predicts ``pending[r::N]`` and writes ``<task>.partRR-of-NN.jsonl``. So each sample is predicted by exactly one
process, the work stays balanced after a resume, and a rerun with another N re-uses every finished sample. When
all are done the main process merges the parts into ``<task>.jsonl`` (dataset order) and removes them. Readers
merge parts too (a crashed sharded run scores as far as it got) and refuse an id predicted twice with different
results, naming it and its files; identical copies of one record (a merge killed between writing ``<task>.jsonl``
and removing the parts) count once.
"""

from __future__ import annotations

import json
import os
import re
import time
from glob import glob
from typing import Callable, Iterable, Optional

import torch

from ..store import JsonlStore, read_records, repair_tail
from .tasks import TaskSpec, build_prompt

__all__ = [
    "truncate_middle",
    "build_inputs",
    "generate_one",
    "PredictionWriter",
    "read_predictions",
    "task_prediction_files",
    "done_ids",
    "merge_shards",
    "missing_ids",
    "pending_samples",
    "predict_tasks",
    "shard_file_name",
    "DuplicatePredictionError",
]

_PART_FILE = re.compile(r"^(?P<task>.+)\.part(?P<rank>\d+)-of-(?P<world>\d+)\.jsonl$")


# ------------------------------------------------------------------------------------------------ prompt building
def truncate_middle(tokenizer, prompt: str, max_length: int) -> str:
    """The prompt itself if it has at most ``max_length`` tokens, else the decoded first and last
    ``max_length // 2`` tokens joined (official LongBench middle truncation)."""
    token_ids = tokenizer(prompt, truncation=False, add_special_tokens=True)["input_ids"]
    if len(token_ids) <= max_length:
        return prompt
    half = max_length // 2
    head = tokenizer.decode(token_ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(token_ids[-half:], skip_special_tokens=True)
    return head + tail


def build_inputs(tokenizer, spec: TaskSpec, sample: dict, max_length: int, chat_template: bool = True) -> dict:
    """Token ids [1, L] of the model input for one sample (after truncation and the chat-template rule).
    ChatGLM2 / ChatGLM3 tokenizers take the official ChatGLM path (build_prompt / build_chat_input; chatglm.py)."""
    from .chatglm import build_chatglm_inputs, chatglm_prompt_style

    if (style := chatglm_prompt_style(tokenizer)) is not None:
        return build_chatglm_inputs(tokenizer, spec, sample, max_length, style, chat_template)
    prompt = truncate_middle(tokenizer, build_prompt(spec, sample), max_length)
    use_chat = chat_template and spec.use_chat_template and getattr(tokenizer, "chat_template", None)
    if use_chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)
    return tokenizer(prompt, return_tensors="pt", add_special_tokens=True)


def newline_token_id(tokenizer) -> int:
    """The token a lone newline encodes to (the last one, as the official samsum stop does)."""
    ids = tokenizer.encode("\n", add_special_tokens=False)
    if not ids:
        raise ValueError("the tokenizer encodes '\\n' to no token; cannot stop samsum at a newline")
    return ids[-1]


@torch.no_grad()
def generate_one(model, tokenizer, spec: TaskSpec, inputs: dict) -> str:
    """Greedy decoding of at most ``spec.max_new_tokens`` tokens; returns the decoded continuation."""
    device = next(model.parameters()).device
    input_ids = inputs["input_ids"].to(device)
    attention_mask = inputs.get("attention_mask")
    attention_mask = attention_mask.to(device) if attention_mask is not None else torch.ones_like(input_ids)
    eos = tokenizer.eos_token_id
    kwargs = dict(max_new_tokens=spec.max_new_tokens, do_sample=False, num_beams=1)
    if spec.stop_at_newline:
        kwargs["eos_token_id"] = [t for t in (eos, newline_token_id(tokenizer)) if t is not None]
        kwargs["min_new_tokens"] = 1  # official: min_length = context_length + 1
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=pad, **kwargs)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------ crash-safe files
_repair_tail = repair_tail  # the older private name


class PredictionWriter(JsonlStore):
    """Appends one JSON line per sample (one ``O_APPEND`` write, fsync'ed) to a file whose torn last line is cut
    on open: :class:`hf_sparse_attn.eval.store.JsonlStore`, non-ASCII text kept as is."""

    def __init__(self, path: str):
        super().__init__(path, ensure_ascii=False)

    def write(self, record: dict) -> None:
        self.append(record)


def read_predictions(path: str) -> list[dict]:
    """Records of one prediction file; a trailing partial line (cut by a kill) is ignored, any other bad line
    raises."""
    return read_records(path, strict=True)


def task_prediction_files(out_dir: str) -> dict[str, list[str]]:
    """task -> its prediction files in ``out_dir`` (``<task>.jsonl`` first, then shard parts)."""
    files: dict[str, list[str]] = {}
    for path in sorted(glob(os.path.join(out_dir, "*.jsonl"))):
        name = os.path.basename(path)
        match = _PART_FILE.match(name)
        task = match.group("task") if match else name.split(".")[0]
        files.setdefault(task, []).append(path)
    for task, paths in files.items():
        paths.sort(key=lambda p: (bool(_PART_FILE.match(os.path.basename(p))), p))
    return files


class DuplicatePredictionError(ValueError):
    """An ``_id`` has two different prediction records (two shards, or two runs appending to one file)."""


def merged_records(paths: Iterable[str]) -> list[dict]:
    """Records of several files of one task, one per ``_id`` (records without an id, as in official prediction
    files, are all kept). An id with two identical records counts once; with two different records raises
    :class:`DuplicatePredictionError` naming the ids and their files."""
    first: dict = {}  # _id -> (record, path)
    conflicts: dict = {}  # _id -> paths holding it
    records = []
    for path in paths:
        for record in read_predictions(path):
            sample_id = record.get("_id")
            if sample_id is not None:
                if sample_id in first:
                    if record != first[sample_id][0]:
                        conflicts.setdefault(sample_id, [first[sample_id][1]]).append(path)
                    continue
                first[sample_id] = (record, path)
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


def done_ids(out_dir: str, task: str) -> set:
    return {r["_id"] for r in merged_records(task_prediction_files(out_dir).get(task, [])) if "_id" in r}


def missing_ids(out_dir: str, task: str, ids: Iterable) -> list:
    """The ids among ``ids`` that have no prediction in ``out_dir`` (in the order given)."""
    done = done_ids(out_dir, task)
    return [sample_id for sample_id in ids if sample_id not in done]


def merge_shards(out_dir: str, task: str, order: Optional[list] = None) -> str:
    """Merge ``<task>.jsonl`` and its shard parts into ``<task>.jsonl`` (atomic replace), ordered as ``order``
    (a list of ids) where given, then delete the parts. Returns the merged path."""
    paths = task_prediction_files(out_dir).get(task, [])
    target = os.path.join(out_dir, f"{task}.jsonl")
    parts = [p for p in paths if p != target]
    if not parts:
        return target
    records = merged_records(paths)
    if order is not None:
        rank = {sample_id: i for i, sample_id in enumerate(order)}
        records.sort(key=lambda r: rank.get(r.get("_id"), len(rank)))
    tmp = target + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
    for part in parts:
        os.remove(part)
    return target


# ------------------------------------------------------------------------------------------------ the loop
def shard_file_name(task: str, process_index: int, num_processes: int) -> str:
    """``<task>.jsonl`` for a single process, ``<task>.partRR-of-NN.jsonl`` for process RR of NN."""
    if num_processes == 1:
        return f"{task}.jsonl"
    return f"{task}.part{process_index:02d}-of-{num_processes:02d}.jsonl"


def pending_samples(task_samples: dict[str, tuple[TaskSpec, list[dict]]], out_dir: str) -> list[tuple[str, str]]:
    """(task, _id) of every sample that has no prediction yet in any file of ``out_dir``, tasks in the order of
    ``task_samples``, samples in dataset order. Sharded runs compute it once, before any process writes."""
    pending = []
    for task, (_, samples) in task_samples.items():
        already = done_ids(out_dir, task)
        pending += [(task, s["_id"]) for s in samples if s["_id"] not in already]
    return pending


def predict_tasks(
    model,
    tokenizer,
    task_samples: dict[str, tuple[TaskSpec, list[dict]]],
    out_dir: str,
    max_length: int,
    seed: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    chat_template: bool = True,
    progress: bool = True,
    on_sample: Optional[Callable[[str, dict], None]] = None,
    pending: Optional[list[tuple[str, str]]] = None,
) -> dict:
    """Predict this process's share ``pending[process_index::num_processes]`` of the samples not yet done; returns
    counts and wall time.

    ``task_samples`` maps the output file's task name to (spec, samples with ``_id``). ``pending`` is
    :func:`pending_samples` of the output directory, computed before any process started writing; it is required
    with ``num_processes > 1`` (each process computing its own while others write would deal the samples out
    differently) and computed here for a single process."""
    from tqdm.auto import tqdm

    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} is not in [0, num_processes={num_processes})")
    if pending is None:
        if num_processes > 1:
            raise ValueError("with num_processes > 1 pass pending=pending_samples(task_samples, out_dir), computed "
                             "once before any process writes, so that every process deals out the same list")
        pending = pending_samples(task_samples, out_dir)
    os.makedirs(out_dir, exist_ok=True)
    mine = pending[process_index::num_processes]
    mine_by_task: dict[str, set] = {}
    for task, sample_id in mine:
        mine_by_task.setdefault(task, set()).add(sample_id)
    work = []
    for task, (spec, samples) in task_samples.items():
        ids = mine_by_task.get(task, set())
        work.append((task, spec, [s for s in samples if s["_id"] in ids]))
    skipped = sum(len(samples) for _, samples in task_samples.values()) - len(pending)
    total = sum(len(todo) for _, _, todo in work)
    bar = tqdm(total=total, desc=f"longbench[{process_index}/{num_processes}]", disable=not progress,
               unit="sample", dynamic_ncols=True)
    start = time.perf_counter()
    done = 0
    for task, spec, todo in work:
        if not todo:
            continue
        name = shard_file_name(task, process_index, num_processes)
        with PredictionWriter(os.path.join(out_dir, name)) as writer:
            for sample in todo:
                bar.set_postfix_str(task)
                torch.manual_seed(seed)  # each sample independent of what ran before: resumed == uninterrupted
                t0 = time.perf_counter()
                inputs = build_inputs(tokenizer, spec, sample, max_length, chat_template)
                pred = generate_one(model, tokenizer, spec, inputs)
                record = {
                    "pred": pred,
                    "answers": sample["answers"],
                    "all_classes": sample.get("all_classes"),
                    "length": sample.get("length"),
                    "_id": sample["_id"],
                    "prompt_tokens": int(inputs["input_ids"].shape[1]),
                    "seconds": round(time.perf_counter() - t0, 3),
                }
                if num_processes > 1:
                    record["shard"] = f"{process_index:02d}-of-{num_processes:02d}"
                writer.write(record)
                if on_sample is not None:
                    on_sample(task, record)
                done += 1
                bar.update(1)
    bar.close()
    return {"predicted": done, "assigned": len(mine), "skipped_done": skipped,
            "wall_s": round(time.perf_counter() - start, 3)}
