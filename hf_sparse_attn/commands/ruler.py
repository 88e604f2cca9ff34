"""`hf-sparse-attn ruler`: RULER's synthetic tasks (offline) and a pass key at every depth, with a (patched) model.

Examples::

    hf-sparse-attn ruler --model smollm2 --tasks niah_single_1,passkey --lengths 4096 --samples 10 --out runs/exact
    hf-sparse-attn ruler --model smollm2 --tasks niah_single_1,vt --lengths 4096,8192 --samples 20 \\
        --method sparse_hyper --layers 15 --select weight_norm --out runs/sh15
    hf-sparse-attn ruler --model smollm2 --tasks passkey --lengths 16384 --rope-scaling yarn --out runs/yarn16k
    torchrun --standalone --nproc_per_node 8 -m hf_sparse_attn.cli ruler --model PATH --lengths 4096,8192 --out runs/x

Hsieh et al. 2024, "RULER: What's the Real Context Size of Your Long-Context Language Models?": the 11 tasks
without QA, generated offline (the essay haystack replaced by offline Wikipedia articles); ``passkey`` is the classic
pass-key retrieval at depths 0, 10, ..., 100 % (samples cycle through them).

Order of work: arguments, tasks, lengths against the model's positions, the wonderwords word lists and the first
sample of every (task, length) are checked with the tokenizer alone, before any model loads; then the processes join
(torchrun), process 0 takes the output directory (``RunDir``: the settings recorded, a rerun with other settings
refused naming what differs, a rerun that only adds tasks or lengths accepted, a lock while it runs), the model
loads, and the processes deal out the samples still missing. Each sample is predicted by exactly one process and appended at once to a crash-safe JSONL file (kill -9
loses at most the sample in flight; rerunning the same command resumes). Process 0 then merges the part files and
writes ``result.json``, ``summary.json``, ``report.md`` and the plots. A patched run keeps what its plan's counters
grew by during each sample in ``plan_counts.ndjson`` (:mod:`hf_sparse_attn.eval.plan_counts`): the served / fallback
counts of the summary and ``plan.json`` are summed over the samples of the directory, whichever invocation or process
predicted them, and a rerun with nothing left to predict leaves them as they were.

Output directory: ``<task>.jsonl`` (one record per sample: prediction, answers, hits, depth, prompt tokens),
``result.json`` ({task: {length: score}} and ``average``), ``summary.json``, ``report.md``, ``scores.png``,
``depth_heatmap.png``, ``plan.json`` and ``plan_counts.ndjson`` (a patched run), ``run_settings.json``. A sharded run
writes its parts to ``.ruler-shard-RR-of-NN.<task>.jsonl`` while it runs (merged and removed at the end).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import sys
import time
from typing import Any, Optional

from ..eval.plan_counts import COUNTS_FILE
from .arguments import (add_patch_arguments, decode_arguments, decode_settings, parse_params,
                        retrieval_probe_settings, selection_calibration)
from .models import SMOLLM2_NAMES, add_model_arguments

PART_FILE = re.compile(r"^\.ruler-shard-(?P<rank>\d{2,})-of-(?P<world>\d{2,})\.(?P<task>[a-z0-9_]+)\.jsonl$")
OUTPUT_FILES = ("result.json", "summary.json", "report.md", "scores.png", "depth_heatmap.png", "plan.json",
                COUNTS_FILE)
ROPE_SCALINGS = ("yarn", "linear", "dynamic")
# the settings a rerun may grow (RunDir's extendable): tasks and lengths added, the results already there kept
EXTENDABLE_SETTINGS = ("tasks", "lengths", "generation.max_new_tokens")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1].split("\n\nOrder of work")[0]
    add_model_arguments(parser, help="the causal LM: 'smollm2' (real SmolLM2-135M-Instruct, offline), or a local "
                                     "path / hub id in the local cache")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated tasks (default: the 11 RULER tasks without QA); also 'passkey'")
    parser.add_argument("--lengths", default="4096", help="comma-separated sample lengths in tokens (default 4096); "
                                                          "each sample's input + output tokens fit exactly")
    parser.add_argument("--samples", type=int, default=20, help="samples per task and length (default 20; RULER "
                                                                "reports 500)")
    parser.add_argument("--out", required=True, help="output directory (rerun the same command to resume)")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard the results of an earlier run with other settings in --out (only the files "
                             "this command writes)")
    add_patch_arguments(parser)
    parser.add_argument("--rope-scaling", choices=ROPE_SCALINGS, default=None,
                        help="needed for lengths beyond the model's max_position_embeddings: scale its RoPE to each "
                             "such length (factor length / positions)")
    parser.add_argument("--dtype", default="auto", help="model dtype when loading a path (auto, float32, bfloat16...)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples and of the patch plan")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="feed the plain RULER prompt even to a model with a chat template")
    parser.add_argument("--prefill-chunk-size", type=int, default=None, metavar="N",
                        help="feed each prompt in chunks of N tokens (generate(prefill_chunk_size=N)); local and "
                             "block_select serve the chunks as their whole prefill would, chunks of at most 16 "
                             "tokens are decode steps (default: the prompt at once)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# ------------------------------------------------------------------------------------------------ checks (no model)
def parse_tasks(text: Optional[str]) -> list[str]:
    from ..eval.ruler.tasks import RULER_TASKS, TASKS

    if not text:
        return list(RULER_TASKS)
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    bad = [t for t in names if t not in TASKS]
    if bad or not names:
        raise ValueError(f"unknown task(s) {', '.join(bad) or repr(text)}; --tasks takes: {', '.join(TASKS)} "
                         "(qa_1 / qa_2 are left out: SQuAD and HotpotQA cannot be downloaded here)")
    return names


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = sorted({int(t) for t in str(text).split(",") if t.strip()})
    except ValueError:
        raise ValueError(f"--lengths takes token counts like 4096,8192; got {text!r}") from None
    if not lengths or lengths[0] < 1:
        raise ValueError(f"--lengths takes positive token counts like 4096,8192; got {text!r}")
    return lengths


def resolve_model(name: str) -> tuple[str, str]:
    """(path or hub id to load from, display name). 'smollm2' -> the converted offline checkpoint."""
    if name.lower() in SMOLLM2_NAMES:
        from ..eval.data import smollm2_path

        return str(smollm2_path()), "SmolLM2-135M-Instruct"
    return name, name


def model_positions(path: str, trust_remote_code: bool) -> Optional[int]:
    """max_position_embeddings (or seq_length) of the checkpoint's config, read without loading weights."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - say what to do
        raise SystemExit(f"cannot load a model config from {path!r}: {err}. Pass a local model directory, a hub id in "
                         "the local cache, or smollm2") from None
    for name in ("max_position_embeddings", "seq_length", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_fingerprint(path: str) -> str:
    """A cheap fingerprint of a checkpoint directory (config.json contents, weight file names and sizes), taken
    before the model loads; a hub id fingerprints as its name."""
    h = hashlib.sha1()
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if name == "config.json":
                with open(full, "rb") as f:
                    h.update(f.read())
            elif name.endswith((".safetensors", ".bin", ".gguf", ".pt")) and os.path.isfile(full):
                h.update(f"{name}:{os.path.getsize(full)}".encode())
    else:
        h.update(path.encode())
    return h.hexdigest()[:16]


def _file_sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:16]


