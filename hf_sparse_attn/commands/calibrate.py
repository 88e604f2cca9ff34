"""`hf-sparse-attn calibrate --model M --text FILE --budget 0.03 --out plan.json`: find the fastest plan whose
measured perplexity change on the text stays within the budget (see hf_sparse_attn/eval/calibrate.py), and save it.

The text file is tokenized whole and cut into consecutive texts of ``--tokens`` tokens (the last, shorter piece is
dropped; a file shorter than ``--tokens`` is one text). ``--heldout FILE`` is cut the same way and only checked.
The cache of measured cells defaults to ``OUT.cells.jsonl``: run the same command again to resume. An estimate of
the run time is printed before the cells are measured; ``--max-minutes`` bounds it. The plan is checked on a small
pass-key / needle probe set (``--retrieval-budget`` points, ``none`` turns it off).
"""

from __future__ import annotations

import argparse
import json
import os

from .models import add_model_arguments, load_model


def configure(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--text", required=True, metavar="FILE", help="calibration text (UTF-8 file)")
    parser.add_argument("--heldout", metavar="FILE", help="held-out text (UTF-8 file) to check the plan on")
    parser.add_argument("--budget", type=float, default=0.03, help="allowed perplexity increase as a fraction "
                                                                   "(default 0.03 = +3%%)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated candidate methods (default: the methods of --candidates, else "
                             "hyper,sparse_hyper,local)")
    parser.add_argument("--candidates", default=None, metavar="JSON",
                        help='parameter settings per method, as JSON (or a JSON file): {"local": [{"window": 256}]}; '
                             "only these methods are measured unless --methods adds others; default: a few settings "
                             "per method (hf_sparse_attn.eval.calibrate.DEFAULT_CANDIDATES)")
    parser.add_argument("--metric", choices=("loss", "output_error"), default="output_error",
                        help="how cells are ranked: their attention output error, the loss measured only on combined "
                             "plans (default, fast), or every cell's single-layer loss (one forward per cell, slow)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="time budget: refuse to start when the mandatory steps do not fit, and return the best "
                             "plan measured when the search runs out of time (default: no limit)")
    parser.add_argument("--retrieval-budget", default="5", metavar="POINTS",
                        help="points of score (0-100) the plan may lose on a pass-key / needle probe set (default 5; "
                             "'none': no retrieval check)")
    parser.add_argument("--probe-length", type=int, default=None,
                        help="tokens per probe sample (default: the calibration length, --tokens)")
    parser.add_argument("--probe-samples", type=int, default=4, help="probe samples (default 4: pass key at three "
                                                                     "depths and one needle task; at most 6)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per calibration text (default 4096)")
    parser.add_argument("--max-texts", type=int, default=None, help="use at most this many texts of each file")
    parser.add_argument("--layers", default=None, help="comma-separated eligible layers (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--cache", default=None, help="JSONL cache of measured cells (default OUT.cells.jsonl)")
    parser.add_argument("--out", required=True, help="where to write the plan (JSON)")


def read_texts(path: str, tokenizer, tokens: int, max_texts: int | None) -> list:
    """The file's token ids cut into [1, tokens] pieces (a file shorter than ``tokens``: one piece)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"{path} is empty: give a text file to calibrate on")
    ids = tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] < 2:
        raise ValueError(f"{path} has fewer than 2 tokens")
    pieces = [ids[:, s:s + tokens] for s in range(0, ids.shape[1] - tokens + 1, tokens)] or [ids]
    return pieces[:max_texts] if max_texts else pieces


def parse_retrieval_budget(value: str):
    """--retrieval-budget: points as a float, or None for 'none' / 'off'."""
    if str(value).strip().lower() in ("none", "off"):
        return None
    try:
        return float(value)
    except ValueError:
        raise SystemExit(f"--retrieval-budget must be points of score (e.g. 5) or 'none'; got {value!r}") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from ..eval.calibrate import calibrate

    if args.tokens < 2:
        raise SystemExit("--tokens must be at least 2")
    retrieval = parse_retrieval_budget(args.retrieval_budget)  # before loading the model: fail fast
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code, causal_lm=True)
    if tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer: calibrate tokenizes --text")
    texts = read_texts(args.text, tokenizer, args.tokens, args.max_texts)
    heldout = read_texts(args.heldout, tokenizer, args.tokens, args.max_texts) if args.heldout else None
    layers = None
    if args.layers:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(f"--layers must be comma-separated integers, e.g. 0,3,5; got {args.layers!r}") from None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    candidates = None
    if args.candidates:
        source = args.candidates
        if os.path.isfile(source):
            with open(source, encoding="utf-8") as f:
                source = f.read()
        try:
            candidates = json.loads(source)
        except json.JSONDecodeError as err:
            raise SystemExit(f"--candidates is neither a JSON file nor JSON ({err}); write e.g. "
                             '\'{"local": [{"window": 256}]}\'') from None
    cache = args.cache or f"{os.fspath(args.out)}.cells.jsonl"
    plan = calibrate(model, texts, budget=args.budget, methods=methods, metric=args.metric, heldout_ids=heldout,
                     candidates=candidates, layers=layers, cache=cache, seed=args.seed, max_minutes=args.max_minutes,
                     tokenizer=tokenizer, retrieval_budget=retrieval, probe_length=args.probe_length,
                     probe_samples=args.probe_samples)
    print(plan.report())
    plan.save(args.out)
    print(f"plan written to {args.out} (cells cached in {cache}); apply it with patch_model(model, plan={args.out!r})")
    return 0
