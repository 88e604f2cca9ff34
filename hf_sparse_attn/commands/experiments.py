"""Experiments declared, not logged: one TOML config per results directory, run by one command.

    hf-sparse-attn bench run eval/experiments/<name>.toml [--shard I/N] [--report-only] [--dry-run]

A config (eval/experiments/<name>.toml)::

    [experiment]
    name = "model_bench_causal"        # = the results directory eval/results/<name>/ (and the file's name)
    question = "one line: what this experiment answers"
    kind = "model"                      # "model" | "kernel": `hf-sparse-attn bench model|kernel`;
                                        # "script": a script under scripts/ (logic the CLI cannot express)
    # script = "scripts/x.py"           # kind "script" only
    # shardable = true                  # kind "script" only: the script accepts --shard I/N
    # report_script = "scripts/y.py"    # optional: run after the runs (and by --report-only) with --out

    [[run]]                             # one command per [[run]], in order; keys are the command's long options
    tokens = [8192]                     # (dashes as underscores): a list gives the values of an option that takes
    methods = ["local", "sparse_hyper"] # several, or repeats an option given once per value (--method-param);
    method_param = ["local.window=1024"]  # true gives a bare flag, false leaves it out
    articles = 20

    [[goal]]                            # optional, kind "model": checked in the report (hf_sparse_attn.eval.bench.goals)
    text = "half the layers within +5% of exact"
    method = "sparse_hyper"
    layers = 15
    at_most = 5.0

The runner adds ``--out eval/results/<name>`` (or ``--out`` given to it) to every command and, for kinds model and
kernel, ``--experiment CONFIG`` (the report names the config and checks its goals). Several ``[[run]]`` blocks run
one after the other into the same directory; the last one is the final grid, which ``--report-only`` rebuilds the
report from (kinds model / kernel: the records of every run are read). ``--shard I/N`` is passed on to every command:
``bench model`` runs every N-th patched cell in its own results file (each shard re-times the exact baseline on its
articles, as a speed-up needs a baseline of its own run); ``bench kernel`` cannot shard (refused); a script gets it
only if the config says ``shardable = true``. Paths in a config are relative to the repository root: run from
there, the commands keep them as written; run from elsewhere (a config under ``<root>/eval/experiments/``), the
results directory, the scripts and the config are given as absolute paths under that root.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tomllib
from typing import Any, Optional

KINDS = ("model", "kernel", "script")
TABLES = ("experiment", "run", "goal")
EXPERIMENT_KEYS = ("name", "question", "kind", "script", "shardable", "report_script")
RUNNER_OPTIONS = ("out", "shard", "report_only", "experiment", "help", "overwrite")  # the runner sets these, a [[run]] may not
RESULTS_ROOT = os.path.join("eval", "results")


class ConfigError(ValueError):
    """An experiment config that cannot be run; the message says what to change."""


# ---------------------------------------------------------------------------------------------------------
# Reading and checking a config
# ---------------------------------------------------------------------------------------------------------

def load_config(path: str) -> dict:
    """The config at ``path`` (TOML), checked: see :func:`check_config`. Raises ConfigError."""
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such experiment config (they live in eval/experiments/<name>.toml)")
    with open(path, "rb") as f:
        try:
            config = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
    check_config(config, path)
    return config


def check_config(config: dict, path: str = "<config>") -> None:
    """Raise ConfigError naming the problem: unknown tables, unknown or missing keys of [experiment], an unknown
    kind, no [[run]], an option the command does not know (the error lists the command's options), a bad goal."""
    unknown = sorted(set(config) - set(TABLES))
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {unknown}; a config has [experiment], [[run]] and optionally [[goal]]")
    exp = config.get("experiment")
    if not isinstance(exp, dict):
        raise ConfigError(f"{path}: missing the [experiment] table (name, question, kind)")
    unknown = sorted(set(exp) - set(EXPERIMENT_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown} in [experiment]; it takes {list(EXPERIMENT_KEYS)}")
    missing = [k for k in ("name", "question", "kind") if k not in exp]
    if missing:
        raise ConfigError(f"{path}: [experiment] lacks {missing}")
    stem = os.path.splitext(os.path.basename(path))[0]
    if path != "<config>" and exp["name"] != stem:
        raise ConfigError(f"{path}: [experiment] name {exp['name']!r} differs from the file's name {stem!r}: the "
                          "config of eval/results/<name>/ is eval/experiments/<name>.toml")
    kind = exp["kind"]
    if kind not in KINDS:
        raise ConfigError(f"{path}: unknown kind {kind!r}; choose from {list(KINDS)}")
    if kind == "script":
        if "script" not in exp:
            raise ConfigError(f"{path}: kind 'script' needs script = \"scripts/<file>.py\" in [experiment]")
    else:
        extra = [k for k in ("script", "shardable") if k in exp]
        if extra:
            raise ConfigError(f"{path}: {extra} in [experiment] are for kind 'script' only (this one is {kind!r})")
    runs = config.get("run")
    if not runs or not isinstance(runs, list):
        raise ConfigError(f"{path}: no [[run]] table: declare at least one command (its options as keys)")
    for i, run in enumerate(runs):
        run_argv(kind, run, where=f"{path}: [[run]] {i + 1}")
    goals = config.get("goal", [])
    if goals and kind != "model":
        raise ConfigError(f"{path}: [[goal]] tables are checked by the model report only (kind {kind!r})")
    from ..eval.bench.goals import check_goal_spec

    for goal in goals:
        try:
            check_goal_spec(goal)
        except ValueError as err:
            raise ConfigError(f"{path}: {err}") from None


def command_options(kind: str) -> dict[str, argparse.Action]:
    """Option name as a config key (long option, dashes as underscores) -> its argparse action, for
    ``hf-sparse-attn bench <kind>`` (kind "model" or "kernel")."""
    from .bench_options import add_kernel_and_model_levels

    levels = argparse.ArgumentParser().add_subparsers()
    add_kernel_and_model_levels(levels)
    out = {}
    for action in levels.choices[kind]._actions:
        for option in action.option_strings:
            if option.startswith("--"):
                out[option[2:].replace("-", "_")] = action
    return out


def _values(value: Any) -> list[str]:
    return [str(v) for v in (value if isinstance(value, list) else [value])]


def run_argv(kind: str, run: dict, where: str = "[[run]]") -> list[str]:
    """The command-line options of one ``[[run]]`` table (without ``--out``), checked against the command's
    options for kinds model / kernel. Raises ConfigError."""
    if not isinstance(run, dict):
        raise ConfigError(f"{where}: a [[run]] is a table of options")
    taken = sorted(k for k in run if k in RUNNER_OPTIONS)
    if taken:
        raise ConfigError(f"{where}: {taken} are set by the runner (`bench run --out/--shard/--report-only`), not in a [[run]]")
    argv: list[str] = []
    if kind == "script":  # the script's own argparse checks its options when it runs
        for key, value in run.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value is not False:
                argv += [flag, *_values(value)]
        return argv
    options = command_options(kind)
    for key, value in run.items():
        action = options.get(key)
        if action is None:
            names = ", ".join(sorted(k for k in options if k not in RUNNER_OPTIONS))
            raise ConfigError(f"{where}: `bench {kind}` has no option --{key.replace('_', '-')} (key {key!r}); its "
                              f"options (as keys): {names}")
        flag = "--" + key.replace("_", "-")
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {key} is a flag: write {key} = true (or leave it out)")
            if value:
                argv.append(flag)
        elif isinstance(action, argparse._AppendAction):
            for v in _values(value):
                argv += [flag, v]
        elif action.nargs in ("+", "*"):
            argv += [flag, *_values(value)]
        else:
            if isinstance(value, list):
                raise ConfigError(f"{where}: {key} takes one value, not a list")
            argv += [flag, str(value)]
    return argv


# ---------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------

def repository_root(config_path: str) -> Optional[str]:
    """The repository root of a config at ``<root>/eval/experiments/<name>.toml`` when the command runs somewhere
    else (None when it runs in the root, or the config lies elsewhere: paths stay as written)."""
    here = os.path.dirname(os.path.abspath(config_path))
    if os.path.basename(here) != "experiments" or os.path.basename(os.path.dirname(here)) != "eval":
        return None
    root = os.path.dirname(os.path.dirname(here))
    return None if os.path.realpath(root) == os.path.realpath(os.getcwd()) else root


def experiment_commands(config_path: str, *, out: Optional[str] = None, shard: Optional[str] = None,
                        report_only: bool = False, overwrite: bool = False) -> list[list[str]]:
    """The commands the experiment runs, in order, as argv lists: ``["hf-sparse-attn", "bench", kind, ...]`` for
    kinds model / kernel, ``[python, script, ...]`` for scripts (and the report script last, if any). Raises
    ConfigError for a shard the command cannot take. Run from outside the repository root, the paths are absolute
    (:func:`repository_root`)."""
    config = load_config(config_path)
    exp = config["experiment"]
    kind = exp["kind"]
    root = repository_root(config_path)
    out = out or os.path.join(RESULTS_ROOT, exp["name"])
    if root is not None:
        if not os.path.isabs(out) and out == os.path.join(RESULTS_ROOT, exp["name"]):
            out = os.path.join(root, out)
        config_path = os.path.abspath(config_path)
        exp = dict(exp)
        for key in ("script", "report_script"):
            if exp.get(key) and not os.path.isabs(exp[key]):
                exp[key] = os.path.join(root, exp[key])
    if overwrite and (report_only or shard is not None or kind == "script"):
        raise ConfigError("--overwrite is for a whole run of a kind 'model' or 'kernel' experiment (not with --shard "
                          "or --report-only)")
    if shard is not None:
        from .arguments import parse_shard

        try:
            parse_shard(shard)
        except SystemExit as err:
            raise ConfigError(str(err)) from None
        if report_only:
            raise ConfigError("--report-only reads every shard's records: give it without --shard")
        if kind == "kernel":
            raise ConfigError(f"{config_path}: kind 'kernel' cannot shard (bench kernel rewrites one results.json after "
                              "every cell); run it without --shard")
        if kind == "script" and not exp.get("shardable", False):
            raise ConfigError(f"{config_path}: {exp['script']} does not declare that it shards (shardable = true in "
                              "[experiment]); run it without --shard")
    runs = config["run"][-1:] if report_only else config["run"]
    commands = []
    for run in runs:
        argv = run_argv(kind, run, where=config_path)
        if kind == "script":
            command = [sys.executable, exp["script"], *argv]
        else:
            command = ["hf-sparse-attn", "bench", kind, *argv, "--experiment", config_path]
        command += ["--out", out]
        if shard is not None:
            command += ["--shard", shard]
        if report_only:
            command.append("--report-only")
        if overwrite and not commands:  # the first command clears the directory; the later ones add to it
            command.append("--overwrite")
        commands.append(command)
    if exp.get("report_script") and shard is None:
        commands.append([sys.executable, exp["report_script"], "--out", out])
    return commands


def run_experiment(config_path: str, *, out: Optional[str] = None, shard: Optional[str] = None,
                   report_only: bool = False, dry_run: bool = False, overwrite: bool = False) -> int:
    """Run (or with ``dry_run`` print) the experiment's commands; stops at the first that fails. Returns its exit
    status (0 when every command succeeded)."""
    commands = experiment_commands(config_path, out=out, shard=shard, report_only=report_only, overwrite=overwrite)
    missing = [c[1] for c in commands if c[0] == sys.executable and not os.path.exists(c[1])]
    if missing and not dry_run:
        raise ConfigError(f"{config_path}: script(s) {missing} not found (paths are relative to the repository root: "
                          "run `bench run` from there)")
    for command in commands:
        shown = ["python", *command[1:]] if command[0] == sys.executable else command
        print(" ".join(shlex.quote(a) for a in shown), flush=True)
        if dry_run:
            continue
        if command[0] == sys.executable:
            rc = subprocess.call(command)
        else:
            from ..cli import main

            rc = main(command[1:])
        if rc:
            print(f"bench run {config_path}: the command above failed (exit status {rc}); rerun resumes", file=sys.stderr)
            return rc
    return 0


def configure_run(levels: Any) -> None:
    """The ``run`` level of ``hf-sparse-attn bench``."""
    run = levels.add_parser("run", help="run an experiment config (eval/experiments/<name>.toml)",
                            description=__doc__.split("\n\n")[0] + " The config format: "
                                        "hf_sparse_attn/commands/experiments.py (module docstring).")
    run.add_argument("config", help="the experiment config, eval/experiments/<name>.toml")
    run.add_argument("--shard", default=None, metavar="I/N",
                     help="run shard I of N (0 <= I < N) of each command (kind model; scripts that declare it)")
    run.add_argument("--report-only", action="store_true", help="only rebuild the report from the records in the out dir")
    run.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    run.add_argument("--out", default=None, help="results directory (default: eval/results/<name>)")
    run.add_argument("--overwrite", action="store_true",
                     help="kinds model / kernel: the results directory holds results of other settings; discard "
                          "them (passed to the first command)")


def run_experiment_command(args: argparse.Namespace) -> int:
    try:
        return run_experiment(args.config, out=args.out, shard=args.shard, report_only=args.report_only,
                              dry_run=args.dry_run, overwrite=args.overwrite)
    except ConfigError as err:
        print(f"hf-sparse-attn bench run: error: {err}", file=sys.stderr)
        return 2