def check_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that can be checked before the model loads; returns the parsed values."""
    from ..eval.ruler.tasks import needs_wonderwords, require_wonderwords

    tasks = parse_tasks(args.tasks)
    lengths = parse_lengths(args.lengths)
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if getattr(args, "prefill_chunk_size", None) is not None and args.prefill_chunk_size < 1:
        raise ValueError(f"--prefill-chunk-size must be >= 1 (tokens per chunk), got {args.prefill_chunk_size}")
    params = parse_params(args.param)
    if args.plan and not os.path.isfile(args.plan):
        raise ValueError(f"--plan {args.plan}: no such file (a PatchPlan JSON written by plan.save / a previous run)")
    if any(needs_wonderwords(t) for t in tasks):
        require_wonderwords()
    if args.method == "none" and not args.plan and args.param:
        raise ValueError("--param is a method parameter: give --method too (or --plan)")
    if args.method != "none" and not args.plan:
        from .. import list_methods

        if args.method not in list_methods():
            raise ValueError(f"unknown method {args.method!r}; registered: {', '.join(list_methods())}")
    decode = decode_arguments(args)
    if decode["decode_method"] is not None:
        from ..methods.decode import get_decode_spec

        get_decode_spec(decode["decode_method"]).resolve_params(decode["decode_params"] or {})
    return {"tasks": tasks, "lengths": lengths, "params": params, "decode": decode}


def check_lengths(lengths: list[int], positions: Optional[int], rope_scaling: Optional[str], model: str) -> None:
    too_long = [n for n in lengths if positions and n > positions]
    if too_long and not rope_scaling:
        raise SystemExit(f"length(s) {too_long} exceed the {positions} positions of {model}: add --rope-scaling yarn "
                         f"(or linear / dynamic) to scale its RoPE to each longer length, or use --lengths <= "
                         f"{positions}")


def check_samples(tasks: list[str], lengths: list[int], tokenizer, seed: int, chat_template: bool) -> None:
    """Generate the first sample of every (task, length): a length too short for a task fails here, naming the
    minimum, before the model loads."""
    from ..eval.ruler.tasks import LengthTooShortError, generate_sample

    short: dict[str, tuple[list[int], int]] = {}
    for task in tasks:
        for length in lengths:
            try:
                generate_sample(task, tokenizer, length, seed=seed, index=0, chat_template=chat_template)
            except LengthTooShortError as err:
                short.setdefault(task, ([], err.minimum))[0].append(length)
    if short:
        raise ValueError("length(s) too short for the task's template with the smallest haystack and its output "
                         "tokens (with this tokenizer): " + "; ".join(
                             f"{task} at {lens} needs at least {minimum} tokens"
                             for task, (lens, minimum) in short.items()) + ". Use longer --lengths or drop the task")


# ------------------------------------------------------------------------------------------------ files
def part_file_name(task: str, rank: int, world: int) -> str:
    return f".ruler-shard-{rank:02d}-of-{world:02d}.{task}.jsonl"


def task_files(out_dir: str, task: str) -> list[str]:
    """``<task>.jsonl`` and the shard parts of ``task`` in ``out_dir`` (main file first)."""
    files = [os.path.join(out_dir, f"{task}.jsonl")]
    if os.path.isdir(out_dir):
        for name in sorted(os.listdir(out_dir)):
            match = PART_FILE.match(name)
            if match and match.group("task") == task:
                files.append(os.path.join(out_dir, name))
    return [f for f in files if os.path.exists(f)]


def owned_files(out_dir: str) -> list[str]:
    """What this command writes in ``out_dir`` (and may discard with --overwrite): never anything else."""
    from ..eval.ruler.tasks import TASKS

    names = [f"{t}.jsonl" for t in TASKS] + list(OUTPUT_FILES)
    if os.path.isdir(out_dir):
        names += [n for n in os.listdir(out_dir) if PART_FILE.match(n)]
    return names


def read_task_records(out_dir: str, task: str) -> dict[str, dict]:
    """id -> record over the task's files; the same id twice with different predictions raises ValueError."""
    from ..eval.store import read_records

    records: dict[str, dict] = {}
    for path in task_files(out_dir, task):
        for record in read_records(path):
            rid = record.get("id")
            if rid is None:
                continue
            if rid in records and records[rid].get("pred") != record.get("pred"):
                raise ValueError(f"sample {rid} has two different predictions in {out_dir} ({os.path.basename(path)} "
                                 "and another file): delete one of the lines and rerun the same command")
            records.setdefault(rid, record)
    return records


