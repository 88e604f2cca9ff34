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
is cut off before appending again. With N processes (``accelerate launch --num_processes N``), process r takes the
samples ``r::N`` and writes ``<task>.part<r>-of-<N>.jsonl``; when all are done the main process merges them into
``<task>.jsonl`` (dataset order, unique ids) and removes the parts. The scorer also merges parts, so a crashed
sharded run scores as far as it got.
"""

from __future__ import annotations

import json
import os
import re
import time
from glob import glob
from typing import Callable, Iterable, Optional

import torch

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
    "predict_tasks",
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
    """Token ids [1, L] of the model input for one sample (after truncation and the chat-template rule)."""
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
def _repair_tail(path: str) -> None:
    """Cut a trailing partial line (a write interrupted by a kill) so appending starts on a line boundary."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        keep = len(data)
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
        # also drop a complete but undecodable last line (cannot happen with one write per line, but be safe)
        while keep > 0:
            start = data.rfind(b"\n", 0, keep - 1) + 1
            try:
                json.loads(data[start:keep])
                break
            except ValueError:
                keep = start
        if keep != len(data):
            f.truncate(keep)


class PredictionWriter:
    """Appends one JSON line per sample, flushed and fsync'ed, to a file repaired on open."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _repair_tail(path)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "PredictionWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_predictions(path: str) -> list[dict]:
    """Records of one prediction file; a trailing partial line (cut by a kill) is ignored, any other bad line
    raises."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):  # last line without newline: the sample in flight when killed
                break
            raise ValueError(f"{path}: line {number} is corrupt ({err}); delete it and rerun to redo that sample")
    return records


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


def merged_records(paths: Iterable[str]) -> list[dict]:
    """Records of several files of one task, the first record of each ``_id`` kept (records without an id, as in
    official prediction files, are all kept)."""
    seen: set = set()
    records = []
    for path in paths:
        for record in read_predictions(path):
            sample_id = record.get("_id")
            if sample_id is not None:
                if sample_id in seen:
                    continue
                seen.add(sample_id)
            records.append(record)
    return records


def done_ids(out_dir: str, task: str) -> set:
    return {r["_id"] for r in merged_records(task_prediction_files(out_dir).get(task, [])) if "_id" in r}


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
) -> dict:
    """Predict every not-yet-done sample of this process's shard of each task; returns counts and wall time.

    ``task_samples`` maps the output file's task name to (spec, samples with ``_id``)."""
    from tqdm.auto import tqdm

    os.makedirs(out_dir, exist_ok=True)
    work = []
    skipped = 0
    for task, (spec, samples) in task_samples.items():
        already = done_ids(out_dir, task)
        mine = samples[process_index::num_processes]
        todo = [s for s in mine if s["_id"] not in already]
        skipped += len(mine) - len(todo)
        work.append((task, spec, todo))
    total = sum(len(todo) for _, _, todo in work)
    bar = tqdm(total=total, desc=f"longbench[{process_index}/{num_processes}]", disable=not progress,
               unit="sample", dynamic_ncols=True)
    start = time.perf_counter()
    done = 0
    for task, spec, todo in work:
        if not todo:
            continue
        name = f"{task}.jsonl" if num_processes == 1 else f"{task}.part{process_index:02d}-of-{num_processes:02d}.jsonl"
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
                writer.write(record)
                if on_sample is not None:
                    on_sample(task, record)
                done += 1
                bar.update(1)
    bar.close()
    return {"predicted": done, "skipped_done": skipped, "wall_s": round(time.perf_counter() - start, 3)}
