"""`hf-sparse-attn rank MODEL`: print R per layer (seed 002 §5.1) without patching."""

from __future__ import annotations

import argparse
import json

from ..selection import NORMS, rank_layers
from .loading import MODEL_HELP, load_model


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--norm", choices=NORMS, default="spectral", help="norm of diag(g) W_Q^T W_K diag(g) (default spectral)")
    parser.add_argument("--head-reduce", choices=("mean", "max"), default="mean", help="layer R from its heads' R")
    parser.add_argument("--json", metavar="FILE", help="also write the ranking as JSON")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow hub remote code (ChatGLM); off by default")


def run(args: argparse.Namespace) -> int:
    model, _ = load_model(args.model, trust_remote_code=args.trust_remote_code, tokenizer=False)  # weights only
    ranking = rank_layers(model, norm=args.norm, head_reduce=args.head_reduce)
    print(ranking)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"weight_norms": ranking.weight_norms, "head_weight_norms": ranking.head_weight_norms,
                       "order": ranking.order, "norm": ranking.norm, "head_reduce": ranking.head_reduce}, f, indent=2)
    return 0