def merge_parts(out_dir: str, task: str, order: list[str]) -> None:
    """Merge ``<task>.jsonl`` and its parts into ``<task>.jsonl`` (in ``order``; atomic replace), then remove the
    parts. A kill in between leaves identical copies, which count once."""
    paths = task_files(out_dir, task)
    target = os.path.join(out_dir, f"{task}.jsonl")
    parts = [p for p in paths if p != target]
    if not parts:
        return
    records = read_task_records(out_dir, task)
    rank = {rid: i for i, rid in enumerate(order)}
    ordered = sorted(records.values(), key=lambda r: rank.get(r["id"], len(rank)))
    from ..eval.store import replace_records

    replace_records(target, ordered, merged_parts=parts)


# ------------------------------------------------------------------------------------------------ the command
def run(args: argparse.Namespace) -> int:
    parsed = check_arguments(args)
    tasks, lengths, params = parsed["tasks"], parsed["lengths"], parsed["params"]
    path, model_name = resolve_model(args.model)
    positions = model_positions(path, args.trust_remote_code)
    check_lengths(lengths, positions, args.rope_scaling, model_name)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    chat = not args.no_chat_template
    check_samples(tasks, lengths, tokenizer, args.seed, chat)

    from ..eval.ruler.tasks import GENERATOR_VERSION, TASK_SPECS, uses_chat_template

    patched = bool(args.plan) or args.method != "none"
    settings = {
        "command": "ruler",
        "model": args.model if args.model.lower() in SMOLLM2_NAMES else os.path.abspath(path)
        if os.path.isdir(path) else path,
        "model_fingerprint": model_fingerprint(path),
        "method": None if args.plan else args.method,
        "layers": args.layers if patched and not args.plan else None,
        "select": args.select if patched and not args.plan else None,
        "plan": {"path": os.path.abspath(args.plan), "sha1": _file_sha(args.plan)} if args.plan else None,
        "params": params,
        **(decode_settings(args) if patched and not args.plan else {}),
        **(retrieval_probe_settings(args, positions) if patched else {}),
        "seed": args.seed,
        "lengths": lengths,
        "tasks": tasks,
        "samples": args.samples,
        "rope_scaling": args.rope_scaling,
        "dtype": args.dtype,
        "generation": {"decoding": "greedy", "chat_template": uses_chat_template(tokenizer, chat),
                       "max_new_tokens": {t: TASK_SPECS[t].max_new_tokens for t in tasks},
                       **({"prefill_chunk_size": args.prefill_chunk_size} if args.prefill_chunk_size else {})},
        "essay_haystack": "offline English Wikipedia articles (substituting Paul Graham's essays)",
        "generator_version": GENERATOR_VERSION,
    }

    from ..eval.longbench.distributed import joined_processes

    with joined_processes() as processes:
        return _run(args, tasks, lengths, params, settings, tokenizer, path, model_name, positions, processes)


