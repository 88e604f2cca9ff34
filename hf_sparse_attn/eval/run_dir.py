"""The output directory of a resumable run: the settings it was made with, and a lock while a process writes it.

Every resumable command (``longbench``, ``longbench-grid``, ``ruler``, ``bench model``, ``head-tail``) writes its
results into one directory and resumes from what is already there. A rerun that resumes must be the same run: a
directory records its settings in ``run_settings.json`` when it is first used, and a later run with other settings is
refused with the names of the settings that differ (``--overwrite`` discards the old results instead). While a run
writes, it holds an exclusive lock on ``.run.lock``; a second run on the same directory is refused, naming the process
that holds it. The lock is an ``flock``, released by the kernel when the holder dies, so a killed run never leaves a
stale lock behind.

    settings = {"model": ..., "model_fingerprint": ..., "method": ..., "params": ..., "seed": 0}
    with RunDir(args.out, settings, overwrite=args.overwrite, owned_files=["qasper.jsonl"]) as run:
        ...  # append results; run.path is the directory

Nothing in the directory that the run did not write is removed: ``overwrite`` deletes only the files named in
``owned_files`` or matching ``owned_patterns`` (regular expressions of file names, for files with variable names such
as shard parts) and the settings file, the ones the command itself writes.

``extendable`` names the settings a rerun may grow without starting afresh (dotted names into nested dicts): a list
that gains items, a dict that gains entries, every old item and entry kept as it was. ``ruler`` lets a rerun add tasks
and lengths to a directory this way (each task has its own results file; the results already there were made with the
same settings); the settings recorded become the grown ones, and ``RunDir.extended`` names what grew.

``record=False`` only checks: no lock, nothing written, a directory without settings accepted (``--report-only``
rebuilding the report of results made by an older version). ``lock_name`` gives concurrent writers of disjoint files
their own lock (the shards of ``bench model``). ``run_id`` is a short hash of the settings: it names the files one run
writes (shard parts), so that files of another run are never taken for its own.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from typing import Any, Iterable, Optional

try:
    import fcntl
except ImportError:  # not on Windows: no lock there
    fcntl = None

__all__ = ["RunDir", "RunSettingsError", "SETTINGS_FILE", "LOCK_FILE", "extends", "settings_diff", "settings_id",
           "path_fingerprint"]

SETTINGS_FILE = "run_settings.json"
LOCK_FILE = ".run.lock"


class RunSettingsError(ValueError):
    """The directory holds a run made with other settings, or another process is writing it."""


def _normalise(value: Any) -> Any:
    """JSON round trip, so that tuples and lists, int and float keys compare as they are stored."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def settings_diff(old: dict, new: dict, extendable: Iterable[str] = ()) -> list[str]:
    """The names of the settings whose values differ, each as ``name (old -> new)``, sorted by name; inside settings
    that are dicts on both sides, the entries that differ (``decode_params.token_budget (1024 -> 2048)``). A setting
    named in ``extendable`` differs only where ``new`` does not extend ``old`` (see ``extends``)."""
    return _diff(_normalise(old), _normalise(new), "", frozenset(extendable))


def extends(old: Any, new: Any) -> bool:
    """Whether ``new`` keeps every item of list ``old`` (in any order) or every entry of dict ``old`` (same value)."""
    if isinstance(old, list) and isinstance(new, list):
        return all(item in new for item in old)
    if isinstance(old, dict) and isinstance(new, dict):
        return all(key in new and new[key] == value for key, value in old.items())
    return False


def _diff(old: dict, new: dict, prefix: str, extendable: frozenset = frozenset()) -> list[str]:
    missing = object()
    out = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name, missing), new.get(name, missing)
        if a == b or (f"{prefix}{name}" in extendable and extends(a, b)):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            if f"{prefix}{name}" in extendable:  # entries it gains are no difference; name those that changed
                b = {key: value for key, value in b.items() if key in a}
            out += _diff(a, b, f"{prefix}{name}.", extendable)
            continue
        show = lambda v: "unset" if v is missing else json.dumps(v)[:60]  # noqa: E731
        out.append(f"{prefix}{name} ({show(a)} -> {show(b)})")
    return out


def settings_id(settings: dict) -> str:
    """A short stable hash of a settings dict (its JSON with sorted keys)."""
    return hashlib.sha1(json.dumps(_normalise(settings), sort_keys=True).encode()).hexdigest()[:10]


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".model", ".json", ".txt")


def path_fingerprint(name: str) -> dict:
    """What identifies a model given by path before it is loaded (cheap: no weights read): for a local directory the
    SHA-1 of its config.json and the names and sizes of its weight / tokenizer files; for anything else (a hub id,
    an alias such as ``smollm2``) the name alone."""
    if not name or not os.path.isdir(name):
        return {"name": name}
    digest = hashlib.sha1()
    config = os.path.join(name, "config.json")
    if os.path.isfile(config):
        with open(config, "rb") as f:
            digest.update(f.read())
    files = []
    for path in sorted(glob.glob(os.path.join(name, "*"))):
        if os.path.isfile(path) and path.endswith(_WEIGHT_SUFFIXES):
            files.append([os.path.basename(path), os.path.getsize(path)])
    digest.update(json.dumps(files).encode())
    return {"path": os.path.abspath(name), "files_sha1": digest.hexdigest()[:16]}


