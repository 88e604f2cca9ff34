"""`hf-sparse-attn longbench-score PRED_DIR [--e]`: score a directory laid out as the official release does (one
``<task>.jsonl`` per task, lines ``{pred, answers, all_classes, length}``) and write ``PRED_DIR/result.json``
(task -> score; with ``--e``: task -> {"0-4k", "4-8k", "8k+"}), plus ``PRED_DIR/report.md``.

``--compare DIR ...`` also scores the other run directories and writes ``PRED_DIR/comparison.md``: "Attention is Naturally Sparse" Table 1's
layout, one row per run (method and number of replaced layers read from each run's summary.json, written by
``hf-sparse-attn longbench``), LongBench-E 8k+ bucket with ``--e`` (``--bucket`` to choose another)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pred_dir", metavar="PRED_DIR", help="directory of <task>.jsonl prediction files")
    parser.add_argument("--e", action="store_true", help="LongBench-E: score by length bucket")
    parser.add_argument("--no-report", action="store_true", help="write only result.json")
    parser.add_argument("--tasks", help="comma-separated tasks that must appear in result.json (null where a task "
                                        "has no predictions); default: the tasks with files")
    parser.add_argument("--compare", nargs="+", metavar="DIR", help="other run directories for a comparison in the layout of Table 1 of \"Attention is Naturally Sparse\"")
    parser.add_argument("--bucket", default="8k+", choices=("0-4k", "4-8k", "8k+"), help="LongBench-E bucket of the comparison")


def _run_label(pred_dir: str) -> tuple[str, int]:
    """(method, number of replaced layers) of a run directory, from its summary.json; (dir name, 0) without one."""
    path = os.path.join(pred_dir, "summary.json")
    if not os.path.exists(path):
        return os.path.basename(os.path.normpath(pred_dir)), 0
    with open(path, encoding="utf-8") as f:
        meta = json.load(f).get("meta", {})
    layers = meta.get("layers") or []
    return str(meta.get("method", "none")), len(layers)


def run(args: argparse.Namespace) -> int:
    from ..eval.longbench.score import count_samples, markdown_report, score_directory
    from ..eval.longbench.tasks import get_task

    if not os.path.isdir(args.pred_dir):
        raise ValueError(f"{args.pred_dir} is not a directory of <task>.jsonl prediction files")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    for task in tasks or []:
        get_task(task)
    from ..eval.longbench.files import stray_files

    stray = stray_files(args.pred_dir)
    if stray:
        print(f"longbench-score: skipped {', '.join(stray)} in {args.pred_dir}: not a <task>.jsonl prediction file "
              "of a known task", file=sys.stderr)
    result = score_directory(args.pred_dir, longbench_e=args.e, tasks=tasks)
    if not args.no_report:
        with open(os.path.join(args.pred_dir, "report.md"), "w", encoding="utf-8") as f:
            f.write(markdown_report(result, {"predictions": os.path.abspath(args.pred_dir)},
                                    title="LongBench-E results" if args.e else "LongBench results",
                                    samples=count_samples(args.pred_dir, tasks=tasks)))
    print(json.dumps(result, ensure_ascii=False, indent=2))
    if args.compare:
        from ..eval.longbench.score import comparison_table

        runs = []
        for run_dir in [args.pred_dir, *args.compare]:
            method, layers = _run_label(run_dir)
            runs.append((method, layers, result if run_dir == args.pred_dir else
                         score_directory(run_dir, longbench_e=args.e, write=False)))
        table = comparison_table(runs, bucket=args.bucket if args.e else None)
        with open(os.path.join(args.pred_dir, "comparison.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
        print(table)
    return 0
