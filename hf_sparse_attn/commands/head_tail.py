"""`hf-sparse-attn head-tail`: Indyk et al. head-to-tail ratio statistics of a model's attention on a corpus.

    hf-sparse-attn head-tail --model minilm --corpus wikipedia --max-sequences 2000 --out runs/ht_minilm
    hf-sparse-attn head-tail --model PATH_OR_ID --text FILE --out DIR        (FILE: one sequence per line)

Writes DIR/head_tail.json (max_ratio, median_n_n1, median_n_2n as [layer][head] lists, sequences, the A.1.3
scaling curve, counts of infinite ratios, and under "input" what was left out: empty lines, texts shorter than
--min-chars, texts not drawn by --max-sequences, sequences cut to --max-length tokens, sequences shorter than
--min-tokens), DIR/*.png (heatmaps and the scaling plot) and DIR/summary.txt (also printed). The corpus is read
and checked before the model loads. Every finished sequence is appended to DIR/state/sequences.jsonl, so an interrupted run resumes where
it stopped (same arguments; ``--restart`` starts over). The statistics are defined in
:mod:`hf_sparse_attn.eval.head_tail`; what this command shares with ``sparsity`` is in
:mod:`hf_sparse_attn.commands.corpus_audit`.
"""

from __future__ import annotations

import argparse
import os

from . import corpus_audit as audit
from .models import load_model


def configure(parser: argparse.ArgumentParser) -> None:
    audit.add_model_arguments(parser)
    audit.add_corpus_arguments(parser)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--min-prefix", type=int, default=50, help="smallest prefix length of experiment (i) (default 50, Indyk et al.)")
    parser.add_argument("--prefix-step", type=int, default=1, help="evaluate every this many prefix lengths (default 1; "
                        "the scaling lengths and n are always evaluated; use 50 for 8k-token sequences)")
    parser.add_argument("--scaling-step", type=int, default=50, help="context lengths of the A.1.3 curve: min-prefix, +step, ... (default 50)")
    parser.add_argument("--max-block-entries", type=int, default=1 << 24, help="memory bound: kernel entries formed at once (default 2^24)")
    parser.add_argument("--restart", action="store_true", help="discard a previous run in --out instead of resuming it")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass when --max-length <= 1024 (default 16)")


def _group_layers(num_heads: list[int], n: int, budget: int = 1 << 22) -> list[list[int]]:
    """Consecutive layers processed together (their heads stacked) while heads x n^2 stays under ``budget``."""
    groups: list[list[int]] = []
    for layer, heads in enumerate(num_heads):
        if groups and (sum(num_heads[i] for i in groups[-1]) + heads) * n * n <= budget:
            groups[-1].append(layer)
        else:
            groups.append([layer])
    return groups


def sequence_length(captured: dict, batch_index: int = 0) -> int:
    """Unpadded token count of sequence ``batch_index`` of a capture_attention record."""
    capture = captured[min(captured)][0]
    if capture.key_padding_mask is None:
        return int(capture.query.shape[2])
    return int(capture.key_padding_mask[batch_index].sum())


def sequence_statistics(captured: dict, prefix_lengths: list[int], max_block_entries: int, batch_index: int = 0) -> list:
    """Per layer (index order) SequenceHeadTail of sequence ``batch_index`` of ``captured`` (from capture_attention)."""
    import torch

    from hf_sparse_attn.eval.head_tail import SequenceHeadTail, head_tail_statistics, sequence_points

    layers = sorted(captured)
    if layers != list(range(len(layers))):
        raise ValueError(f"expected captures of every layer 0..L-1, got {layers}")
    records = []
    for layer in layers:
        if not captured[layer]:
            raise ValueError(f"layer {layer} recorded no attention call")
        capture = captured[layer][0]
        if capture.attend_mask is not None:
            raise ValueError(f"layer {layer} uses a mask that is neither causal nor key padding; head-tail supports only those")
        records.append(capture)
    n = sequence_length(captured, batch_index)
    out: list = [None] * len(layers)
    groups = _group_layers([r.query.shape[1] for r in records], n)
    if n >= 2048:  # minutes per sequence: show the layers going by
        from tqdm import tqdm

        groups = tqdm(groups, desc=f"layers (n={n})", leave=False)
    for group in groups:
        points = [sequence_points(records[i], batch_index) for i in group]
        causal = {records[i].causal for i in group}
        if len(causal) != 1:  # keep mixed groups apart
            for i, (x, y) in zip(group, points):
                out[i] = head_tail_statistics(x, y, causal=records[i].causal, prefix_lengths=prefix_lengths, max_block_entries=max_block_entries)
            continue
        x = torch.cat([p[0] for p in points])
        y = torch.cat([p[1] for p in points])
        stats = head_tail_statistics(x, y, causal=causal.pop(), prefix_lengths=prefix_lengths, max_block_entries=max_block_entries)
        start = 0
        for i, (xi, _) in zip(group, points):
            h = xi.shape[0]
            out[i] = SequenceHeadTail(stats.n, stats.causal, stats.prefix_lengths, stats.ratios[start:start + h],
                                      stats.ratio_n_n1[start:start + h], stats.ratio_n_2n[start:start + h],
                                      stats.float32_zero_n1[start:start + h], stats.float32_zero_2n[start:start + h])
            start += h
    return out


