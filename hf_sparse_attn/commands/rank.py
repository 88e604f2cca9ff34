"""`hf-sparse-attn rank MODEL`: print R per layer ("Attention is Naturally Sparse" §5.1) without patching."""

from __future__ import annotations

import argparse
import json

from ..selection import NORMS, rank_layers
from .loading import MODEL_HELP, add_model_arguments, load_model


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_positional", nargs="?", metavar="MODEL", help=MODEL_HELP + " (or --model)")
    add_model_arguments(parser, required=False)
    parser.add_argument("--norm", choices=NORMS, default="spectral", help="norm of diag(g) W_Q^T W_K diag(g) (default spectral)")
    parser.add_argument("--head-reduce", choices=("mean", "max"), default="mean", help="layer R from its heads' R")
    parser.add_argument("--json", metavar="FILE", help="also write the ranking as JSON")


def run(args: argparse.Namespace) -> int:
    name = args.model or args.model_positional
    if not name or (args.model and args.model_positional and args.model != args.model_positional):
        raise SystemExit("name one model: `hf-sparse-attn rank MODEL` or `hf-sparse-attn rank --model MODEL`")
    model, _ = load_model(name, trust_remote_code=args.trust_remote_code, tokenizer=False)  # weights only
    ranking = rank_layers(model, norm=args.norm, head_reduce=args.head_reduce)
    print(ranking)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"weight_norms": ranking.weight_norms, "head_weight_norms": ranking.head_weight_norms,
                       "order": ranking.order, "norm": ranking.norm, "head_reduce": ranking.head_reduce}, f, indent=2)
    return 0
