"""Crash-safe JSONL records: the one store of every resumable evaluation (model benchmark, LongBench predictions,
attention audits).

A record is one JSON object on one line. Writing it is a single ``os.write`` of the whole line to a file opened
with ``O_APPEND``, then ``fsync``: a kill loses at most the record being written (a torn last line), never an
earlier one, and processes appending to the same file never interleave their lines. Readers ignore a torn last
line (text after the last newline that is not valid JSON). A single writer calls :func:`repair_tail` (or opens a
:class:`JsonlStore`) before appending, which cuts a torn last line off so the file stays clean; where several
processes may share a file, :func:`append_record` alone is safe (it locks the file while it writes): if the file ends in a torn line it starts its
own line with a newline, so the torn text stays on a line of its own that lenient readers skip.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

try:
    import fcntl
except ImportError:  # not on Windows: one writer per file there
    fcntl = None

__all__ = ["append_record", "read_records", "repair_tail", "JsonlStore", "write_json"]


def write_json(path: str, obj: Any, *, indent: int = 1) -> None:
    """Replace the JSON file ``path`` with ``obj`` atomically: written to a temporary file of this process next to
    it, then renamed over it, so a kill leaves the old file or the new one, never half of one (results.json of the
    resumable benchmarks, rewritten after every cell)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent)
    os.replace(tmp, path)


def replace_records(path: str, records: Iterable[dict], *, merged_parts: Iterable[str] = ()) -> None:
    """Replace the JSONL file ``path`` with ``records`` atomically (written to a temporary file of this process next
    to it, synced, renamed over it), then delete ``merged_parts``, the files whose records it now holds. A kill in
    between leaves identical copies of records in the parts and in ``path``, which readers count once."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for part in merged_parts:
        os.remove(part)


def _line(record: dict, ensure_ascii: bool) -> bytes:
    return (json.dumps(record, ensure_ascii=ensure_ascii) + "\n").encode("utf-8")


def append_record(path: str, record: dict, *, ensure_ascii: bool = True) -> None:
    """Append ``record`` as one line: one ``write`` to ``path`` opened with ``O_APPEND`` (created if missing), then
    fsync. If the file ends in a torn line (no final newline), the write starts with a newline. The check and the
    write hold an exclusive ``flock`` (released by the kernel if the process dies), so a writer never mistakes
    another process's write in progress for a torn line."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        data = _line(record, ensure_ascii)
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: str, *, strict: bool = False) -> list[dict]:
    """Every record of ``path`` in file order; [] if the file does not exist. Blank lines and a torn last line
    (no final newline, not valid JSON) are ignored. Any other line that is not valid JSON is skipped, or with
    ``strict`` raises ValueError naming the line (a file edited by hand, or one a reader must trust in full)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")  # a file ending in "\n" gives a last element "", skipped as blank
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines) or not strict:  # the torn last line: the record in flight when killed
                continue
            raise ValueError(f"{path}: line {number} is corrupt ({err}); delete it and rerun the same command to redo "
                             "that record") from None
    return records


def repair_tail(path: str) -> None:
    """Cut a torn last line (a write interrupted by a kill), and any complete but undecodable lines at the end, so
    that appending starts on a line boundary. For a file with one writer; a missing file is left missing."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        keep = len(data)
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
        while keep > 0:
            start = data.rfind(b"\n", 0, keep - 1) + 1
            try:
                json.loads(data[start:keep])
                break
            except ValueError:
                keep = start
        if keep != len(data):
            f.truncate(keep)


class JsonlStore:
    """The records file of one writer: created (with its directory) if missing, its torn tail cut on open, each
    record appended by :func:`append_record`. Usable as a context manager (nothing to close: every append opens
    and closes the file)."""

    def __init__(self, path: str, *, ensure_ascii: bool = True) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        repair_tail(path)
        self.path = path
        self.ensure_ascii = ensure_ascii

    def append(self, record: dict) -> None:
        append_record(self.path, record, ensure_ascii=self.ensure_ascii)

    def read(self, *, strict: bool = False) -> list[dict]:
        return read_records(self.path, strict=strict)

    def close(self) -> None:
        """Nothing is held open; kept so a store can stand where a file object stood."""

    def __enter__(self) -> "JsonlStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