class RunDir:
    """An output directory bound to one set of settings (see the module docstring).

    ``settings``: a JSON-serialisable dict of everything that changes the results (model path and fingerprint,
    method, plan, parameters, seed, lengths, generation settings). ``overwrite``: delete ``owned_files`` and the
    settings of an earlier run with other settings, then start afresh. ``forbidden``: paths the directory must not be,
    or contain (the input data of the run), refused with a clear error. ``extendable``: the settings a rerun may grow
    (module docstring); after ``open``, ``extended`` lists what this run added, as ``settings_diff`` names it.
    """

    def __init__(self, path: str, settings: dict, *, overwrite: bool = False,
                 owned_files: Iterable[str] = (), forbidden: Iterable[str] = (), command: str = "this command",
                 owned_patterns: Iterable[str] = (), record: bool = True, lock_name: str = LOCK_FILE,
                 extendable: Iterable[str] = ()) -> None:
        self.path = path
        self.settings = _normalise(settings)
        self.overwrite = overwrite
        self.owned_files = list(owned_files)
        self.owned_patterns = [re.compile(p) for p in owned_patterns]
        self.command = command
        self.record = record
        self.lock_name = lock_name
        self.extendable = tuple(extendable)
        self.extended: list[str] = []
        out = os.path.realpath(path)
        for other in forbidden:
            if other is None:
                continue
            real = os.path.realpath(other)
            if out == real or real.startswith(out + os.sep) or out.startswith(real + os.sep):
                raise RunSettingsError(f"--out {path} is, holds or lies inside the input {other}; write results to another "
                                       "directory so the input is never modified")
        self._lock_fd: Optional[int] = None

    @property
    def run_id(self) -> str:
        """A short hash of the settings (the same for every rerun that resumes this run)."""
        return settings_id(self.settings)

    @property
    def settings_path(self) -> str:
        return os.path.join(self.path, SETTINGS_FILE)

    def _lock(self) -> None:
        if fcntl is None:
            return
        lock_path = os.path.join(self.path, self.lock_name)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "another process"
            finally:
                os.close(fd)
            raise RunSettingsError(f"{self.path} is being written by process {holder}; wait for it to finish, or use "
                                   "another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock; the file stays (removing it would race)
            self._lock_fd = None

    def open(self) -> "RunDir":
        """Create the directory, take the lock, check (or record) the settings. Raises RunSettingsError."""
        if not self.record:
            return self._check_only()
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RunSettingsError(f"--out {self.path} is a file, not a directory; give a directory for the results")
        os.makedirs(self.path, exist_ok=True)
        self._lock()
        try:
            if os.path.exists(self.settings_path):
                try:
                    with open(self.settings_path, encoding="utf-8") as f:
                        old = json.load(f)
                except (OSError, ValueError) as err:
                    raise RunSettingsError(f"{self.settings_path} is unreadable ({err}); use another --out, or "
                                           "--overwrite to start afresh") from None
                diff = settings_diff(old, self.settings, self.extendable)
                if diff and not self.overwrite:
                    raise RunSettingsError(
                        f"{self.path} holds results of {self.command} made with other settings: {'; '.join(diff)}. "
                        "Use another --out, or --overwrite to discard those results")
                if diff:
                    self.discard()
                else:
                    self.extended = settings_diff(old, self.settings)
            elif not self.overwrite and self._has_owned_results():
                raise RunSettingsError(
                    f"{self.path} holds results of {self.command} that record no settings (made by an older "
                    "version?); use another --out, or --overwrite to discard them")
            elif self.overwrite:
                self.discard()
            self._write_settings()
        except BaseException:
            self._unlock()
            raise
        return self

    def _check_only(self) -> "RunDir":
        if not os.path.exists(self.settings_path):
            return self
        try:
            with open(self.settings_path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError) as err:
            raise RunSettingsError(f"{self.settings_path} is unreadable ({err})") from None
        diff = settings_diff(old, self.settings)
        if diff:
            raise RunSettingsError(f"{self.path} holds results of {self.command} made with other settings: "
                                   f"{'; '.join(diff)}. Give the settings of that run")
        return self

    def owned_paths(self) -> list[str]:
        """The files of the directory this command writes (``owned_files`` that exist, then names matching
        ``owned_patterns``)."""
        paths = [os.path.join(self.path, n) for n in self.owned_files if os.path.isfile(os.path.join(self.path, n))]
        if self.owned_patterns and os.path.isdir(self.path):
            for name in sorted(os.listdir(self.path)):
                full = os.path.join(self.path, name)
                if full not in paths and os.path.isfile(full) and any(p.fullmatch(name) for p in self.owned_patterns):
                    paths.append(full)
        return paths

    def _has_owned_results(self) -> bool:
        return bool(self.owned_paths())

    def _write_settings(self) -> None:
        tmp = f"{self.settings_path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.settings, f, indent=1, sort_keys=True)
        os.replace(tmp, self.settings_path)

    def discard(self) -> None:
        """Delete the files this command writes (``owned_files``, ``owned_patterns``) and the recorded settings;
        nothing else."""
        for full in self.owned_paths() + [self.settings_path]:
            if os.path.isfile(full):
                os.remove(full)

    def close(self) -> None:
        self._unlock()

    def __enter__(self) -> "RunDir":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()
