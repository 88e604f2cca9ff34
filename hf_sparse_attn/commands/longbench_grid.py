"""`hf-sparse-attn longbench-grid CONFIG --out DIR`: one LongBench / LongBench-E experiment from a TOML file — the
exact model against methods x numbers of replaced layers x layer selections, one model load, resumable.

The config (see eval/configs/chatglm2_longbench_e_table1.toml, the Table 1 of "Attention is Naturally Sparse with
Gaussian Distributed Input") has these tables; every key is checked, an unknown one is an error:

- ``[model]``: ``path`` (local path or hub id), ``trust_remote_code`` (default false), ``dtype`` ("auto",
  "bfloat16", "float32", ...), ``device_map`` (default "auto");
- ``[data]``: ``path`` (a directory of <task>.jsonl, the released data.zip, parquet), ``longbench_e`` (true: the
  ``<task>_e`` files), ``tasks`` (list), ``min_length`` (keep samples whose ``length`` field - words, or characters
  for Chinese - is at least this; 8000 = LongBench-E's "8k+" bucket; 0 = all), ``max_samples_per_task`` (first N
  kept samples per task; 0 = all);
- ``[predict]``: ``max_length`` (prompt budget before middle truncation), ``max_new_tokens_cap`` (0 = the official
  output lengths), ``seed``;
- ``[grid]``: ``methods``, ``layers`` (numbers of replaced layers), ``selections`` ("weight_norm", "last", ...);
- ``[params.<method>]``: that method's parameters (``hf_sparse_attn.list_methods()``);
- ``[paper]`` (optional): published averages to print next to ours: ``exact``, ``layers`` (numbers of replaced
  layers) and one list per method in that order; ``selection`` names the layer selection they were measured with
  (shown on those rows only).

``--set SECTION.KEY=VALUE`` (repeatable) overrides a key; VALUE is read as TOML (``--set grid.layers=[1,2]``) or,
failing that, as a string (``--set model.path=/data/chatglm2-6b-32k``).

Output in ``--out``: ``config.json`` (the resolved config), one directory per arm (``exact``, ``<method>-<n>-<select>``)
with ``<task>.jsonl`` predictions, ``plan.json``, ``result.json`` and ``summary.json``; ``table.md`` / ``table.json``
(rewritten after every arm). Arms whose method and replaced layer set equal an earlier arm's (e.g. every
selection at all layers) reuse its predictions and say so. Rerunning the same command resumes.

``--out`` and each arm directory record their settings (``run_settings.json``, ``hf_sparse_attn/eval/run_dir.py``):
a rerun with another model, data selection, prompt budget, seed or method parameter is refused, naming what
differs, unless ``--overwrite`` (which deletes only the files this command writes). Adding tasks, samples or arms
extends a run. While it writes, the run holds a lock on ``--out``: a second run there is refused, naming the process.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import Any, Optional

import tomllib

from .arguments import parse_method_params, parse_value

SCHEMA: dict[str, dict[str, Any]] = {
    "experiment": {"name": "", "description": ""},
    "model": {"path": None, "trust_remote_code": False, "dtype": "auto", "device_map": "auto"},
    "data": {"path": None, "longbench_e": True, "tasks": None, "min_length": 0, "max_samples_per_task": 0},
    "predict": {"max_length": None, "max_new_tokens_cap": 0, "seed": 0},
    "grid": {"methods": [], "layers": [], "selections": ["weight_norm"]},
}
OPEN_SECTIONS = ("params", "paper")  # keys are method names


def load_config(path: str, overrides: Optional[list[str]] = None) -> dict:
    """The config file with defaults filled in and ``SECTION.KEY=VALUE`` overrides applied; raises on unknown keys
    and missing required ones."""
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    config = copy.deepcopy(SCHEMA)
    for section in OPEN_SECTIONS:
        config[section] = {}
    for section, values in raw.items():
        if section not in config:
            raise ValueError(f"{path}: unknown section [{section}]; sections: {', '.join(config)}")
        if not isinstance(values, dict):
            raise ValueError(f"{path}: [{section}] must be a table")
        for key, value in values.items():
            if section not in OPEN_SECTIONS and key not in SCHEMA[section]:
                raise ValueError(f"{path}: unknown key {section}.{key}; [{section}] takes {', '.join(SCHEMA[section])}")
            config[section][key] = value
    for item in overrides or []:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or section not in config:
            raise ValueError(f"--set expects SECTION.KEY=VALUE with SECTION in {list(config)}, got {item!r}")
        if section in OPEN_SECTIONS and "." in key:  # params.hyper.block_size=64
            for method, params in parse_method_params([f"{key}={text}"], option=f"--set {section}.").items():
                config[section].setdefault(method, {}).update(params)
            continue
        value = parse_value(text)
        if section not in OPEN_SECTIONS and key not in SCHEMA[section]:
            raise ValueError(f"--set {item!r}: [{section}] takes {', '.join(SCHEMA[section])}")
        config[section][key] = value
    for section, key in (("model", "path"), ("data", "path"), ("data", "tasks")):
        if not config[section][key]:
            raise ValueError(f"{path}: {section}.{key} is required")
    return config


def arms(config: dict) -> list[dict]:
    """The exact baseline, then every method x replaced-layer count x selection, in config order."""
    out = [{"name": "exact", "method": None, "layers": 0, "select": None}]
    for method in config["grid"]["methods"]:
        for count in config["grid"]["layers"]:
            for select in config["grid"]["selections"]:
                out.append({"name": f"{method}-{count}-{select}", "method": method, "layers": int(count), "select": select})
    return out


def load_samples(config: dict) -> dict:
    """task -> (spec, samples): the samples of each task with ``length >= min_length``, the first
    ``max_samples_per_task`` of them (0 = all)."""
    from ..eval.longbench.data import load_task
    from ..eval.longbench.tasks import get_task

    data = config["data"]
    task_samples = {}
    for task in data["tasks"]:
        spec = get_task(task)
        samples = load_task(data["path"], task, bool(data["longbench_e"]))
        if data["min_length"]:
            missing = [s["_id"] for s in samples if s.get("length") is None]
            if missing:
                raise ValueError(f"task {task}: samples without a 'length' field ({missing[:3]}...): cannot apply "
                                 "data.min_length")
            samples = [s for s in samples if s["length"] >= data["min_length"]]
        if data["max_samples_per_task"]:
            samples = samples[: data["max_samples_per_task"]]
        task_samples[task] = (spec, samples)
    return task_samples


def _table(config: dict, rows: list[dict]) -> str:
    paper = config.get("paper") or {}
    lines = [f"# {config['experiment'].get('name') or 'LongBench grid'}", "",
             config["experiment"].get("description", ""), "",
             f"Model `{config['model']['path']}`, data `{config['data']['path']}` "
             f"({'LongBench-E' if config['data']['longbench_e'] else 'LongBench'}, samples with length >= "
             f"{config['data']['min_length']}), prompt budget {config['predict']['max_length']} tokens. Average = mean "
             "of the six category sums of the task scores (the convention of the paper's Table 1; score.table1_row).",
             "", "| arm | replaced layers | samples | single-qa | multi-qa | summarization | few-shot | synthetic | code "
             "| Average | paper | fallbacks (this invocation) |", "|---" * 12 + "|"]
    for row in rows:
        t = row["table1"]
        published = None
        if row["method"] is None:
            published = paper.get("exact")
        elif (row["method"] in paper and row["layers"] in paper.get("layers", [])
              and paper.get("selection") in (None, row["select"])):
            values = paper[row["method"]]
            index = paper["layers"].index(row["layers"])
            published = values[index] if index < len(values) else None
        cells = [t.get(c) for c in ("single-qa", "multi-qa", "summarization", "few-shot", "synthetic", "code", "Average")]
        fmt = ["-" if v is None else f"{v:.2f}" for v in cells]
        note = f" (= {row['same_as']})" if row.get("same_as") else ""
        lines.append(f"| {row['name']}{note} | {row['layer_indices'] if row['method'] else '-'} | {row['samples']} | "
                     + " | ".join(fmt) + f" | {'-' if published is None else published} | "
                     + (", ".join(f"{k}: {v}" for k, v in row["fallbacks"].items()) or "-") + " |")
    return "\n".join(lines) + "\n"


GRID_FILES = ["config.json", "table.md", "table.json"]
ARM_FILES = ["plan.json", "result.json", "summary.json"]


def grid_settings(config: dict) -> dict:
    """What every arm's predictions depend on (recorded in ``--out``): the model, the data selection but its task
    list and sample count (more extend a run), the prediction settings."""
    from ..eval.run_dir import path_fingerprint

    data = config["data"]
    return {"command": "longbench-grid", "model": config["model"],
            "model_fingerprint": path_fingerprint(config["model"]["path"]),
            "data": {"path": os.path.abspath(str(data["path"])), "longbench_e": data["longbench_e"],
                     "min_length": data["min_length"]},
            "predict": config["predict"]}


def arm_settings(config: dict, arm: dict) -> dict:
    """What one arm's predictions depend on (recorded in its directory): the grid's settings, its method, layer
    count, selection and that method's parameters."""
    return {**grid_settings(config), "method": arm["method"], "layers": arm["layers"], "select": arm["select"],
            "params": dict(config["params"].get(arm["method"], {})) if arm["method"] else {}}


