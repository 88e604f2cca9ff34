"""Values written on the command line: ``NAME=VALUE`` parameters and ``METHOD.NAME=VALUE`` method parameters, parsed
the same way by every command (``bench --method-param``, ``longbench --param``, ``longbench-grid --set``)."""

from __future__ import annotations

import argparse
import difflib
from typing import Any, Callable, Iterable, Optional

import tomllib

# The names a command line can choose from, known without importing torch (the registry imports it), so that a typo
# is an argument error at once. tests/test_cli_newcomer.py keeps them equal to the registry and the presets.
BUILTIN_METHODS = ("block_select", "exact", "feature_sketch", "hyper", "kmv", "local", "poly", "sparse_hyper")
SELECT_PRESETS = ("weight_norm", "last", "first", "even", "odd", "random", "measured", "retrieval")


def one_of(names: Iterable[str], what: str) -> Callable[[str], str]:
    """argparse ``type``: the text if it is one of ``names``, else an error naming the closest ("did you mean
    sparse_hyper?") and every choice."""
    names = tuple(names)

    def check(text: str) -> str:
        if text in names:
            return text
        close = difflib.get_close_matches(text.replace("-", "_"), names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        raise argparse.ArgumentTypeError(f"unknown {what} {text!r}: {hint}choose from {', '.join(names)}")

    check.__name__ = what  # argparse names the type in some messages
    return check


def parse_value(text: str) -> Any:
    """'true' / 'false' (any case) -> bool, then int, then float, then a TOML value (a list, a quoted string),
    else the text itself: '128' -> 128, '0.5' -> 0.5, 'True' -> True, '[1, 2]' -> [1, 2], 'lsh' -> 'lsh'."""
    text = text.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def parse_params(items: Optional[Iterable[str]], option: str = "--param") -> dict[str, Any]:
    """["block_size=256", ...] -> {"block_size": 256}."""
    params: dict[str, Any] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{option} expects NAME=VALUE (e.g. {option} block_size=256), got {item!r}")
        params[name.strip()] = parse_value(value)
    return params


def parse_method_params(items: Optional[Iterable[str]], option: str = "--method-param") -> dict[str, dict[str, Any]]:
    """["hyper.block_size=128", ...] -> {"hyper": {"block_size": 128}} (values: :func:`parse_value`)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        lhs, sep, value = item.partition("=")
        method, dot, name = lhs.strip().partition(".")
        if not sep or not dot or not method or not name:
            raise ValueError(f"{option} {item!r}: write METHOD.NAME=VALUE, e.g. sparse_hyper.block_size=128")
        out.setdefault(method, {})[name] = parse_value(value)
    return out


def parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
    """"I/N" -> (I, N) with 0 <= I < N; None -> None. SystemExit with what to write otherwise."""
    if text is None:
        return None
    i, sep, n = text.partition("/")
    if not sep or not i.strip().isdigit() or not n.strip().isdigit() or not 0 <= int(i) < int(n):
        raise SystemExit(f"--shard {text!r}: write I/N with 0 <= I < N, e.g. --shard 0/2 and --shard 1/2")
    return int(i), int(n)


def parse_layers(text: str) -> Any:
    """``--layers``: '8' -> 8 (count), '0.5' -> 0.5 (fraction), 'all', '0,3,5' -> [0, 3, 5] (indices)."""
    if text == "all":
        return text
    if "," in text:
        try:
            return [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"--layers: indices like 0,3,5; got {text!r}") from None
    value = parse_value(text)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise argparse.ArgumentTypeError(f"--layers: a count, a fraction, 'all' or indices like 0,3,5; got {text!r}")
    return value


def add_patch_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that say how a command patches its model, the same for every command that evaluates a patched
    model (``longbench``, ``ruler``): --method, --layers, --select, --plan, --param, --decode-method and
    --decode-param."""
    parser.add_argument("--method", default="none",
                        help="attention method for the chosen layers ('none' = the unpatched model; see "
                             "hf_sparse_attn.list_methods())")
    parser.add_argument("--layers", type=parse_layers, default=0.5,
                        help="layers to replace: a count (8), a fraction (0.5), 'all' or indices (0,3,5)")
    parser.add_argument("--select", default="weight_norm",
                        help="layer order: weight_norm (largest Q/K norm first), last, first, even, odd, random")
    parser.add_argument("--plan", help="PatchPlan JSON to re-apply (overrides --method / --layers / --select)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="method parameter passed to patch_model (repeatable), e.g. --param block_size=256; "
                             "the layers not chosen run another method with --param 'other_layers={method = "
                             "\"local\", window = 512}'")
    parser.add_argument("--decode-method", default="exact",
                        help="what the chosen layers run on decode steps against the KV cache: exact (default), "
                             "local, lsh, quest (hf_sparse_attn.list_decode_methods()), or 'none' (the model's own "
                             "attention); lsh and quest run with a GrowingCache, which holds their index")
    parser.add_argument("--decode-param", action="append", default=[], metavar="NAME=VALUE",
                        help="decode method parameter (repeatable), e.g. --decode-param window=1024")


def retrieval_probe_settings(args: argparse.Namespace, positions: Optional[int]) -> dict[str, Any]:
    """The probe ``--select retrieval`` builds (hf_sparse_attn.retrieval_probe's arguments), recorded in the run's
    settings; empty for any other selection."""
    if getattr(args, "select", None) != "retrieval" or getattr(args, "plan", None):
        return {}
    from ..retrieval import probe_length

    return {"retrieval_probe": {"length": probe_length(positions),
                                "samples": 4, "seed": args.seed}}


def selection_calibration(args: argparse.Namespace, tokenizer: Any, positions: Optional[int]) -> dict[str, Any]:
    """``patch_model``'s ``calibration`` for the command line's ``--select``: a retrieval probe made with the run's
    tokenizer for ``retrieval``; nothing for the selections that need none."""
    probe = retrieval_probe_settings(args, positions).get("retrieval_probe")
    if probe is None:
        return {}
    from ..retrieval import retrieval_probe

    return {"calibration": retrieval_probe(tokenizer, **probe)}


def decode_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """``patch_model``'s decode keyword arguments from --decode-method / --decode-param (add_patch_arguments)."""
    method = None if args.decode_method in (None, "none") else args.decode_method
    params = parse_params(args.decode_param, option="--decode-param")
    if method is None and params:
        raise ValueError("--decode-param needs a --decode-method (one of hf_sparse_attn.list_decode_methods())")
    return {"decode_method": method, "decode_params": params or None}


def decode_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The decode keys of a run's recorded settings: none for the default (exact attention on decode steps, what runs
    made before decode methods existed did, so that they keep resuming), else ``decode_arguments(args)`` with the
    parameters resolved (the method's defaults filled in), so that a run made before a default changed is never
    resumed under the new one."""
    from ..validation import check_decode

    decode = decode_arguments(args)
    if decode == {"decode_method": "exact", "decode_params": None}:
        return {}
    if decode["decode_method"] is not None:
        decode["decode_params"] = check_decode(decode["decode_method"], decode["decode_params"])
    return decode
