"""`hf-sparse-attn lm-eval ARGS...`: lm-evaluation-harness's own command line, with model type ``hf-sparse``
registered first (lm-eval has no plugin entry points). Every argument goes to lm-eval unchanged, e.g.

    hf-sparse-attn lm-eval run --model hf-sparse --model_args pretrained=DIR,method=hyper,layers=0.5 --tasks TASK

Needs the optional extra: ``pip install "hf_sparse_attn[lm_eval]"``.
"""

from __future__ import annotations

import argparse
from typing import Sequence

HELP = "lm-evaluation-harness's CLI with model type 'hf-sparse' (a patched HF model) registered"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm-eval (see `lm-eval --help`)")


def run_argv(argv: Sequence[str]) -> int:
    try:
        from .. import lm_eval as sparse_lm_eval
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "lm_eval":
            raise SystemExit('lm-eval is not installed: pip install "hf_sparse_attn[lm_eval]" (lm-eval 0.4.x)') from None
        raise
    return sparse_lm_eval.main(list(argv))


def run(args: argparse.Namespace) -> int:
    return run_argv(args.lm_eval_args)
