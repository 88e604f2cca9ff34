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

from . import corpus_audit as audit
from .models import load_model


def configure(parser: argparse.ArgumentParser) -> None:
    audit.add_model_arguments(parser)
    audit.add_corpus_arguments(parser)
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
    corpus, texts, input_counts = audit.read_inputs(args)  # bad input fails here, before the model loads
    import numpy as np
    from tqdm import tqdm

    from hf_sparse_attn.eval.sparsity import SparsityCounts, measure_sparsity, sparsity_result, sparsity_summary, write_sparsity_plots
    from hf_sparse_attn.selection import rank_layers

    audit.apply_threads(args)
    model, tokenizer = load_model(args.model, args.trust_remote_code, device=args.device, dtype="float32")
    max_length = args.max_length or audit.model_max_length(model, tokenizer)
    ks, epsilons = sorted(set(args.k)), sorted(set(args.eps))
    config = {"model": args.model, "corpus": corpus, "max_sequences": args.max_sequences, "seed": args.seed,
              "min_chars": args.min_chars, "max_length": max_length, "min_tokens": args.min_tokens, "k": ks,
              "eps": epsilons, "sequences_in_corpus_draw": len(texts)}
    state = audit.ResumableRun(args.out, config, restart=args.restart)
    # each record holds the counts of one batch; the totals are their sums
    batches = audit.pending_batches(texts, state.done, args.batch_size, max_length)
    try:
        bar = tqdm(total=len(texts), desc="sparsity", unit="seq", initial=len(texts) - sum(map(len, batches)))
        for batch in batches:
            full_lengths, encoded = audit.encode_batch(tokenizer, [texts[i] for i in batch], max_length)
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
              **sparsity_result(totals, ranking.weight_norms, ranking.head_weight_norms), "config": config, **audit.provenance(),
              "definitions": "see hf_sparse_attn/eval/sparsity.py (Attention is Naturally Sparse, Definitions 3.4-3.5, Theorem 4.7)"}
    audit.write_outputs(args.out, "sparsity.json", result, sparsity_summary, input_counts, max_length)
    write_sparsity_plots(result, args.out, args.model)
    return 0
