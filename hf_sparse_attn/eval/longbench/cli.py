"""`hf-sparse-attn longbench`: predict LongBench / LongBench-E / the offline suite with a (patched) model, then score.

Examples::

    hf-sparse-attn longbench --model THUDM/chatglm2-6b-32k --data LongBench/data.zip --e --out runs/exact
    hf-sparse-attn longbench --model smollm2 --suite offline --contexts 2,4 --max-samples 4 \\
        --method sparse_hyper --layers 15 --select weight_norm --out runs/sh15
    accelerate launch --num_processes 8 -m hf_sparse_attn.cli longbench --model ... --data ... --out runs/x

Output directory: ``<task>.jsonl`` predictions (resumable: rerun the same command after a crash),
``result.json`` (official format), ``summary.json`` (scores + categories + averages + run metadata),
``report.md``, ``plan.json`` (the PatchPlan used), and for the offline suite ``data/`` (the generated samples).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any

from .tasks import LONGBENCH_E_TASKS, LONGBENCH_TASKS, OFFLINE_KINDS, get_task


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_layers(text: str) -> Any:
    """'8' -> 8 (count), '0.5' -> 0.5 (fraction), 'all', '0,3,5' -> [0, 3, 5] (indices)."""
    if text == "all":
        return text
    if "," in text:
        return [int(t) for t in text.split(",") if t.strip()]
    value = _parse_value(text)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"--layers: expected a count, a fraction, 'all' or indices like 0,3,5; got {text!r}")
    return value


def parse_params(items: list[str]) -> dict[str, Any]:
    params = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--param expects NAME=VALUE (e.g. --param block_size=256), got {item!r}")
        key, value = item.split("=", 1)
        params[key.strip()] = _parse_value(value.strip())
    return params


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="model path or hub id (loaded with device_map='auto'), or 'smollm2' for the real "
                             "SmolLM2-135M-Instruct shipped offline")
    parser.add_argument("--data", help="LongBench data: a directory of <task>.jsonl, data.zip, parquet files or a "
                                       "datasets id (not needed for --suite offline)")
    parser.add_argument("--suite", choices=("longbench", "offline"), default="longbench")
    parser.add_argument("--tasks", help="comma-separated tasks (default: all 21, the 13 of LongBench-E with --e, or "
                                        "every offline kind); offline: kinds like needle_middle,retrieval_en")
    parser.add_argument("--e", action="store_true", help="LongBench-E (reads <task>_e files, scores by length bucket)")
    parser.add_argument("--out", required=True, help="output directory (rerun with the same --out to resume)")
    parser.add_argument("--method", default="none",
                        help="attention method for the chosen layers ('none' = unpatched model; see "
                             "hf_sparse_attn.list_methods())")
    parser.add_argument("--layers", type=parse_layers, default=0.5,
                        help="layers to replace: a count (8), a fraction (0.5), 'all' or indices (0,3,5)")
    parser.add_argument("--select", default="weight_norm",
                        help="layer order: weight_norm (largest Q/K norm first), last, first, even, odd, random")
    parser.add_argument("--plan", help="PatchPlan JSON to re-apply (overrides --method/--layers/--select)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="method parameter passed to patch_model (repeatable), e.g. --param block_size=256")
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


def load_model(name: str, dtype: str = "auto", device_map: Any = "auto"):
    """(model, tokenizer, model_name). 'smollm2' is the offline real model; anything else goes through
    from_pretrained with ``device_map`` ("auto": accelerate spreads it over the visible devices; under
    ``accelerate launch`` with several processes each process puts its own copy on its own device)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name.lower() in ("smollm2", "smollm2-135m"):
        from hf_sparse_attn.eval.data import load_smollm2

        model, tokenizer = load_smollm2()
        return model.eval(), tokenizer, "SmolLM2-135M-Instruct"
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, device_map=device_map)
    return model.eval(), tokenizer, name


