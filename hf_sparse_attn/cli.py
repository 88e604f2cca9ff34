"""`hf-sparse-attn <command>`: the command line. Each command is one module with ``configure(parser)`` and
``run(args) -> int``, listed in ``COMMANDS``.

Commands are imported only when chosen: the top-level ``--help`` lists them from ``COMMANDS`` without importing
any, and ``hf-sparse-attn rank ...`` imports only ``commands/rank.py``, so ``--help`` and argument errors answer at
once and a missing optional dependency of one command never breaks the others. A command module keeps torch and
transformers out of its top level (they are imported in ``run()``): tests/test_cli_newcomer.py checks it.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from typing import Optional, Sequence

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "rank": ("hf_sparse_attn.commands.rank", "rank a model's layers by Q/K weight norm (no patching)"),
    "demo": ("hf_sparse_attn.commands.demo", "real SmolLM2-135M end to end: rank, patch half, check, time and score"),
    "bench": ("hf_sparse_attn.commands.bench", "speed and error of methods (kernel level) and patched models"),
    "head-tail": ("hf_sparse_attn.commands.head_tail", "head-to-tail ratio statistics of a model's attention on a corpus"),
    "sparsity": ("hf_sparse_attn.commands.sparsity", "k-sparsity of attention rows per layer versus weight norm R, on real text"),
    "longbench": ("hf_sparse_attn.commands.longbench", "predict LongBench / LongBench-E / the offline suite with a patched model"),
    "longbench-score": ("hf_sparse_attn.commands.longbench_score", "score a directory of LongBench predictions"),
    "longbench-grid": ("hf_sparse_attn.commands.longbench_grid", "a LongBench experiment from a TOML config: exact vs methods x layers x selections"),
    "calibrate": ("hf_sparse_attn.commands.calibrate", "the fastest plan within a perplexity budget, measured on your text"),
    "lm-eval": ("hf_sparse_attn.commands.lm_eval_cli", "lm-evaluation-harness's CLI with model type 'hf-sparse' registered"),
    "plan": ("hf_sparse_attn.commands.plan", "show a saved plan (plan show FILE) or compare two (plan diff A B)"),
    "ruler": ("hf_sparse_attn.commands.ruler", "RULER's synthetic long-context tasks and a pass key at every depth, offline"),
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
  hf-sparse-attn rank smollm2          # R per layer (layer order; rank 0 = largest R)
  hf-sparse-attn calibrate --model smollm2 --text my_text.txt --budget 0.03 --out plan.json
  hf-sparse-attn bench run eval/experiments/model_bench_causal.toml   # re-make one result
  hf-sparse-attn plan show demo_plan.json     # a saved plan; `plan diff A B` compares two

Run `hf-sparse-attn COMMAND --help` for the options of a command. From Python:
`from hf_sparse_attn import patch_model` (README.md)."""


class _Commands(argparse._SubParsersAction):
    """The sub-command action: a command's options are added (its module imported) only when it is chosen, and an
    option the command does not know is an error with the command's own usage (not the top-level one)."""

    def __call__(self, parser, namespace, values, option_string=None):
        command = self._name_parser_map.get(values[0])
        if command is None:  # argparse checks the choice first; keep its message if that ever changes
            return super().__call__(parser, namespace, values, option_string)
        configure_command(command)
        setattr(namespace, self.dest, values[0])
        sub_namespace, unknown = command.parse_known_args(values[1:], None)
        for key, value in vars(sub_namespace).items():
            setattr(namespace, key, value)
        if unknown:
            chosen = _deepest(command, sub_namespace)
            chosen.error(unrecognized(chosen, unknown))


def _deepest(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost sub-command chosen under ``parser`` (``bench model``), whose usage an error should show."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            nested = action._name_parser_map.get(getattr(namespace, action.dest, None) or "")
            if nested is not None:
                return _deepest(nested, namespace)
    return parser


def unrecognized(parser: argparse.ArgumentParser, unknown: Sequence[str]) -> str:
    """'unrecognized arguments: --nrom x (did you mean --norm?)'."""
    options = {o[2:]: o for action in parser._actions for o in action.option_strings if o.startswith("--")}
    hints = []
    for arg in unknown:
        if arg.startswith("-"):
            option = arg.split("=", 1)[0]
            close = difflib.get_close_matches(option.lstrip("-"), list(options), n=1, cutoff=0.6)  # "--" would match any
            if close:
                hints.append(f"{option}: did you mean {options[close[0]]}?")
    return f"unrecognized arguments: {' '.join(unknown)}" + (f" ({'; '.join(hints)})" if hints else "")


def configure_command(command: argparse.ArgumentParser) -> None:
    """Import the command's module and add its options to ``command`` (once)."""
    module_name = getattr(command, "_hf_sparse_attn_module", None)
    if module_name is None or getattr(command, "_hf_sparse_attn_configured", False):
        return
    module = importlib.import_module(module_name)
    module.configure(command)
    command.set_defaults(_run=module.run)
    command._hf_sparse_attn_configured = True


def _module_exists(module_name: str) -> bool:
    """Whether the command's module is in this installation, by its file (importing nothing)."""
    here = os.path.dirname(os.path.abspath(__file__))
    parts = module_name.split(".")[1:]
    path = os.path.join(here, *parts)
    return os.path.isfile(path + ".py") or os.path.isfile(os.path.join(path, "__init__.py"))


def build_parser() -> argparse.ArgumentParser:
    """The whole command line. Commands are listed from ``COMMANDS``; a command's module is imported, and its
    options added, only when the command is chosen (:class:`_Commands`)."""
    parser = argparse.ArgumentParser(prog="hf-sparse-attn", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.register("action", "parsers", _Commands)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error (accepted anywhere "
                                                             "on the command line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        if not _module_exists(module_name):
            continue  # command not built yet
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        command_parser._hf_sparse_attn_module = module_name
    return parser


def _unknown_command(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Optional[str]:
    """An error message for a first word that is no command ("did you mean rank?"), else None."""
    word = next((a for a in argv if not a.startswith("-")), None)
    if word is None or word in COMMANDS:
        return None
    names = [n for n, (m, _) in COMMANDS.items() if _module_exists(m)]
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    return (f"unknown command {word!r}" + (f": did you mean {close[0]}?" if close else "") +
            f" (commands: {', '.join(names)})")


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
    unknown_command = _unknown_command(parser, argv)
    if unknown_command:
        parser.error(unknown_command)
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
