"""`hf-sparse-attn rank MODEL`: print R per layer ("Attention is Naturally Sparse" §5.1) without patching.

The table is in layer order; its ``rank`` column is each layer's place when sorted by R, largest first (rank 0 =
largest R = chosen first by ``select="weight_norm"``).
"""

from __future__ import annotations

import argparse
import json
import os

from .models import MODEL_HELP, add_model_arguments, load_model, model_name

NORMS = ("spectral", "frobenius")  # hf_sparse_attn.selection.NORMS (tests/test_cli_newcomer.py keeps them equal)
EPILOG = "The table is in layer order; 'rank' is the layer's place by R, largest first (rank 0 = largest R)."


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.add_argument("model_positional", nargs="?", metavar="MODEL", type=model_name,
                        help=MODEL_HELP + " (or --model)")
    add_model_arguments(parser, required=False)
    parser.add_argument("--norm", choices=NORMS, default="spectral", help="norm of diag(g) W_Q^T W_K diag(g) (default spectral)")
    parser.add_argument("--head-reduce", choices=("mean", "max"), default="mean", help="layer R from its heads' R")
    parser.add_argument("--json", metavar="FILE", help="also write the ranking as JSON")


def run(args: argparse.Namespace) -> int:
    name = args.model or args.model_positional
    if not name or (args.model and args.model_positional and args.model != args.model_positional):
        raise SystemExit("name one model: `hf-sparse-attn rank MODEL` or `hf-sparse-attn rank --model MODEL`")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        raise SystemExit(f"--json {args.json}: the directory {os.path.dirname(os.path.abspath(args.json))} does not exist")
    from ..selection import rank_layers

    model, _ = load_model(name, trust_remote_code=args.trust_remote_code, tokenizer=False)  # weights only
    ranking = rank_layers(model, norm=args.norm, head_reduce=args.head_reduce)
    print(ranking)
    print(EPILOG)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"weight_norms": ranking.weight_norms, "head_weight_norms": ranking.head_weight_norms,
                       "order": ranking.order, "norm": ranking.norm, "head_reduce": ranking.head_reduce}, f, indent=2)
    return 0
