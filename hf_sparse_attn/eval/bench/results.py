"""The benchmark's results file: JSON lines (kinds "run", "article", "cell", "baseline_rerun", "profile") in the
crash-safe store :mod:`hf_sparse_attn.eval.store`, and the queries a resume and a report make of them."""

from __future__ import annotations

import glob
import os
import re
from typing import Callable, Iterable, Optional, Sequence

from ..store import append_record, read_records


def read_jsonl(path: str) -> list[dict]:
    """Every complete JSON line of ``path`` (a line cut by a crash is ignored); [] if the file does not exist."""
    return read_records(path)


def append_jsonl(path: str, record: dict) -> None:
    """Append one record as one line, in a single ``write`` to a file opened with ``O_APPEND``, then fsync
    (:func:`hf_sparse_attn.eval.store.append_record`): two bench processes (one per core, different cells) can
    share one results file without interleaving their lines."""
    append_record(path, record)


def finished_keys(records: Iterable[dict], titles_for: Optional[Callable[[int], Sequence[str]]] = None) -> set[str]:
    """Keys of the finished cells. With ``titles_for`` (N -> the requested article titles), only the cells whose
    latest record covers every requested article of its N count as finished."""
    cells = latest_cells(records)
    if titles_for is None:
        return set(cells)
    return {k for k, c in cells.items()
            if set(titles_for(c["tokens"])) <= {a["title"] for a in c.get("per_article", [])}}


def latest_cells(records: Iterable[dict]) -> dict[str, dict]:
    """key -> the last finished record of each cell."""
    out: dict[str, dict] = {}
    for r in records:
        if r.get("kind") == "cell":
            out[r["key"]] = r
    return out


def latest_profiles(records: Iterable[dict]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in records:
        if r.get("kind") == "profile":
            out[int(r["tokens"])] = r
    return out



RESULTS_FILE = "results.jsonl"
_SHARD_FILE = re.compile(r"results\.shard-\d+-of-\d+\.jsonl")


def shard_results_file(index: int, count: int) -> str:
    """Name of the results file shard ``index`` of ``count`` appends to (in the out dir, beside results.jsonl)."""
    return f"results.shard-{index}-of-{count}.jsonl"


def results_files(out_dir: str) -> list[str]:
    """Every results file of ``out_dir``: results.jsonl first (if present), then the shards' files, sorted."""
    main = os.path.join(out_dir, RESULTS_FILE)
    shards = sorted(p for p in glob.glob(os.path.join(out_dir, "results.shard-*-of-*.jsonl"))
                    if _SHARD_FILE.fullmatch(os.path.basename(p)))  # a user's results.shard-x-of-y.jsonl is not ours
    return ([main] if os.path.exists(main) else []) + shards


def read_results(out_dir: str) -> list[dict]:
    """The records of every results file of ``out_dir`` (:func:`results_files`), file after file."""
    return [r for path in results_files(out_dir) for r in read_jsonl(path)]
