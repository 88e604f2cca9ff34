"""Reproduce eval/results/head_tail_minilm/: Indyk et al. head-to-tail statistics of real all-MiniLM-L6-v2.

Run 1 (the main one): 2,000 sentences drawn (seed 0) from the English Wikipedia in gensim's test data, every
layer x head, every prefix length >= 50 (experiment (i)), experiment (ii) on every sentence.
Run 2 (for the A.1.3 scaling curve up to 512 tokens, which sentences never reach): 200 passages of ~3,000
characters cut from the same articles (seed 0), truncated to 512 tokens, prefix step 10 (the lengths 50, 100, ...,
500 and n are always evaluated).

Work directories (resumable, not committed): runs/head_tail_minilm/{sentences,passages}/. Results are copied to
eval/results/head_tail_minilm/{sentences,passages}/ with a results.md.
Machine of the committed run: 2-core CPU VM, no GPU, shared with other jobs; date 2026-11-22.

    .venv/bin/python scripts/head_tail_minilm.py
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hf_sparse_attn.cli import main  # noqa: E402

WORK = os.path.join(ROOT, "runs", "head_tail_minilm")
RESULTS = os.path.join(ROOT, "eval", "results", "head_tail_minilm")
MACHINE = "2-core CPU VM, no GPU (shared with other jobs)"
DATE = "2026-11-22"


def publish(work: str, results: str, command: list[str], seconds: float, note: str, script: str = "scripts/head_tail_minilm.py") -> None:
    os.makedirs(results, exist_ok=True)
    for name in sorted(os.listdir(work)):
        if name.endswith((".json", ".png", ".txt")):
            shutil.copy(os.path.join(work, name), os.path.join(results, name))
    with open(os.path.join(work, "summary.txt")) as f:
        summary = f.read()
    with open(os.path.join(results, "results.md"), "w") as f:
        f.write(f"# head-tail: {os.path.basename(results)}\n\n{note}\n\n")
        shown = " ".join(os.path.relpath(a, ROOT) if a.startswith(ROOT) else a for a in command)
        f.write(f"- command: `hf-sparse-attn {shown}` (via `{script}`)\n")
        f.write(f"- machine: {MACHINE}; date: {DATE}; wall time of the last invocation: {seconds:.0f} s (0 if resumed from a finished state)\n")
        f.write("- files: head_tail.json (all numbers), max_ratio.png, median_n_n1.png, median_n_2n.png, scaling.png, summary.txt\n\n")
        f.write("```\n" + summary + "```\n")


def passages_file(path: str, count: int = 200, chars: int = 3000, seed: int = 0) -> str:
    """Consecutive ~3,000-character windows of the Wikipedia articles (line breaks become spaces), one per line:
    long enough to fill MiniLM's 512 positions."""
    from hf_sparse_attn.eval.data import wikipedia_articles

    passages = []
    for _title, text in wikipedia_articles():
        words = text.split()
        current: list[str] = []
        length = 0
        for word in words:
            current.append(word)
            length += len(word) + 1
            if length >= chars:
                passages.append(" ".join(current))
                current, length = [], 0
    picks = random.Random(seed).sample(passages, min(count, len(passages)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(picks) + "\n")
    return path


if __name__ == "__main__":
    which = sys.argv[1:] or ["sentences", "passages"]
    if "sentences" in which:
        work = os.path.join(WORK, "sentences")
        command = ["head-tail", "--threads", "1", "--model", "minilm", "--corpus", "wikipedia", "--max-sequences", "2000", "--seed", "0", "--out", work]
        start = time.time()
        main(command)
        publish(work, os.path.join(RESULTS, "sentences"), command, time.time() - start,
                "Real all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads, d=32) on 2,000 Wikipedia sentences; min prefix 50, every prefix.")
    if "passages" in which:
        work = os.path.join(WORK, "passages")
        text = passages_file(os.path.join(WORK, "passages.txt"))
        command = ["head-tail", "--threads", "1", "--model", "minilm", "--text", text, "--max-length", "512", "--prefix-step", "10", "--out", work]
        start = time.time()
        main(command)
        publish(work, os.path.join(RESULTS, "passages"), command, time.time() - start,
                "Real all-MiniLM-L6-v2 on 200 Wikipedia passages (~3,000 characters of one article, truncated to 512 tokens); "
                "prefix step 10 plus the scaling lengths 50..500 and n.")