def run_grid(config: dict, out_dir: str, progress: bool = True, overwrite: bool = False) -> list[dict]:
    """Run every arm of ``config`` into ``out_dir``; returns the table rows (also written to table.md / table.json).
    Raises RunSettingsError (a ValueError) where ``out_dir`` or an arm directory holds results of other settings
    (unless ``overwrite``), another process writes it, or it holds the data."""
    from ..eval.run_dir import RunDir

    data_path = str(config["data"]["path"])
    with RunDir(out_dir, grid_settings(config), overwrite=overwrite, owned_files=GRID_FILES,
                forbidden=[data_path if os.path.exists(data_path) else None], command="longbench-grid") as top:
        arm_dirs = []
        try:
            for arm in arms(config):  # every arm checked before the model loads: a refusal comes at once
                arm_dir = RunDir(os.path.join(out_dir, arm["name"]), arm_settings(config, arm), overwrite=overwrite,
                                 owned_files=ARM_FILES + _task_files(), command=f"longbench-grid (arm {arm['name']})")
                arm_dirs.append(arm_dir.open())
            return _run_grid(config, top.path, progress)
        finally:
            for arm_dir in arm_dirs:
                arm_dir.close()


def _task_files() -> list[str]:
    from ..eval.longbench.tasks import LONGBENCH_TASKS

    return [f"{t}.jsonl" for t in LONGBENCH_TASKS]


