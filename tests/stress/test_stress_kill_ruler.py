"""kill -9 in the middle of `hf-sparse-attn ruler`, then the same command again: nothing lost, nothing duplicated,
and the predictions equal those of a run that was never interrupted (tiny random Llama, one thread)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_checkpoint import save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.stress


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _command(model: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "hf_sparse_attn.cli", "ruler", "--model", model, "--tasks", "passkey,niah_single_1",
            "--lengths", "300", "--samples", "8", "--out", str(out), "--no-progress"]


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _records(out: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{task}.jsonl").read_text().splitlines() if line.strip()]


def test_ruler_killed_then_resumed_equals_a_clean_run(tmp_path):
    model = tmp_path / "model"
    save_tiny_checkpoint(model)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    assert subprocess.run(_command(str(model), clean), cwd=REPO, env=_env(), capture_output=True,
                          timeout=600).returncode == 0
    proc = subprocess.Popen(_command(str(model), killed), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and _lines(killed / "passkey.jsonl") < 3:
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _lines(killed / "passkey.jsonl")
    assert 3 <= before < 8
    again = subprocess.run(_command(str(model), killed), cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["meta"]["this_invocation"][0]["predicted"] == 16 - before  # finished samples not redone
    for task in ("passkey", "niah_single_1"):
        got, want = _records(killed, task), _records(clean, task)
        assert [r["id"] for r in got] == [r["id"] for r in want]  # each sample exactly once, in order
        assert [r["pred"] for r in got] == [r["pred"] for r in want]
    assert json.loads((killed / "result.json").read_text()) == json.loads((clean / "result.json").read_text())