def _open_run_dir(args, settings, processes):
    from ..eval.run_dir import RunDir

    run_dir, error = None, None
    if processes.is_main:
        try:
            # a rerun may add tasks and lengths: each task has its own file, and what is there has the same settings
            run_dir = RunDir(args.out, settings, overwrite=args.overwrite, owned_files=owned_files(args.out),
                             command="hf-sparse-attn ruler", extendable=EXTENDABLE_SETTINGS).open()
            if run_dir.extended:
                print(f"hf-sparse-attn ruler: adding to the run in {args.out}: {'; '.join(run_dir.extended)}",
                      file=sys.stderr, flush=True)
        except ValueError as err:
            error = str(err)
    error = processes.broadcast(error)
    if error:
        raise ValueError(error)
    return run_dir


def _pending(tasks, lengths, samples, seed, out_dir) -> list[tuple[str, int, int]]:
    """(task, length, index) of every sample without a prediction, ordered by length (RoPE rescaled once per
    length), then task, then index."""
    from ..eval.ruler.tasks import sample_id

    done = {t: set(read_task_records(out_dir, t)) for t in tasks}
    return [(t, n, i) for n in lengths for t in tasks for i in range(samples)
            if sample_id(t, n, seed, i) not in done[t]]


def _load(args, path, processes):
    from .models import load_model

    if args.model.lower() in SMOLLM2_NAMES:
        device = str(processes.device) if processes.device.type != "cpu" else None
        return load_model(args.model, device=device, causal_lm=True)[0]
    device_map = {"": str(processes.device)} if processes.distributed else "auto"
    return load_model(path, args.trust_remote_code, dtype=args.dtype, device_map=device_map, tokenizer=False,
                      causal_lm=True)[0]