def run(args: argparse.Namespace) -> int:
    if args.min_prefix < 1 or args.prefix_step < 1 or args.scaling_step < 1:
        raise SystemExit("--min-prefix, --prefix-step and --scaling-step must be >= 1")
    corpus, texts, input_counts = audit.read_inputs(args)  # bad input fails here, before the model loads
    from tqdm import tqdm

    from hf_sparse_attn.eval.head_tail import HeadTailAccumulator, prefix_grid, scaling_lengths, sequence_record, summary_text, write_plots
    from hf_sparse_attn.eval.sparsity import model_forward
    from hf_sparse_attn.patches import capture_attention

    audit.apply_threads(args)
    model, tokenizer = load_model(args.model, args.trust_remote_code, device=args.device, dtype="float32")
    max_length = args.max_length or audit.model_max_length(model, tokenizer)
    scaling = scaling_lengths(max_length, args.scaling_step, args.min_prefix)
    config = {"model": args.model, "corpus": corpus, "max_sequences": args.max_sequences, "seed": args.seed,
              "min_chars": args.min_chars, "max_length": max_length, "min_tokens": args.min_tokens,
              "min_prefix": args.min_prefix, "prefix_step": args.prefix_step, "scaling_step": args.scaling_step,
              "sequences_in_corpus_draw": len(texts)}
    state = audit.ResumableRun(args.out, config, restart=args.restart)
    batches = audit.pending_batches(texts, state.done, args.batch_size, max_length)
    try:
        bar = tqdm(total=len(texts), desc="head-tail", unit="seq", initial=len(texts) - sum(map(len, batches)))
        for batch in batches:
            full_lengths, encoded = audit.encode_batch(tokenizer, [texts[i] for i in batch], max_length)
            lengths = encoded["attention_mask"].sum(1).tolist()
            keep = [j for j, n in enumerate(lengths) if n >= args.min_tokens]
            for j, n in enumerate(lengths):
                if n < args.min_tokens:
                    state.add({"index": batch[j], "skipped": f"{n} tokens < --min-tokens {args.min_tokens}"})
                    bar.update(1)
            if not keep:
                continue
            input_ids = encoded["input_ids"][keep].to(args.device)
            attention_mask = encoded["attention_mask"][keep].to(args.device)
            with capture_attention(model) as captured:
                model_forward(model, input_ids, attention_mask if len(keep) > 1 else None)
            for b, j in enumerate(keep):
                n = int(lengths[j])
                stats = sequence_statistics(captured, prefix_grid(n, args.min_prefix, args.prefix_step, scaling),
                                            args.max_block_entries, batch_index=b)
                record = sequence_record(stats, scaling)
                record["index"] = batch[j]
                record["causal"] = stats[0].causal
                if full_lengths[j] > max_length:
                    record["truncated_from"] = full_lengths[j]  # tokens before the cut to max_length
                state.add(record)
                bar.update(1)
                bar.set_postfix(tokens=n)
            del captured
        bar.close()
    finally:
        state.close()

    records = [r for r in state.records if "skipped" not in r]
    if not records:
        raise SystemExit("no sequence was long enough (see --min-tokens)")
    num_layers = len(records[0]["ratio_n_n1"])
    num_heads = len(records[0]["ratio_n_n1"][0])
    acc = HeadTailAccumulator(num_layers, num_heads)
    for r in records:
        acc.add(r)
    causal = any(r.get("causal") for r in records)
    input_counts["skipped_min_tokens"] = sum(1 for r in state.records if "skipped" in r)
    input_counts["truncated_to_max_length"] = sum(1 for r in records if "truncated_from" in r)
    result = {"model": args.model, "corpus": corpus, **acc.result(), "config": config, **audit.provenance(),
              "skipped_sequences": input_counts["skipped_min_tokens"], "input": input_counts,
              "statistic": ("causal part of K (lower triangle with diagonal): decoder" if causal else "full K: encoder"),
              "definitions": "see hf_sparse_attn/eval/head_tail.py (Indyk et al. section 4, A.1)"}
    audit.write_outputs(args.out, "head_tail.json", result, summary_text, input_counts, max_length)
    write_plots(result, args.out, f"{args.model} / {os.path.basename(str(corpus))}")
    return 0
