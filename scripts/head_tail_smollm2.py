"""Reproduce eval/results/head_tail_smollm2/: Indyk et al. head-to-tail statistics of real SmolLM2-135M-Instruct.

A decoder: the statistics are taken on the causal part of the Gaussian kernel matrix (lower triangle with the
diagonal, see hf_sparse_attn/eval/head_tail.py). Corpus: 4 English Wikipedia articles of >= 40,000 characters
from gensim's test data (drawn with seed 0), each truncated to 8,192 tokens (the model's context); all 30 layers
x 9 heads; prefix step 50 (prefix lengths 50, 100, ..., 8192: experiment (i) and the A.1.3 scaling curve).
Budget: about 25 minutes on 2 shared CPU cores, hence few articles and the prefix step.

Work directory (resumable, not committed): runs/head_tail_smollm2/. Results: eval/results/head_tail_smollm2/.
Machine of the committed run: 2-core CPU VM, no GPU, shared with other jobs; date 2026-11-22.

    .venv/bin/python scripts/head_tail_smollm2.py
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from hf_sparse_attn.cli import main  # noqa: E402
from head_tail_minilm import publish  # noqa: E402

WORK = os.path.join(ROOT, "runs", "head_tail_smollm2")
RESULTS = os.path.join(ROOT, "eval", "results", "head_tail_smollm2")

if __name__ == "__main__":
    command = ["head-tail", "--threads", "1", "--model", "smollm2", "--corpus", "wikipedia-articles", "--min-chars", "40000",
               "--max-sequences", "4", "--seed", "0", "--max-length", "8192", "--prefix-step", "50", "--out", WORK]
    start = time.time()
    main(command)
    publish(WORK, RESULTS, command, time.time() - start,
            "Real SmolLM2-135M-Instruct (Llama, 30 layers x 9 heads, 3 KV heads, d=64), 4 Wikipedia articles truncated to "
            "8,192 tokens; statistics on the causal part of K; prefix step 50.", script="scripts/head_tail_smollm2.py")
