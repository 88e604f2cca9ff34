"""`hf-sparse-attn <command>`: the command line. Each command is one module with ``configure(parser)`` and
``run(args) -> int``, listed in ``COMMANDS``.

Commands are imported only when chosen, so ``--help`` stays fast and a missing optional dependency of one
command never breaks the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "rank": ("hf_sparse_attn.commands.rank", "rank a model's layers by Q/K weight norm (no patching)"),
    "demo": ("hf_sparse_attn.commands.demo", "real SmolLM2-135M end to end: rank, patch half, check, time and score"),
    "bench": ("hf_sparse_attn.eval.bench_cli", "speed and error of methods (kernel level) and patched models"),
    "head-tail": ("hf_sparse_attn.eval.head_tail_cli", "head-to-tail ratio statistics of a model's attention on a corpus"),
    "sparsity": ("hf_sparse_attn.eval.sparsity_cli", "k-sparsity of attention rows per layer versus weight norm R, on real text"),
    "longbench": ("hf_sparse_attn.eval.longbench.cli", "predict LongBench / LongBench-E / the offline suite with a patched model"),
    "longbench-score": ("hf_sparse_attn.eval.longbench.score_cli", "score a directory of LongBench predictions"),
    "longbench-grid": ("hf_sparse_attn.eval.longbench.grid", "a LongBench experiment from a TOML config: exact vs methods x layers x selections"),
    "calibrate": ("hf_sparse_attn.commands.calibrate", "the fastest plan within a perplexity budget, measured on your text"),
    "lm-eval": ("hf_sparse_attn.commands.lm_eval_cli", "lm-evaluation-harness's CLI with model type 'hf-sparse' registered"),
}


DESCRIPTION = """\
Swap the attention of chosen layers of a Hugging Face Transformers model for a
fast approximate method (HyperAttention, Sparse HyperAttention, a local window
with attention sinks, ...), with the layers ranked by their Q/K weight norm, and
measure whether it was worth it: prefill time and perplexity against the exact
model, LongBench and lm-evaluation-harness scores, attention statistics."""

EPILOG = """\
examples:
  hf-sparse-attn demo                  # real SmolLM2-135M: rank, patch half, time and score
  hf-sparse-attn rank smollm2          # its layers by Q/K weight norm, largest first
  hf-sparse-attn calibrate --model smollm2 --text my_text.txt --budget 0.03 --out plan.json
  hf-sparse-attn bench run eval/experiments/model_bench_causal.toml   # re-make one result

Run `hf-sparse-attn COMMAND --help` for the options of a command. From Python:
`from hf_sparse_attn import patch_model` (README.md)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-sparse-attn", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (accepted anywhere "
                                                             "on the command line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue  # command not built yet
            raise
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def _one_line(message: str) -> str:
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a command. Bad input (``ValueError``, ``OSError``, ``SystemExit`` with a message) prints one line
    ``hf-sparse-attn <command>: error: ...`` and returns 2; ``--debug`` (anywhere on the line) shows the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # every later argument is lm-eval's own, options included
        from .commands.lm_eval_cli import run_argv

        return run_argv(argv[1:])
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    if debug:
        return int(args._run(args) or 0)
    try:
        return int(args._run(args) or 0)
    except SystemExit as err:
        if isinstance(err.code, str):  # raise SystemExit("what went wrong and what to do")
            print(f"hf-sparse-attn {args.command}: error: {_one_line(err.code)}", file=sys.stderr)
            return 2
        raise
    except (ValueError, OSError) as err:
        print(f"hf-sparse-attn {args.command}: error: {_one_line(err) or type(err).__name__} "
              "(--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
