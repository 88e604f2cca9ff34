"""What the measurement scripts under scripts/ share: the command line their report names, and results.json /
results.md written together (or results.md rebuilt from results.json, their ``--report-only``)."""

from __future__ import annotations

import json
import os
import shlex
import sys
from typing import Callable, Optional

from .store import write_json


def command_line(python: str = ".venv/bin/python") -> str:
    """The command that ran this process as a report names it: ``taskset -c CORES PYTHON ARGV...``."""
    cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    return f"taskset -c {cores} {python} " + " ".join(shlex.quote(a) for a in sys.argv)


def write_report(out: str, markdown: Callable[[dict], str], result: Optional[dict] = None) -> None:
    """Write OUT/results.json (``result``, atomically) and OUT/results.md (``markdown(result)``); without ``result``,
    rebuild results.md from the saved results.json."""
    if result is None:
        with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
            result = json.load(f)
    else:
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, "results.json"), result)
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown(result))


__all__ = ["command_line", "write_report"]
