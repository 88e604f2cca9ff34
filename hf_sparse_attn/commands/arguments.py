"""Values written on the command line: ``NAME=VALUE`` parameters and ``METHOD.NAME=VALUE`` method parameters, parsed
the same way by every command (``bench --method-param``, ``longbench --param``, ``longbench-grid --set``)."""

from __future__ import annotations

from typing import Any, Iterable, Optional

import tomllib


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