def _run(args, tasks, lengths, params, settings, tokenizer, path, model_name, positions, processes) -> int:
    run_dir = _open_run_dir(args, settings, processes)
    try:
        return _predict_and_report(args, tasks, lengths, params, settings, tokenizer, path, model_name, positions,
                                   processes)
    finally:
        if run_dir is not None:
            run_dir.close()


def _predict_and_report(args, tasks, lengths, params, settings, tokenizer, path, model_name, positions,
                        processes) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..eval.plan_counts import SampleCounts
    from ..eval.store import JsonlStore
    from ..eval.ruler import predict
    from ..eval.ruler.metrics import sample_hits
    from ..eval.ruler.tasks import generate_sample, sample_id

    started = time.perf_counter()
    chat = not args.no_chat_template
    pending = _pending(tasks, lengths, args.samples, args.seed, args.out)
    if processes.distributed:
        digest = hashlib.sha1(json.dumps(pending).encode()).hexdigest()
        if len(set(processes.all_gather(digest))) != 1:
            raise ValueError("the processes disagree about the samples still to predict; with several machines --out "
                             "must be on a filesystem all of them share")
    mine = pending[processes.rank::processes.world_size]

    plan = None
    model = None
    if mine or processes.is_main:
        model = _load(args, path, processes)
        if args.plan or args.method != "none":
            from hf_sparse_attn import patch_model

            if args.plan:
                plan = patch_model(model, plan=args.plan, seed=args.seed)
            else:
                plan = patch_model(model, method=args.method, layers=args.layers, select=args.select, seed=args.seed,
                                   **selection_calibration(args, tokenizer, positions), **decode_arguments(args),
                                   **params)
            if processes.is_main and not os.path.exists(os.path.join(args.out, "plan.json")):
                plan.save(os.path.join(args.out, "plan.json"))  # rewritten with the run's counts at the end

    stores: dict[str, JsonlStore] = {}
    sample_counts = SampleCounts(plan, args.out) if plan is not None and mine else None
    bar = tqdm(total=len(mine), desc=f"ruler[{processes.rank}/{processes.world_size}]", unit="sample",
               disable=args.no_progress or processes.local_rank != 0, dynamic_ncols=True)
    scaled_to = None
    rope_used: dict[int, Any] = {}
    for task, length, index in mine:
        if args.rope_scaling and scaled_to != length:
            from ..eval.bench.measure import scale_rope

            rope_used[length] = scale_rope(model, length, args.rope_scaling)
            scaled_to = length
        bar.set_postfix_str(f"{task} {length}")
        t0 = time.perf_counter()
        sample = generate_sample(task, tokenizer, length, seed=args.seed, index=index, chat_template=chat)
        torch.manual_seed(args.seed)  # a sample never depends on what ran before it: resumed == uninterrupted
        pred = predict(model, tokenizer, sample, chat_template=chat, prefill_chunk_size=args.prefill_chunk_size)
        record = {"id": sample.id, "task": task, "length": length, "index": index, "pred": pred,
                  "answers": sample.answers, "hits": sample_hits(pred, sample.answers), "depth": sample.depth,
                  "answer_depths": sample.answer_depths, "prompt_tokens": sample.prompt_tokens,
                  "max_new_tokens": sample.max_new_tokens, "haystack_units": sample.haystack_units,
                  "chat_template": sample.chat_template, "seconds": round(time.perf_counter() - t0, 3)}
        if processes.distributed:
            record["shard"] = f"{processes.rank:02d}-of-{processes.world_size:02d}"
        if sample_counts is not None:  # before the prediction: a kill in between leaves counts that count nothing
            sample_counts.record(task, sample.id)
        if task not in stores:
            name = f"{task}.jsonl" if not processes.distributed else part_file_name(task, processes.rank,
                                                                                       processes.world_size)
            stores[task] = JsonlStore(os.path.join(args.out, name), ensure_ascii=False)
        stores[task].append(record)
        bar.update(1)
    bar.close()
    counts = {"predicted": len(mine), "wall_s": round(time.perf_counter() - started, 1)}
    gathered = processes.all_gather({"counts": counts})  # the barrier: every part and every count is written
    if not processes.is_main:
        return 0

    records: dict[str, list[dict]] = {}
    for task in tasks:
        order = [sample_id(task, n, args.seed, i) for n in lengths for i in range(args.samples)]
        merge_parts(args.out, task, order)
        by_id = read_task_records(args.out, task)
        missing = [rid for rid in order if rid not in by_id]
        if missing:
            raise ValueError(f"{len(missing)} sample(s) of {task} have no prediction after every process finished "
                             f"(e.g. {missing[:3]}); rerun the same command to predict them")
        records[task] = [by_id[rid] for rid in order]

    from ..eval.ruler.report import write_outputs

    meta = {
        "model": model_name,
        "model_path": settings["model"],
        "positions": positions,
        "command": "hf-sparse-attn ruler " + " ".join(shlex.quote(a) for a in getattr(args, "_argv", sys.argv[2:])),
        "settings": settings,
        "num_processes": processes.world_size,
        "this_invocation": [g["counts"] for g in gathered],
        "rope": {str(k): v for k, v in rope_used.items()} or None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    predicted = sum(g["counts"]["predicted"] for g in gathered)
    plan_summary, plan_dict = _run_plan_counts(args.out, plan, records) if plan is not None else (None, None)
    result = write_outputs(args.out, records, lengths, meta, plan_summary, plan_dict)
    if not predicted:
        print(f"hf-sparse-attn ruler: nothing left to predict: every sample already has a prediction in {args.out}; "
              "the outputs were rebuilt from them", file=sys.stderr)
    elif plan_summary and plan_summary.get("warning"):
        print(plan_summary["warning"], file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


def _run_plan_counts(out_dir: str, plan, records: dict[str, list[dict]]) -> tuple[Optional[dict], Optional[dict]]:
    """(the plan's served / fallback counts over every sample of ``records``, whichever invocation or process
    predicted it, with ``warning``; the plan with those per-layer counts), also saved as ``plan.json``. A directory
    whose samples have no counts (predicted by a version that kept none) keeps the counts its summary.json had."""
    from ..eval.plan_counts import plan_counts, run_plan

    total, counted = run_plan(plan, out_dir, {task: [r["id"] for r in recs] for task, recs in records.items()})
    if not counted:
        earlier = _earlier_counts(out_dir)
        if earlier is not None:
            return earlier
    counts = plan_counts(total)
    served, calls, layers = counts["served"], counts["prefill_calls"], counts["patched_layers"]
    out = {**counts, "samples_counted": counted, "warning": None}
    if (calls and served < 0.5 * calls) or (counted and not served):
        top = "; ".join(f"{r}: {n}" for r, n in list(out["fallbacks"].items())[:3]) or "no call reached the method"
        out["warning"] = (f"!! THE PLAN SERVED {served} OF {calls} PREFILL ATTENTION CALLS in its patched layers "
                          f"{layers}: these scores are mostly (or only) exact attention. Top fallback reasons: {top}.")
    if counted:
        total.save(os.path.join(out_dir, "plan.json"))
    return out, total.to_dict()


def _earlier_counts(out_dir: str) -> Optional[tuple[dict, dict]]:
    """(plan counts, plan) of the summary.json in ``out_dir``, or None where there is none with counts."""
    path = os.path.join(out_dir, "summary.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    counts = summary.get("plan_counts_this_invocation")
    if not isinstance(counts, dict) or not counts.get("prefill_calls"):
        return None
    return counts, summary.get("plan")
