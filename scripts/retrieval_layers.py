"""Which layers of SmolLM2 read the pass key: the needle mass of every layer on a pass-key probe, against the order
the weight norm R chooses layers in.

    python scripts/retrieval_layers.py --out eval/results/retrieval_layers_smollm2 [--length 2048] [--samples 4]

The probe is ``hf_sparse_attn.retrieval_probe(tokenizer, length, samples)`` (what ``select="retrieval"`` and
``hf-sparse-attn ruler --select retrieval`` use); the mass is ``hf_sparse_attn.retrieval_scores`` (per layer, the
softmax mass the question's last 8 positions put on the key's tokens, the maximum over heads). Writes OUT/results.json,
OUT/results.md and OUT/needle_mass.png (mass per layer; the layers each order patches first when it patches 15).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--patched", type=int, default=15, help="layers a plan patches, for the overlap of the orders")
    args = parser.parse_args(argv)

    import torch

    from hf_sparse_attn import rank_layers, retrieval_probe, retrieval_scores
    from hf_sparse_attn.eval.data import load_smollm2
    from hf_sparse_attn.eval.store import write_json

    torch.set_num_threads(1)
    model, tokenizer = load_smollm2()
    probe = retrieval_probe(tokenizer, length=args.length, samples=args.samples)
    scores = retrieval_scores(model, probe)
    by_norm = rank_layers(model).order
    by_retrieval = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    uniform = float(probe.needle_mask.sum(-1).float().mean()) / args.length
    first_norm, first_retrieval = by_norm[:args.patched], by_retrieval[:args.patched]
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU; one torch thread",
        "command": "python scripts/retrieval_layers.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "probe": {"length": args.length, "samples": args.samples, "query_rows": probe.query_rows,
                  "needle_tokens_per_prompt": float(probe.needle_mask.sum(-1).float().mean())},
        "uniform_share": uniform, "needle_mass": scores, "weight_norm_order": by_norm, "retrieval_order": by_retrieval,
        "patched": args.patched,
        "needle_mass_of_the_patched": {"weight_norm": sum(scores[i] for i in first_norm),
                                       "retrieval": sum(scores[i] for i in first_retrieval)},
        "overlap_of_the_patched": sorted(set(first_norm) & set(first_retrieval)),
    }
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "results.json"), result)
    top = sorted(range(len(scores)), key=lambda i: -scores[i])[:5]
    lines = ["# Needle mass per layer of SmolLM2-135M-Instruct (pass-key probe)", "",
             f"Written by `scripts/retrieval_layers.py` (eval/experiments/retrieval_layers_smollm2.toml) on "
             f"{result['date']}; machine: {result['machine']}.", "",
             f"Probe: {args.samples} pass-key prompts of {args.length} tokens (the key at depths (i + 0.5) / "
             f"{args.samples}); needle mass = the softmax mass the last {probe.query_rows} positions put on the key's "
             f"tokens, the maximum over heads (a uniform share would be {uniform:.4f}).", "",
             "- Layers of most needle mass: " + ", ".join(f"{i} ({scores[i]:.3f})" for i in top) + ".",
             f"- The {args.patched} layers `weight_norm` patches first carry {result['needle_mass_of_the_patched']['weight_norm']:.3f} "
             f"of summed needle mass; the {args.patched} `retrieval` patches first {result['needle_mass_of_the_patched']['retrieval']:.3f}; "
             f"they share {len(result['overlap_of_the_patched'])} layers.",
             f"- weight_norm order: {by_norm}", f"- retrieval order: {by_retrieval}", "",
             "| layer | needle mass | x uniform | weight-norm rank | retrieval rank |", "|---|---|---|---|---|"]
    for i, s in enumerate(scores):
        lines.append(f"| {i} | {s:.4f} | {s / uniform:.1f} | {by_norm.index(i)} | {by_retrieval.index(i)} |")
    lines += ["", "![needle mass](needle_mass.png)", ""]
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8))
    colours = ["tab:red" if i in first_norm and i in first_retrieval else "tab:orange" if i in first_norm
               else "tab:blue" if i in first_retrieval else "tab:gray" for i in range(len(scores))]
    ax.bar(range(len(scores)), scores, color=colours)
    ax.axhline(uniform, color="black", lw=0.8, ls="--", label="uniform share")
    for colour, label in (("tab:orange", f"first {args.patched} by weight norm only"),
                          ("tab:blue", f"first {args.patched} by retrieval only"), ("tab:red", "both")):
        ax.bar([0], [0], color=colour, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("needle mass (max over heads)")
    ax.set_title("SmolLM2-135M: attention from the question to the pass key, per layer", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "needle_mass.png"), dpi=120)
    plt.close(fig)
    print("\n".join(lines[:9]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
