"""Reproduce eval/results/sparsity/: the "Attention is Naturally Sparse" paper's claim (k-sparsity grows with the weight norm R), measured.

- MiniLM (all-MiniLM-L6-v2, 6 layers x 12 heads): 1,000 Wikipedia sentences (seed 1), k in {1, 4, 16, 64},
  eps in {0.1, 0.25, 0.5}.
- SmolLM2-135M-Instruct (30 layers x 9 heads): 8 Wikipedia articles of >= 20,000 characters (seed 1), truncated to
  2,048 tokens, k in {1, 4, 16, 64, 256}, same eps.
R is hf_sparse_attn.rank_layers (spectral norm of diag(g) W_Q^T W_K diag(g), mean over heads).

Work directories (resumable, not committed): runs/sparsity/{minilm,smollm2}/. Results: eval/results/sparsity/.
Machine of the committed run: 2-core CPU VM, no GPU, shared with other jobs; date 2026-11-22.

    .venv/bin/python scripts/sparsity_real.py [minilm] [smollm2]
"""

from __future__ import annotations

import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hf_sparse_attn.cli import main  # noqa: E402

WORK = os.path.join(ROOT, "runs", "sparsity")
RESULTS = os.path.join(ROOT, "eval", "results", "sparsity")
MACHINE = "2-core CPU VM, no GPU (shared with other jobs)"
DATE = "2026-11-22"

RUNS = {
    "minilm": ["--model", "minilm", "--corpus", "wikipedia", "--max-sequences", "1000", "--seed", "1",
               "--k", "1", "4", "16", "64", "--eps", "0.1", "0.25", "0.5"],
    "smollm2": ["--model", "smollm2", "--corpus", "wikipedia-articles", "--min-chars", "20000", "--max-sequences", "8",
                "--seed", "1", "--max-length", "2048", "--k", "1", "4", "16", "64", "256", "--eps", "0.1", "0.25", "0.5"],
}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(RUNS):
        work = os.path.join(WORK, name)
        command = ["sparsity", "--threads", "1", *RUNS[name], "--out", work]
        start = time.time()
        main(command)
        seconds = time.time() - start
        results = os.path.join(RESULTS, name)
        os.makedirs(results, exist_ok=True)
        for file in sorted(os.listdir(work)):
            if file.endswith((".json", ".png", ".txt")):
                shutil.copy(os.path.join(work, file), os.path.join(results, file))
        with open(os.path.join(work, "summary.txt")) as f:
            summary = f.read()
        with open(os.path.join(results, "results.md"), "w") as f:
            f.write(f"# sparsity vs weight norm R: {name}\n\n")
            shown = " ".join(os.path.relpath(a, ROOT) if a.startswith(ROOT) else a for a in command)
            f.write(f"- command: `hf-sparse-attn {shown}` (via `scripts/sparsity_real.py`)\n")
            f.write(f"- machine: {MACHINE}; date: {DATE}; wall time of the last invocation: {seconds:.0f} s\n")
            f.write("- files: sparsity.json (all numbers), sparsity_vs_R.png, sparsity_heads.png, summary.txt\n\n")
            f.write("```\n" + summary + "```\n")
