"""Model level, causal: real SmolLM2-135M-Instruct on the Wikipedia articles of the existing 8k grid (the first 20
with >= 8192 tokens), perplexity change and prefill speed-up of `local` and the single pass of `sparse_hyper` on 30
and 15 layers (weight_norm selection), each against the exact model measured in the same run.

Configurations (chosen from the kernel benchmark, eval/results/kernels_causal/results.md):
  * local: window 1024 + 64 sinks;
  * sparse_hyper: causal_mode="single_pass", window 512, block 128, 64 sinks, scale_mode theory (at 8k on bare
    tensors 3.07x SDPA at a mean real-layer error of 0.263, against local w1024 at 3.36x and 0.178: near equal speed).
  * hyper: causal_mode="single_pass", window 256, block 128, 128 samples, on 30 layers only.
Methods run in turn (local, sparse_hyper, hyper), each cell article by article against the exact model re-timed on
the same articles. Resumable: finished article records in results.jsonl are kept, so rerunning the command continues
where it stopped; the report's "articles" column says how many articles each cell holds so far.

    taskset -c 1 .venv/bin/python scripts/bench_model_causal.py                  # writes eval/results/model_bench_causal/
    .venv/bin/python scripts/bench_model_causal.py --report-only                 # rebuild results.md / plots
    .venv/bin/python scripts/bench_model_causal.py --frontier                    # frontier_8192.png, frontier.md

Machine: 2-core CPU VM, no GPU; the other core ran tests of the project at the same time. Date: 2026-12-01.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hf_sparse_attn.cli import main  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "eval", "results", "model_bench_causal")
COMMON = ["bench", "model", "--tokens", "8192", "--threads", "1", "--no-profile", "--no-goals",
          "--layers", "0", "30", "15", "--selections", "weight_norm",
          "--method-param", "local.window=1024",
          "--method-param", "sparse_hyper.causal_mode=single_pass",
          "--method-param", "sparse_hyper.window=512", "--method-param", "sparse_hyper.block_size=128",
          "--machine-note", "1 torch thread pinned to core 1; core 0 ran the project's tests meanwhile",
          "--out", OUT]
# hyper's fastest single-pass configuration measured (window 256, block 128, 128 samples: 2.77x SDPA at 8k on bare
# tensors, real-layer error 0.356), on all 30 layers.
HYPER = ["--method-layers", "hyper=30",
         "--method-param", "hyper.causal_mode=single_pass", "--method-param", "hyper.window=256",
         "--method-param", "hyper.block_size=128", "--method-param", "hyper.sample_size=128"]
ARGV = [*COMMON, "--methods", "local", "sparse_hyper", "hyper", *HYPER, "--articles", "20"]

GRID = os.path.join(os.path.dirname(__file__), "..", "eval", "results", "model_bench_grid", "results.json")


def frontier() -> int:
    """frontier_8192.png + frontier.md: perplexity change against prefill speed-up, one point per cell of this run
    (each against the exact model of its own run) and, for reference, the recursive-mode weight_norm cells of the
    existing 8k grid (20 articles, another run: its own exact baseline)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def rows(path: str, label: str) -> list[dict]:
        with open(path) as f:
            data = json.load(f)
        return [dict(r, source=label) for r in data["rows"] if r["tokens"] == 8192 and r["layers"] in (15, 30)
                and r["select"] == "weight_norm"]

    points = rows(os.path.join(OUT, "results.json"), "this run")
    if os.path.exists(GRID):
        points += [r for r in rows(GRID, "8k grid, causal_mode=recursive") if r["method"] in ("hyper", "sparse_hyper")]
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter([1.0], [0.0], marker="*", s=150, color="black", label="exact")
    lines = ["| source | method | layers | articles | perplexity change | prefill speed-up | params |", "|---|---|---|---|---|---|---|"]
    for r in points:
        name = f"{r['method']} {r['params'].get('causal_mode', 'recursive')}" if r["method"] != "local" else "local"
        marker = "s" if r["method"] == "local" else ("o" if r["source"] == "this run" else "^")
        ax.scatter(r["speedup"], r["ppl_change_pct"], marker=marker)
        ax.annotate(f"{name} {r['layers']}L ({r['articles']} art.)", (r["speedup"], r["ppl_change_pct"]), fontsize=7)
        lines.append(f"| {r['source']} | {name} | {r['layers']} | {r['articles']} | {r['ppl_change_pct']:+.1f}% | "
                     f"{r['speedup']:.2f}x | {json.dumps(r['params'], sort_keys=True)} |")
    ax.set_xlabel("prefill speed-up over exact (same run)")
    ax.set_ylabel("perplexity change vs exact, %")
    ax.set_title("SmolLM2-135M, 8192 tokens, weight_norm layers (squares: local; triangles: earlier grid run)")
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "frontier_8192.png"), dpi=110)
    with open(os.path.join(OUT, "frontier.md"), "w") as f:
        f.write("# Perplexity change against prefill speed-up at 8k (SmolLM2-135M, weight_norm layers)\n\n"
                "Written by `scripts/bench_model_causal.py --frontier` from results.json of this folder and of "
                "eval/results/model_bench_grid (recursive mode, an earlier run with its own exact baseline). "
                "Machine: 2-core CPU VM, no GPU, 1 torch thread pinned to core 1. Date: 2026-12-01.\n\n"
                + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    if "--frontier" in sys.argv[1:]:
        sys.exit(frontier())
    sys.exit(main(ARGV + sys.argv[1:]))