def _task_list(args) -> list[str]:
    if args.suite == "offline":
        return [t.strip() for t in args.tasks.split(",")] if args.tasks else list(OFFLINE_KINDS)
    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        for t in tasks:
            get_task(t)
        if args.e:
            bad = [t for t in tasks if t not in LONGBENCH_E_TASKS]
            if bad:
                raise ValueError(f"{bad} are not LongBench-E tasks; LongBench-E has {', '.join(LONGBENCH_E_TASKS)}")
        return tasks
    return list(LONGBENCH_E_TASKS if args.e else LONGBENCH_TASKS)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from .data import load_task
    from .predict import merge_shards, predict_tasks
    from .score import environment_info, markdown_report, score_directory, summarize
    from .tasks import default_max_length, offline_task

    state = PartialState()
    started = time.perf_counter()
    if args.suite == "longbench" and not args.data:
        raise SystemExit("--data is required for LongBench (a directory of <task>.jsonl, data.zip, parquet or a "
                         "datasets id); use --suite offline for the generated suite")
    tasks = _task_list(args)
    device_map = "auto" if state.num_processes == 1 else {"": str(state.device)}
    model, tokenizer, model_name = load_model(args.model, args.dtype, device_map)

    plan_dict, plan = None, None
    if args.plan or args.method != "none":
        from hf_sparse_attn import patch_model

        method_params = parse_params(args.param)
        if args.plan:
            plan = patch_model(model, plan=args.plan, seed=args.seed)
        else:
            plan = patch_model(model, method=args.method, layers=args.layers, select=args.select, seed=args.seed,
                               **method_params)
        plan_dict = plan.to_dict()
        if state.is_main_process:
            os.makedirs(args.out, exist_ok=True)
            plan.save(os.path.join(args.out, "plan.json"))

    positions = getattr(model.config, "max_position_embeddings", None)
    if args.max_length:
        max_length = args.max_length
    elif args.suite == "offline":
        max_length = positions - 32
    else:
        max_length = default_max_length(model_name, positions)

    task_samples = {}
    if args.suite == "offline":
        from .offline import build_offline_suite, write_suite

        contexts = [int(c) for c in str(args.contexts).split(",") if c.strip()]
        suite = build_offline_suite(tokenizer, contexts, num_samples=args.max_samples or 5, seed=args.seed,
                                    kinds=tasks)
        if state.is_main_process:
            write_suite(suite, os.path.join(args.out, "data"))
        for name, samples in suite.items():
            task_samples[name] = (offline_task(name), samples)
    else:
        for task in tasks:
            task_samples[task] = (get_task(task), load_task(args.data, task, args.e, args.max_samples))

    if args.max_new_tokens:
        task_samples = {name: (dataclasses.replace(spec, max_new_tokens=min(spec.max_new_tokens, args.max_new_tokens)),
                               samples) for name, (spec, samples) in task_samples.items()}
    counts = predict_tasks(model, tokenizer, task_samples, args.out, max_length, seed=args.seed,
                           process_index=state.process_index, num_processes=state.num_processes,
                           chat_template=not args.no_chat_template,
                           progress=not args.no_progress and state.is_local_main_process)
    state.wait_for_everyone()
    if not state.is_main_process:
        return 0
    for task, (_, samples) in task_samples.items():
        merge_shards(args.out, task, order=[s["_id"] for s in samples])
    result = score_directory(args.out, longbench_e=args.e)
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
        "num_processes": state.num_processes,
        "this_invocation": counts,
        "fallbacks_this_invocation": plan.fallback_counts() if plan is not None else {},
        "wall_s_this_invocation": round(time.perf_counter() - started, 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "environment": environment_info(),
    }
    if plan is not None:
        plan_dict = plan.to_dict()  # with this invocation's per-layer call / fallback counts
    if args.e:
        summary = {b: summarize(result, b) for b in ("0-4k", "4-8k", "8k+")}
    else:
        summary = summarize(result)
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"result": result, "summary": summary, "meta": meta, "plan": plan_dict}, f, ensure_ascii=False,
                  indent=2)
    with open(os.path.join(args.out, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown_report(result, meta, title=f"{meta['suite']}: {model_name}, method {meta['method']}"))
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0
