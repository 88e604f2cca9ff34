"""`hf-sparse-attn longbench-score PRED_DIR [--e]`: score a directory laid out as the official release does (one
``<task>.jsonl`` per task, lines ``{pred, answers, all_classes, length}``) and write ``PRED_DIR/result.json``
(task -> score; with ``--e``: task -> {"0-4k", "4-8k", "8k+"}), plus ``PRED_DIR/report.md``."""

from __future__ import annotations

import argparse
import json
import os


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pred_dir", metavar="PRED_DIR", help="directory of <task>.jsonl prediction files")
    parser.add_argument("--e", action="store_true", help="LongBench-E: score by length bucket")
    parser.add_argument("--no-report", action="store_true", help="write only result.json")


def run(args: argparse.Namespace) -> int:
    from .score import markdown_report, score_directory

    if not os.path.isdir(args.pred_dir):
        raise SystemExit(f"{args.pred_dir} is not a directory of <task>.jsonl prediction files")
    result = score_directory(args.pred_dir, longbench_e=args.e)
    if not args.no_report:
        with open(os.path.join(args.pred_dir, "report.md"), "w", encoding="utf-8") as f:
            f.write(markdown_report(result, {"predictions": os.path.abspath(args.pred_dir)},
                                    title="LongBench-E results" if args.e else "LongBench results"))
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0