def _run_grid(config: dict, out_dir: str, progress: bool = True) -> list[dict]:
    from hf_sparse_attn import patch_model, unpatch_model

    from .longbench import _served_note, load_model
    from ..eval.longbench.predict import predict_tasks
    from ..eval.longbench.score import count_samples, environment_info, score_directory, table1_row

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    model_cfg, predict_cfg = config["model"], config["predict"]
    model, tokenizer, model_name = load_model(model_cfg["path"], model_cfg["dtype"], model_cfg["device_map"],
                                              bool(model_cfg["trust_remote_code"]))
    if not predict_cfg["max_length"]:
        from ..eval.longbench.tasks import default_max_length

        predict_cfg["max_length"] = default_max_length(model_name, getattr(model.config, "max_position_embeddings", None))
    task_samples = load_samples(config)
    if predict_cfg["max_new_tokens_cap"]:
        import dataclasses

        cap = int(predict_cfg["max_new_tokens_cap"])
        task_samples = {t: (dataclasses.replace(spec, max_new_tokens=min(spec.max_new_tokens, cap)), samples)
                        for t, (spec, samples) in task_samples.items()}
    tasks = list(task_samples)
    rows: list[dict] = []
    seen: dict[tuple, str] = {}
    for arm in arms(config):
        arm_dir = os.path.join(out_dir, arm["name"])
        os.makedirs(arm_dir, exist_ok=True)
        unpatch_model(model)
        plan, layer_indices = None, []
        if arm["method"] is not None:
            params = dict(config["params"].get(arm["method"], {}))
            plan = patch_model(model, method=arm["method"], layers=arm["layers"], select=arm["select"],
                               seed=int(predict_cfg["seed"]), **params)
            if not os.path.exists(os.path.join(arm_dir, "plan.json")):  # rewritten with its counts after predicting
                plan.save(os.path.join(arm_dir, "plan.json"))
            layer_indices = sorted(layer.layer_idx for layer in plan.layers if layer.method)
        key = (arm["method"], tuple(layer_indices))
        same_as = seen.get(key)
        started = time.perf_counter()
        if same_as is None:
            seen[key] = arm["name"]
            counts = predict_tasks(model, tokenizer, task_samples, arm_dir, int(predict_cfg["max_length"]),
                                   seed=int(predict_cfg["seed"]), progress=progress)
            source_dir = arm_dir
        else:
            counts = {"predicted": 0, "reused_from": same_as}
            source_dir = os.path.join(out_dir, same_as)
        # LongBench-E restricted to its "8k+" bucket: scored by bucket; anything else: one score per task
        bucket = "8k+" if config["data"]["longbench_e"] and config["data"]["min_length"] >= 8000 else None
        result = score_directory(source_dir, longbench_e=bucket is not None, write=False, tasks=tasks)
        row = {"name": arm["name"], "method": arm["method"], "layers": arm["layers"], "select": arm["select"],
               "layer_indices": layer_indices, "same_as": same_as,
               "samples": sum(count_samples(source_dir, tasks).values()),
               "table1": table1_row(result, bucket),
               "fallbacks": plan.fallback_counts() if plan is not None else {},
               "this_invocation": counts, "wall_s": round(time.perf_counter() - started, 1)}
        if plan is not None and counts.get("predicted"):
            plan.save(os.path.join(arm_dir, "plan.json"))  # the final plan: this invocation's served / fallback counts
            note = _served_note(plan)
            if note:
                row["warning"] = note
                print(f"hf-sparse-attn longbench-grid: warning: arm {arm['name']}: {note}", file=sys.stderr)
        with open(os.path.join(arm_dir, "result.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, ensure_ascii=False, indent=2)
        with open(os.path.join(arm_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump({"row": row, "plan": plan.to_dict() if plan is not None else None,
                       "environment": environment_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S")},
                      f, ensure_ascii=False, indent=2)
        rows.append(row)
        with open(os.path.join(out_dir, "table.json"), "w", encoding="utf-8") as f:
            json.dump({"config": config, "rows": rows, "environment": environment_info()}, f, ensure_ascii=False, indent=2)
        with open(os.path.join(out_dir, "table.md"), "w", encoding="utf-8") as f:
            f.write(_table(config, rows))
    unpatch_model(model)
    return rows


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment TOML (e.g. eval/configs/chatglm2_longbench_e_table1.toml)")
    parser.add_argument("--out", required=True, help="output directory (rerun the same command to resume)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key (repeatable), e.g. --set model.path=/data/chatglm2-6b-32k")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--overwrite", action="store_true",
                        help="--out (or an arm) holds results made with other settings: delete them (only the files "
                             "this command writes) and start afresh; without it such a rerun is refused")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)
    run_grid(config, args.out, progress=not args.no_progress, overwrite=args.overwrite)
    print(open(os.path.join(args.out, "table.md"), encoding="utf-8").read())
    return 0
