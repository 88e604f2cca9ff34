"""Attention audits on real models: Indyk et al.'s head-to-tail statistics (`hf-sparse-attn head-tail`) and the
"Attention is Naturally Sparse" paper's k-sparsity against the weight norm R (`hf-sparse-attn sparsity`).

Each audit is one or more commands, each run in a resumable work directory (runs/<audit>/<part>/, not committed);
its JSON, plots and summary are then copied into the results directory (--out, a subdirectory per part) with a
results.md naming the command. The audits (one experiment config each, eval/experiments/<audit>.toml):

- head_tail_minilm: all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads); part "sentences": 2,000 Wikipedia sentences (seed
  0), every prefix >= 50; part "passages": 200 passages of ~3,000 characters (seed 0) truncated to 512 tokens, prefix
  step 10 (the scaling curve up to 512 tokens, which sentences never reach);
- head_tail_smollm2: SmolLM2-135M-Instruct, 4 articles of >= 40,000 characters (seed 0) truncated to 8,192 tokens,
  statistics on the causal part of the kernel matrix, prefix step 50;
- sparsity: part "minilm": 1,000 sentences (seed 1), k in {1, 4, 16, 64}; part "smollm2": 8 articles of >= 20,000
  characters (seed 1) truncated to 2,048 tokens, k up to 256; eps in {0.1, 0.25, 0.5}.

    python scripts/attention_audits.py --audit head_tail_smollm2 --out eval/results/head_tail_smollm2
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import shutil
import sys
import time

from hf_sparse_attn.cli import main as cli_main
from hf_sparse_attn.commands.bench import machine_description

HEAD_TAIL_FILES = "head_tail.json (all numbers), max_ratio.png, median_n_n1.png, median_n_2n.png, scaling.png, summary.txt"
SPARSITY_FILES = "sparsity.json (all numbers), sparsity_vs_R.png, sparsity_heads.png, summary.txt"


def passages_file(path: str, count: int = 200, chars: int = 3000, seed: int = 0) -> str:
    """Consecutive ~3,000-character windows of the Wikipedia articles (line breaks become spaces), one per line:
    long enough to fill MiniLM's 512 positions."""
    from hf_sparse_attn.eval.data import wikipedia_articles

    passages = []
    for _title, text in wikipedia_articles():
        current: list[str] = []
        length = 0
        for word in text.split():
            current.append(word)
            length += len(word) + 1
            if length >= chars:
                passages.append(" ".join(current))
                current, length = [], 0
    picks = random.Random(seed).sample(passages, min(count, len(passages)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(picks) + "\n")
    return path


def parts(audit: str, work: str) -> dict[str, tuple[list[str], str, str]]:
    """part -> (command line without --out, description, files) of one audit."""
    head_tail = ["head-tail", "--threads", "1"]
    sparsity = ["sparsity", "--threads", "1"]
    eps = ["--eps", "0.1", "0.25", "0.5"]
    if audit == "head_tail_minilm":
        return {
            "sentences": ([*head_tail, "--model", "minilm", "--corpus", "wikipedia", "--max-sequences", "2000", "--seed", "0"],
                          "Real all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads, d=32) on 2,000 Wikipedia sentences; min prefix "
                          "50, every prefix.", HEAD_TAIL_FILES),
            "passages": ([*head_tail, "--model", "minilm", "--text", os.path.join(work, "passages.txt"), "--max-length", "512",
                          "--prefix-step", "10"],
                         "Real all-MiniLM-L6-v2 on 200 Wikipedia passages (~3,000 characters of one article, truncated to 512 "
                         "tokens); prefix step 10 plus the scaling lengths 50..500 and n.", HEAD_TAIL_FILES),
        }
    if audit == "head_tail_smollm2":
        return {"": ([*head_tail, "--model", "smollm2", "--corpus", "wikipedia-articles", "--min-chars", "40000",
                      "--max-sequences", "4", "--seed", "0", "--max-length", "8192", "--prefix-step", "50"],
                     "Real SmolLM2-135M-Instruct (Llama, 30 layers x 9 heads, 3 KV heads, d=64), 4 Wikipedia articles "
                     "truncated to 8,192 tokens; statistics on the causal part of K; prefix step 50.", HEAD_TAIL_FILES)}
    if audit == "sparsity":
        return {
            "minilm": ([*sparsity, "--model", "minilm", "--corpus", "wikipedia", "--max-sequences", "1000", "--seed", "1",
                        "--k", "1", "4", "16", "64", *eps], "sparsity vs weight norm R: minilm", SPARSITY_FILES),
            "smollm2": ([*sparsity, "--model", "smollm2", "--corpus", "wikipedia-articles", "--min-chars", "20000",
                         "--max-sequences", "8", "--seed", "1", "--max-length", "2048", "--k", "1", "4", "16", "64", "256",
                         *eps], "sparsity vs weight norm R: smollm2", SPARSITY_FILES),
        }
    raise SystemExit(f"--audit {audit!r}: choose head_tail_minilm, head_tail_smollm2 or sparsity")


def publish(work: str, results: str, command: list[str], seconds: float, note: str, files: str) -> None:
    """Copy the JSON, plots and summary of ``work`` into ``results`` and write its results.md."""
    os.makedirs(results, exist_ok=True)
    for name in sorted(os.listdir(work)):
        if name.endswith((".json", ".png", ".txt")):
            shutil.copy(os.path.join(work, name), os.path.join(results, name))
    with open(os.path.join(work, "summary.txt"), encoding="utf-8") as f:
        summary = f.read()
    with open(os.path.join(results, "results.md"), "w", encoding="utf-8") as f:
        title = note if note.startswith("sparsity") else f"head-tail: {os.path.basename(os.path.normpath(results))}"
        f.write(f"# {title}\n\n" + ("" if note == title else f"{note}\n\n") + "- command: `hf-sparse-attn {' '.join(command)}` (via `scripts/attention_audits.py`)\n")
        f.write(f"- machine: {machine_description()}; date: {datetime.date.today().isoformat()}; wall time of the last "
                f"invocation: {seconds:.0f} s (0 if resumed from a finished state)\n")
        f.write(f"- files: {files}\n\n```\n{summary}```\n")


def run(audit: str, out: str, work_root: str, only: list[str], report_only: bool) -> int:
    work = os.path.join(work_root, audit)
    for part, (command, note, files) in parts(audit, work).items():
        if only and part not in only:
            continue
        part_work = os.path.join(work, part) if part else work
        if report_only:
            if not os.path.exists(os.path.join(part_work, "summary.txt")):
                raise SystemExit(f"--report-only: no finished work directory {part_work} (the work directories are not "
                                 "committed): rerun without --report-only to compute it")
            seconds = 0.0
        else:
            if audit == "head_tail_minilm" and part == "passages":
                passages_file(os.path.join(work, "passages.txt"))
            start = time.time()
            rc = cli_main([*command, "--out", part_work])
            if rc:
                return rc
            seconds = time.time() - start
        publish(part_work, os.path.join(out, part) if part else out, [*command, "--out", part_work], seconds, note, files)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audit", required=True, help="head_tail_minilm, head_tail_smollm2 or sparsity")
    parser.add_argument("--out", required=True, help="results directory (eval/results/<audit>)")
    parser.add_argument("--work", default="runs", help="root of the resumable work directories (default: runs/)")
    parser.add_argument("--parts", nargs="*", default=[], help="only these parts (default: all)")
    parser.add_argument("--report-only", action="store_true", help="re-publish from the finished work directories")
    args = parser.parse_args()
    sys.exit(run(args.audit, args.out, args.work, args.parts, args.report_only))
