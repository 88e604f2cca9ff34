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
predicts ``pending[r::N]`` and writes ``<task>.hfsa-partRR-of-NN.<run id>.jsonl`` (a name no user picks, with the
run that wrote it: ``files.py``). So each sample is predicted by exactly one
process, the work stays balanced after a resume, and a rerun with another N re-uses every finished sample. When
all are done the main process merges the parts into ``<task>.jsonl`` (dataset order) and removes them. Readers
merge parts too (a crashed sharded run scores as far as it got) and refuse an id predicted twice with different
results, naming it and its files; identical copies of one record (a merge killed between writing ``<task>.jsonl``
and removing the parts) count once.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

import torch

from ..store import JsonlStore, repair_tail
from .files import (  # noqa: F401  (the file functions lived here; their names stay importable from predict)
    PART_FILE, DuplicatePredictionError, done_ids, merge_shards, merged_records, missing_ids, part_file_name,
    read_predictions, task_prediction_files,
)
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

_PART_FILE = PART_FILE


# ------------------------------------------------------------------------------------------------ prompt building
def truncate_middle(tokenizer, prompt: str, max_length: int) -> str:
    """The prompt itself if it has at most ``max_length`` tokens, else the decoded first and last
    ``max_length // 2`` tokens joined (official LongBench middle truncation)."""
    if max_length < 2:
        raise ValueError(f"max_length {max_length}: middle truncation keeps max_length // 2 tokens at each end; "
                         "give at least 2")
    token_ids = tokenizer(prompt, truncation=False, add_special_tokens=True)["input_ids"]
    if len(token_ids) <= max_length:
        return prompt
    half = max_length // 2
    head = tokenizer.decode(token_ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(token_ids[len(token_ids) - half:], skip_special_tokens=True)
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
    from ...patches.decode_cache import cache_keyword
    from ...patching import generation_cache

    cache = generation_cache(model)  # a GrowingCache where a decode method keeps its index with the cache
    if cache is not None:
        kwargs[cache_keyword(model)] = cache
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


# ------------------------------------------------------------------------------------------------ the loop
def shard_file_name(task: str, process_index: int, num_processes: int, run_id: str = "unset") -> str:
    """``<task>.jsonl`` for a single process, ``<task>.hfsa-partRR-of-NN.<run_id>.jsonl`` for process RR of NN
    (:func:`files.part_file_name`)."""
    if num_processes == 1:
        return f"{task}.jsonl"
    return part_file_name(task, process_index, num_processes, run_id)


def pending_samples(task_samples: dict[str, tuple[TaskSpec, list[dict]]], out_dir: str,
                    run_id: Optional[str] = None) -> list[tuple[str, str]]:
    """(task, _id) of every sample that has no prediction yet in ``<task>.jsonl`` or a shard part (of the run
    ``run_id``, where given) of ``out_dir``, tasks in the order of ``task_samples``, samples in dataset order.
    Sharded runs compute it once, before any process writes."""
    pending = []
    for task, (_, samples) in task_samples.items():
        already = done_ids(out_dir, task, run_id)
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
    run_id: str = "unset",
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
        pending = pending_samples(task_samples, out_dir, run_id if num_processes > 1 else None)
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
        name = shard_file_name(task, process_index, num_processes, run_id)
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
