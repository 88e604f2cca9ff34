"""`hf-sparse-attn longbench`: predict LongBench / LongBench-E / the offline suite with a (patched) model, then score.

Examples::

    hf-sparse-attn longbench --model THUDM/chatglm2-6b-32k --data LongBench/data.zip --e --out runs/exact
    hf-sparse-attn longbench --model smollm2 --suite offline --contexts 2,4 --max-samples 4 \\
        --method sparse_hyper --layers 15 --select weight_norm --out runs/sh15
    torchrun --standalone --nproc_per_node 8 -m hf_sparse_attn.cli longbench --model ... --data ... --out runs/x

Output directory: ``<task>.jsonl`` predictions (resumable: rerun the same command after a crash),
``result.json`` (official format), ``summary.json`` (scores + categories + averages + run metadata),
``report.md``, ``plan.json`` (the PatchPlan used, with its served / fallback counts over every prediction of the
directory, whichever invocation or process made it), ``plan_counts.ndjson`` (what those counters grew by during each
sample: :mod:`hf_sparse_attn.eval.plan_counts`), ``run_settings.json`` (the settings the predictions were made with:
a rerun with other settings is refused unless ``--overwrite``; ``run_dir.py``), and for the offline suite ``data/``
(the generated samples). While a run writes it holds a lock on the directory: a second run on the same ``--out`` is
refused, naming the process.

Order of work: arguments and data are checked first (unknown tasks, empty files, missing fields: a clear error
before any model loads), then the processes join (``distributed.py``), then the model loads, the processes agree
on the samples still to predict and deal them out, and process 0 merges, checks and scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any

from ..eval.longbench.tasks import LONGBENCH_E_TASKS, LONGBENCH_TASKS, OFFLINE_KINDS, get_task
from ..eval.plan_counts import COUNTS_FILE
from .arguments import add_patch_arguments, decode_arguments, decode_settings
from .arguments import parse_params as _parse_params
from .models import check_local_or_hub, model_name


def parse_params(items: list[str]) -> dict[str, Any]:
    """--param NAME=VALUE items -> {name: value} (:func:`hf_sparse_attn.commands.arguments.parse_params`)."""
    return _parse_params(items, option="--param")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=model_name,
                        help="model path or hub id (loaded with device_map='auto'), or 'smollm2' for the real "
                             "SmolLM2-135M-Instruct shipped offline")
    parser.add_argument("--data", help="LongBench data: a directory of <task>.jsonl, data.zip, parquet files or a "
                                       "datasets id (not needed for --suite offline)")
    parser.add_argument("--suite", choices=("longbench", "offline"), default="longbench",
                        help="longbench: the LongBench tasks from --data (default); offline: needle, retrieval and count "
                             "tasks built from the offline Wikipedia / People's Daily text (no download)")
    parser.add_argument("--tasks", help="comma-separated tasks (default: all 21, the 13 of LongBench-E with --e, or "
                                        "every offline kind); offline: kinds like needle_middle,retrieval_en")
    parser.add_argument("--e", action="store_true", help="LongBench-E (reads <task>_e files, scores by length bucket)")
    parser.add_argument("--out", required=True, help="output directory (rerun with the same --out to resume)")
    add_patch_arguments(parser)
    parser.add_argument("--max-length", type=int,
                        help="prompt budget in tokens before middle truncation (default: the official table, "
                             "else positions - 512; offline suite: positions - 32)")
    parser.add_argument("--max-samples", type=int, help="first N samples per task (offline: samples per task)")
    parser.add_argument("--max-new-tokens", type=int,
                        help="cap every task's output length (smoke tests only: official lengths otherwise)")
    parser.add_argument("--contexts", default="2,4,8", help="offline suite context sizes in K tokens (x1024)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patch plan, sampling and offline data")
    parser.add_argument("--dtype", default="auto", help="model dtype when loading a path (auto, float32, bfloat16...)")
    parser.add_argument("--no-chat-template", action="store_true", help="never apply the chat template")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the checkpoint's own code (ChatGLM2/3); off by default")
    parser.add_argument("--overwrite", action="store_true",
                        help="--out holds predictions made with other settings: delete them (only the files this "
                             "command writes) and start afresh; without it such a rerun is refused")


def load_model(name: str, dtype: str = "auto", device_map: Any = "auto", trust_remote_code: bool = False):
    """(model, tokenizer, model_name) through the command line's one loader (:mod:`hf_sparse_attn.commands.models`;
    generation needs a causal LM). 'smollm2' is the offline real model; anything else goes through from_pretrained
    with ``device_map`` ("auto": accelerate spreads it over the visible devices; a sharded run passes
    ``{"": device}``, one model copy per process on its own device)."""
    from .models import SMOLLM2_NAMES
    from .models import load_model as load_named_model

    if name.lower() in SMOLLM2_NAMES:
        device = device_map[""] if isinstance(device_map, dict) and "" in device_map else None
        model, tokenizer = load_named_model(name, device=device, causal_lm=True)
        return model, tokenizer, "SmolLM2-135M-Instruct"
    model, tokenizer = load_named_model(name, trust_remote_code, dtype=dtype, device_map=device_map, causal_lm=True)
    return model, tokenizer, name


def _task_list(args) -> list[str]:
    """The tasks asked for, checked: known LongBench (-E) tasks, or offline kinds."""
    names = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    if args.suite == "offline":
        bad = [t for t in names if t not in OFFLINE_KINDS]
        if bad:
            raise ValueError(f"unknown offline kind(s) {', '.join(bad)}; --suite offline --tasks takes kinds: "
                             f"{', '.join(OFFLINE_KINDS)}")
        return names or list(OFFLINE_KINDS)
    if not names:
        return list(LONGBENCH_E_TASKS if args.e else LONGBENCH_TASKS)
    for t in names:
        get_task(t)
    if args.e:
        bad = [t for t in names if t not in LONGBENCH_E_TASKS]
        if bad:
            raise ValueError(f"{bad} are not LongBench-E tasks; LongBench-E has {', '.join(LONGBENCH_E_TASKS)}")
    return names


def check_arguments(args: argparse.Namespace) -> None:
    """Argument errors that argparse cannot see, raised before anything is loaded."""
    if args.suite == "longbench" and not args.data:
        raise ValueError("--data is required for LongBench (a directory of <task>.jsonl, data.zip, parquet or a "
                         "datasets id); use --suite offline for the generated suite")
    if args.suite == "longbench":
        check_local_or_hub(args.data, "--data", "a directory of <task>.jsonl, data.zip, parquet files or a datasets "
                                                "id (org/name)")
    for flag, least in (("max_length", 2), ("max_samples", 1), ("max_new_tokens", 1)):
        value = getattr(args, flag)
        if value is not None and value < least:
            why = " (middle truncation keeps max_length // 2 tokens at each end)" if flag == "max_length" else ""
            raise ValueError(f"--{flag.replace('_', '-')} must be >= {least}{why}, got {value}")
    if args.suite == "offline":
        try:
            contexts = [int(c) for c in str(args.contexts).split(",") if c.strip()]
        except ValueError:
            raise ValueError(f"--contexts takes sizes in K tokens like 2,4,8; got {args.contexts!r}") from None
        if not contexts or min(contexts) < 1:
            raise ValueError(f"--contexts takes positive sizes in K tokens like 2,4,8; got {args.contexts!r}")
    if args.plan and not os.path.isfile(args.plan):
        raise ValueError(f"--plan {args.plan}: no such file (a PatchPlan JSON written by plan.save / a previous run)")
    if args.select in ("measured", "retrieval") and not args.plan:
        raise ValueError(f"--select {args.select} needs calibration input, which longbench does not make: save a plan "
                         f"made with patch_model(..., select={args.select!r}, calibration=...) and pass --plan (or "
                         f"run `hf-sparse-attn ruler --select retrieval`, which makes its probe)")


def load_longbench_data(args: argparse.Namespace, tasks: list[str]) -> dict:
    """task -> (spec, samples) of the released data, every task checked (fields, non-empty) before the model
    loads."""
    from ..eval.longbench.data import check_samples, load_task

    task_samples, missing = {}, []
    for task in tasks:
        try:
            samples = load_task(args.data, task, args.e, args.max_samples)
        except FileNotFoundError:
            missing.append(task)
            continue
        check_samples(get_task(task), samples, f"--data {args.data}", longbench_e=args.e)
        task_samples[task] = (get_task(task), samples)
    if missing:
        from ..eval.longbench.data import file_name

        names = ", ".join(f"{file_name(t, args.e)}.jsonl" for t in missing)
        present = [t for t in tasks if t not in missing]
        hint = (f"; to run the tasks it has, pass --tasks {','.join(present)}" if present
                else "; check --data (and --e: LongBench-E files are <task>_e.jsonl)")
        raise FileNotFoundError(f"--data {args.data} has no file for {len(missing)} of {len(tasks)} task(s): "
                                f"{names}{hint}")
    return task_samples


def run_settings(args: argparse.Namespace) -> dict:
    """What the predictions of ``--out`` depend on: recorded in run_settings.json, a rerun with other values is
    refused. Tasks and --max-samples are left out for LongBench (more tasks or samples extend a run); the plan
    arguments are left out of an unpatched run."""
    from ..eval.run_dir import path_fingerprint

    patched = bool(args.plan) or args.method != "none"
    plan_sha = None
    if args.plan:
        with open(args.plan, "rb") as f:
            plan_sha = hashlib.sha1(f.read()).hexdigest()[:16]
    offline = args.suite == "offline"
    return {
        "command": "longbench", "model": args.model, "model_fingerprint": path_fingerprint(args.model),
        "dtype": args.dtype, "suite": args.suite, "longbench_e": bool(args.e),
        "contexts": str(args.contexts) if offline else None, "offline_samples": args.max_samples if offline else None,
        "method": (None if args.plan else args.method), "plan_sha1": plan_sha,
        "layers": args.layers if patched and not args.plan else None,
        "select": args.select if patched and not args.plan else None,
        "params": parse_params(args.param) if patched else {},
        **(decode_settings(args) if patched and not args.plan else {}),
        "seed": args.seed, "max_length": args.max_length, "max_new_tokens_cap": args.max_new_tokens,
        "chat_template": not args.no_chat_template,
    }


OWNED_FILES = ("result.json", "summary.json", "report.md", "plan.json", COUNTS_FILE)


def owned_names(args: argparse.Namespace, tasks: list[str]) -> tuple[list[str], list[str]]:
    """(files, name patterns) this command writes into --out: what --overwrite may delete, nothing else."""
    from ..eval.longbench.files import PART_FILE
    from ..eval.longbench.tasks import LONGBENCH_TASKS

    files = list(OWNED_FILES) + [f"{t}.jsonl" for t in LONGBENCH_TASKS]
    patterns = [PART_FILE.pattern, r"\.processes-\d+-\d+"]
    if args.suite == "offline":
        patterns.append(r"(%s)_\d+k\.jsonl" % "|".join(OFFLINE_KINDS))
    return files, patterns


def _served_note(plan, scope: str = "in this invocation") -> str:
    """A warning when the plan served nothing or fewer than half of the prefill calls (calls against the KV cache,
    counted apart, are not counted here), with the top reasons; '' otherwise. ``scope`` says which calls the plan's
    counters cover."""
    from ..patches.base import DECODE_REASON

    served = sum(layer.served for layer in plan.layers)
    reasons: dict[str, int] = {}
    for layer in plan.layers:
        for r, n in layer.fallbacks.items():
            if r != DECODE_REASON:  # plans written before decode calls were counted apart
                reasons[r] = reasons.get(r, 0) + n
    calls = served + sum(reasons.values())
    if calls == 0 or served * 2 >= calls:
        return ""
    top = "; ".join(f"{r}: {n}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
    what = "served none" if served == 0 else f"served only {served}"
    return (f"{plan.method_summary!r} {what} of the {calls} prefill attention calls of its patched layers {scope}: "
            f"the rest ran exact attention ({top}). These scores are mostly the unpatched model's; lower the "
            "threshold named (e.g. --param min_seq_len=...) or use longer inputs")


def _agree_on_pending(processes, task_samples: dict, out_dir: str, run_id: str | None = None) -> list:
    """The samples still to predict, the same list in every process (checked), and a check that every process
    sees the output directory (a multi-machine run needs it on a shared filesystem)."""
    from ..eval.longbench.predict import pending_samples

    pending = pending_samples(task_samples, out_dir, run_id)
    if not processes.distributed:
        return pending
    marker = None
    if processes.is_main:
        marker = os.path.join(out_dir, f".processes-{os.getpid()}-{time.time_ns()}")
        with open(marker, "w") as f:
            f.write("written by process 0 of a sharded run; removed once every process has seen it\n")
    marker = processes.broadcast(marker)
    fingerprint = hashlib.sha1(json.dumps([[t, [s["_id"] for s in samples]] for t, (_, samples) in task_samples.items()]
                                          + [pending]).encode()).hexdigest()
    views = processes.all_gather((fingerprint, os.path.exists(marker)))
    if processes.is_main:
        os.remove(marker)
    blind = [rank for rank, (_, sees) in enumerate(views) if not sees]
    if blind:
        raise ValueError(f"process(es) {blind} cannot see {out_dir} as process 0 writes it: with several machines "
                         "--out must be on a filesystem that all of them share")
    if len({fp for fp, _ in views}) != 1:
        raise ValueError("the processes disagree about the samples to predict (different --data, or files changing "
                         "while they started); rerun with the same data visible to every process")
    return pending


def run(args: argparse.Namespace) -> int:
    from ..eval.run_dir import RunDir

    check_arguments(args)
    tasks = _task_list(args)
    data = args.data if args.suite == "longbench" and args.data and os.path.exists(args.data) else None
    files, patterns = owned_names(args, tasks)
    run_dir = RunDir(args.out, run_settings(args), overwrite=args.overwrite, owned_files=files,
                     owned_patterns=patterns, forbidden=[data], command="longbench")  # --out holding --data: refused
    task_samples = load_longbench_data(args, tasks) if args.suite == "longbench" else {}
    from ..eval.longbench.distributed import joined_processes

    with joined_processes() as processes:
        if processes.is_main:  # one writer per directory: process 0 holds the lock for the whole run
            run_dir.open()
        processes.barrier()  # nobody reads --out before process 0 checked (or, with --overwrite, cleared) it
        try:
            return _run(args, tasks, task_samples, processes, run_dir.run_id)
        finally:
            run_dir.close()


def _run(args: argparse.Namespace, tasks: list[str], task_samples: dict, processes, run_id: str = "unset") -> int:
    from ..eval.longbench.predict import merge_shards, missing_ids, predict_tasks
    from ..eval.longbench.score import count_samples, environment_info, markdown_report, score_directory, summarize
    from ..eval.longbench.tasks import default_max_length, offline_task
    from ..eval.plan_counts import SampleCounts, plan_counts

    started = time.perf_counter()
    device_map = "auto" if not processes.distributed else {"": str(processes.device)}
    model, tokenizer, model_name = load_model(args.model, args.dtype, device_map, args.trust_remote_code)
    os.makedirs(args.out, exist_ok=True)
    positions = getattr(model.config, "max_position_embeddings", None)
    if args.max_length and positions and args.max_length > positions:
        raise ValueError(f"--max-length {args.max_length} is more than the model's {positions} positions: prompts "
                         f"would not be truncated to fit; give at most {positions} (minus the output length)")

    plan_dict, plan = None, None
    if args.plan or args.method != "none":
        from hf_sparse_attn import patch_model

        method_params = parse_params(args.param)
        if args.plan:
            plan = patch_model(model, plan=args.plan, seed=args.seed)
        else:
            plan = patch_model(model, method=args.method, layers=args.layers, select=args.select, seed=args.seed,
                               **decode_arguments(args), **method_params)
        plan_dict = plan.to_dict()
        if processes.is_main and not os.path.exists(os.path.join(args.out, "plan.json")):
            plan.save(os.path.join(args.out, "plan.json"))  # rewritten with its counts once samples are predicted

    if args.max_length:
        max_length = args.max_length
    elif args.suite == "offline":
        max_length = positions - 32
    else:
        max_length = default_max_length(model_name, positions)

    if args.suite == "offline":
        from ..eval.longbench.offline import build_offline_suite, write_suite

        contexts = [int(c) for c in str(args.contexts).split(",") if c.strip()]
        suite = build_offline_suite(tokenizer, contexts, num_samples=args.max_samples or 5, seed=args.seed,
                                    kinds=tasks)
        if processes.is_main:
            write_suite(suite, os.path.join(args.out, "data"))
        task_samples = {name: (offline_task(name), samples) for name, samples in suite.items()}

    if args.max_new_tokens:
        task_samples = {name: (dataclasses.replace(spec, max_new_tokens=min(spec.max_new_tokens, args.max_new_tokens)),
                               samples) for name, (spec, samples) in task_samples.items()}
    pending = _agree_on_pending(processes, task_samples, args.out, run_id)
    on_sample = None
    if plan is not None:
        sample_counts = SampleCounts(plan, args.out)

        def on_sample(task: str, record: dict) -> None:  # what the plan's counters grew by during this sample
            sample_counts.record(task, record["_id"])

    counts = predict_tasks(model, tokenizer, task_samples, args.out, max_length, seed=args.seed,
                           process_index=processes.rank, num_processes=processes.world_size,
                           chat_template=not args.no_chat_template, pending=pending,
                           progress=not args.no_progress and processes.local_rank == 0, on_sample=on_sample,
                           run_id=run_id)
    gathered = processes.all_gather((counts, plan.fallback_counts() if plan is not None else {}))
    if not processes.is_main:  # the gather is also the barrier: every shard and every count is written after it
        return 0
    all_counts = [c for c, _ in gathered]
    fallbacks_now: dict[str, int] = {}
    for _, fallbacks in gathered:
        for reason, n in fallbacks.items():
            fallbacks_now[reason] = fallbacks_now.get(reason, 0) + n
    for task, (_, samples) in task_samples.items():
        order = [s["_id"] for s in samples]
        merge_shards(args.out, task, order=order, run_id=run_id)
        lost = missing_ids(args.out, task, order, run_id=run_id)
        if lost:
            raise ValueError(f"{len(lost)} sample(s) of {task} have no prediction after every process finished "
                               f"(e.g. {lost[:3]}); with several machines --out must be on a shared filesystem. "
                               "Rerun the same command to predict them.")
    asked = list(task_samples)
    result = score_directory(args.out, longbench_e=args.e, tasks=asked)
    samples_scored = count_samples(args.out, tasks=asked)
    meta = {
        "model": model_name,
        "suite": "LongBench-E" if args.e else ("offline" if args.suite == "offline" else "LongBench"),
        "method": args.method if not args.plan else f"plan {args.plan}",
        "layers": plan_dict and [layer["layer_idx"] for layer in plan_dict["layers"] if layer.get("method")],
        "select": args.select,
        "method_params": parse_params(args.param),
        "max_length": max_length,
        "max_new_tokens_cap": args.max_new_tokens,
        "seed": args.seed,
        "num_processes": processes.world_size,
        "samples": samples_scored,
        "this_invocation": counts if len(all_counts) == 1 else {"per_process": all_counts},
        "fallbacks_this_invocation": fallbacks_now,
        "wall_s_this_invocation": round(time.perf_counter() - started, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "environment": environment_info(),
    }
    note = ""
    if plan is not None:
        total, counted = _run_plan(args.out, plan, asked)
        plan_dict = total.to_dict()  # per-layer served / fallback counts over every prediction of --out
        if counted:
            total.save(os.path.join(args.out, "plan.json"))
        meta["plan_counts"] = {**plan_counts(total), "samples_counted": counted}
        note = _served_note(total, "over the predictions of this directory")
        if note:
            meta = {"warning": note, **meta}
    if args.e:
        summary = {b: summarize(result, b) for b in ("0-4k", "4-8k", "8k+")}
    else:
        summary = summarize(result)
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"result": result, "samples": samples_scored, "summary": summary, "meta": meta, "plan": plan_dict},
                  f, ensure_ascii=False, indent=2)
    with open(os.path.join(args.out, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown_report(result, meta, title=f"{meta['suite']}: {model_name}, method {meta['method']}",
                                samples=samples_scored))
    print(json.dumps(result, ensure_ascii=False, indent=2))
    if not sum(c.get("predicted", 0) for c in all_counts):
        print(f"hf-sparse-attn longbench: nothing left to predict: every sample already has a prediction in "
              f"{args.out}; the outputs were rebuilt from them", file=sys.stderr)
    elif note:
        print(f"hf-sparse-attn longbench: warning: {note}", file=sys.stderr)
    return 0


def _run_plan(out_dir: str, plan, tasks: list[str]):
    """(``plan`` with its per-layer served / fallback counts summed over the predictions of ``tasks`` in
    ``out_dir``, whichever invocation or process made them; how many of them have counts). A directory whose
    predictions have no counts (made by a version that kept none) gives the plan its summary.json recorded."""
    from ..eval.longbench.files import read_predictions
    from ..eval.plan_counts import run_plan

    predictions = {task: [r.get("_id") for r in read_predictions(os.path.join(out_dir, f"{task}.jsonl"))]
                   for task in tasks if os.path.exists(os.path.join(out_dir, f"{task}.jsonl"))}
    total, counted = run_plan(plan, out_dir, predictions)
    if not counted:
        earlier = _earlier_plan(out_dir)
        if earlier is not None:
            return earlier, 0
    return total, counted


def _earlier_plan(out_dir: str):
    """The plan of the summary.json in ``out_dir`` with the counts it recorded, or None where it has none."""
    from ..plan import PatchPlan

    try:
        with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as f:
            plan = PatchPlan.from_dict(json.load(f).get("plan"))
    except (OSError, ValueError, AttributeError):
        return None
    return plan if any(layer.served or layer.fallbacks or layer.decode_served for layer in plan.layers) else None
