"""`hf-sparse-attn sparsity`: the claim of "Attention is Naturally Sparse with Gaussian Distributed Input" measured — k-sparsity of attention rows per layer/head versus R.

    hf-sparse-attn sparsity --model minilm --corpus wikipedia --max-sequences 500 --out runs/sparsity_minilm
    hf-sparse-attn sparsity --model PATH_OR_ID --text FILE --out DIR --k 1 4 16 64 --eps 0.1 0.25 0.5

Writes DIR/sparsity.json (P(row is (k, eps)-sparse) per layer and head, mean top-k mass, the weight norm R of
:func:`hf_sparse_attn.rank_layers`, Spearman correlations between R and sparsity over layers and over heads),
DIR/sparsity_vs_R.png, DIR/sparsity_heads.png and DIR/summary.txt; "input" in the JSON and the summary's last
line count what was left out or cut (empty lines, --min-chars, --max-sequences, --max-length, --min-tokens). Counts are saved after every sequence in
DIR/state/, so an interrupted run resumes (``--restart`` starts over). Definitions:
:mod:`hf_sparse_attn.eval.sparsity`.
"""

from __future__ import annotations

import argparse
import json
import os

from hf_sparse_attn.eval.head_tail_cli import (
    ResumableRun,
    add_corpus_arguments,
    add_model_arguments,
    apply_threads,
    input_report,
    load_model,
    model_max_length,
    provenance,
    read_corpus,
    token_counts,
)


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_corpus_arguments(parser)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 16, 64], help="sparsity levels k (default 1 4 16 64)")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.25, 0.5], help="errors eps (default 0.1 0.25 0.5)")
    parser.add_argument("--norm", choices=["spectral", "frobenius"], default="spectral", help="norm of R (default spectral)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass when --max-length <= 1024")
    parser.add_argument("--restart", action="store_true", help="discard a previous run in --out instead of resuming it")


def _counts_to_record(index: list[int], counts: dict) -> dict:
    return {"index": index, "layers": {str(i): {"eligible": c.eligible.tolist(), "sparse": c.sparse.tolist(),
                                                 "mass_sum": c.mass_sum.tolist()} for i, c in counts.items()}}


def run(args: argparse.Namespace) -> int:
    if min(args.k) < 1 or not all(0 <= e < 1 for e in args.eps):
        raise SystemExit("--k must be >= 1 and --eps in [0, 1)")
    if args.max_length is not None and args.max_length < 1:
        raise SystemExit(f"--max-length must be >= 1, got {args.max_length}")
    corpus, texts, input_counts = read_corpus(args)  # bad input fails here, before the model loads
    os.makedirs(args.out, exist_ok=True)
    import numpy as np
    from tqdm import tqdm

    from hf_sparse_attn.eval.sparsity import SparsityCounts, measure_sparsity, sparsity_result, sparsity_summary, write_sparsity_plots
    from hf_sparse_attn.selection import rank_layers

    apply_threads(args)
    model, tokenizer = load_model(args.model, args.trust_remote_code, device=args.device, dtype="float32")
    max_length = args.max_length or model_max_length(model, tokenizer)
    ks, epsilons = sorted(set(args.k)), sorted(set(args.eps))
    config = {"model": args.model, "corpus": corpus, "max_sequences": args.max_sequences, "seed": args.seed,
              "min_chars": args.min_chars, "max_length": max_length, "min_tokens": args.min_tokens, "k": ks,
              "eps": epsilons, "sequences_in_corpus_draw": len(texts)}
    state = ResumableRun(args.out, config, restart=args.restart)
    # each record holds the counts of one batch; the totals are their sums
    batch_size = max(1, args.batch_size if max_length <= 1024 else 1)
    pending = [i for i in range(len(texts)) if i not in state.done]
    try:
        bar = tqdm(total=len(texts), desc="sparsity", unit="seq", initial=len(texts) - len(pending))
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            full_lengths = token_counts(tokenizer, [texts[i] for i in batch])
            encoded = tokenizer([texts[i] for i in batch], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            lengths = encoded["attention_mask"].sum(1)
            keep = (lengths >= args.min_tokens).nonzero().flatten().tolist()
            counts: dict = {}
            if keep:
                ids = encoded["input_ids"][keep].to(args.device)
                mask = encoded["attention_mask"][keep].to(args.device)
                measure_sparsity(model, [(ids, mask if len(keep) > 1 else None)], ks, epsilons, counts)
            record = _counts_to_record(batch, counts)  # one line per batch: a crash never counts a sequence twice
            record["sequences_counted"] = len(keep)
            record["skipped_min_tokens"] = len(batch) - len(keep)
            record["truncated"] = sum(1 for j in keep if full_lengths[j] > max_length)  # cut to max_length
            state.add(record)
            bar.update(len(batch))
        bar.close()
    finally:
        state.close()

    totals: dict[int, SparsityCounts] = {}
    for record in state.records:
        for layer, c in record["layers"].items():
            layer = int(layer)
            if layer not in totals:
                totals[layer] = SparsityCounts(tuple(ks), tuple(epsilons), len(c["eligible"]))
            totals[layer].eligible += np.array(c["eligible"], dtype=np.int64)
            totals[layer].sparse += np.array(c["sparse"], dtype=np.int64)
            totals[layer].mass_sum += np.array(c["mass_sum"], dtype=np.float64)
    if not totals:
        raise SystemExit("no sequence was long enough (see --min-tokens)")
    ranking = rank_layers(model, norm=args.norm)
    input_counts["skipped_min_tokens"] = sum(r.get("skipped_min_tokens", 0) for r in state.records)
    input_counts["truncated_to_max_length"] = sum(r.get("truncated", 0) for r in state.records)
    result = {"model": args.model, "corpus": corpus, "sequences": sum(r["sequences_counted"] for r in state.records), "norm": args.norm,
              "input": input_counts,
              **sparsity_result(totals, ranking.weight_norms, ranking.head_weight_norms), "config": config, **provenance(),
              "definitions": "see hf_sparse_attn/eval/sparsity.py (Attention is Naturally Sparse, Definitions 3.4-3.5, Theorem 4.7)"}
    with open(os.path.join(args.out, "sparsity.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_sparsity_plots(result, args.out, args.model)
    text = sparsity_summary(result) + "\n" + input_report(input_counts, max_length)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0
