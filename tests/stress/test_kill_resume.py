"""kill -9 in the middle of `longbench` and `head-tail`, then the same command again: nothing lost, nothing
duplicated, and the results equal those of a run that was never interrupted (tiny random models, one thread)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from hf_sparse_attn.cli import main
from longbench_tiny import cli_env, samples, sentence, tiny_bert, tiny_llama, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.stress


@pytest.fixture
def one_thread():
    """Run in-process commands with one torch thread, as the killed subprocesses do (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _lines(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:
        return f.read().count(b"\n")


def _kill_when(args: list[str], path: str, lines: int) -> int:
    """Start `hf-sparse-attn ARGS`, SIGKILL it once ``path`` has ``lines`` lines; the lines it had when killed."""
    proc = subprocess.Popen([sys.executable, "-m", "hf_sparse_attn.cli", *args], cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and _lines(path) < lines:
        time.sleep(0.002)
    assert proc.poll() is None, "the run ended before it could be killed:\n" + proc.communicate()[0][-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return _lines(path)


def test_longbench_killed_twice_then_resumed_equals_a_clean_run(tmp_path, one_thread):
    model_dir = str(tmp_path / "model")
    tiny_llama(model_dir)
    data = str(tmp_path / "data")
    rows = {"hotpotqa": samples("hotpotqa", 20), "samsum": samples("samsum", 4, seed=5)}
    for task, task_rows in rows.items():
        write_jsonl(os.path.join(data, f"{task}.jsonl"), task_rows)

    def args(out: str) -> list[str]:
        return ["longbench", "--model", model_dir, "--data", data, "--tasks", "hotpotqa,samsum", "--out", out,
                "--method", "exact", "--layers", "1", "--max-length", "300", "--max-new-tokens", "6", "--no-progress"]

    clean, resumed = str(tmp_path / "clean"), str(tmp_path / "resumed")
    assert main(args(clean)) == 0
    first = os.path.join(resumed, "hotpotqa.jsonl")
    at_first_kill = _kill_when(args(resumed), first, 2)
    at_second_kill = _kill_when(args(resumed), first, at_first_kill + 3)  # the rerun resumes, and is killed again
    assert 2 <= at_first_kill < at_second_kill < len(rows["hotpotqa"])
    assert main(args(resumed)) == 0
    summary = json.load(open(os.path.join(resumed, "summary.json")))
    assert summary["meta"]["this_invocation"]["skipped_done"] == at_second_kill  # nothing finished was redone
    for task, task_rows in rows.items():
        got = [json.loads(line) for line in open(os.path.join(resumed, f"{task}.jsonl"), encoding="utf-8")]
        want = [json.loads(line) for line in open(os.path.join(clean, f"{task}.jsonl"), encoding="utf-8")]
        assert [r["_id"] for r in got] == [r["_id"] for r in task_rows]  # nothing lost, nothing twice, in order
        assert [r["pred"] for r in got] == [r["pred"] for r in want]
    assert json.load(open(os.path.join(resumed, "result.json"))) == json.load(open(os.path.join(clean, "result.json")))


def test_head_tail_killed_then_resumed_equals_a_clean_run(tmp_path, one_thread):
    model_dir = str(tmp_path / "bert")
    tiny_bert(model_dir, max_positions=128)
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(sentence(rng, rng.randint(6, 14)) for _ in range(rng.randint(1, 4)))
                                for _ in range(120)) + "\n")

    def args(out: str) -> list[str]:
        return ["head-tail", "--model", model_dir, "--text", str(corpus), "--out", out, "--min-prefix", "8",
                "--prefix-step", "4", "--scaling-step", "16", "--batch-size", "4", "--threads", "1"]

    clean, resumed = str(tmp_path / "clean"), str(tmp_path / "resumed")
    assert main(args(clean)) == 0
    records = os.path.join(resumed, "state", "sequences.jsonl")
    killed_at = _kill_when(args(resumed), records, 12)
    assert 12 <= killed_at < 120
    assert main(args(resumed)) == 0
    indices = [json.loads(line)["index"] for line in open(records)]
    assert sorted(indices) == list(range(120))  # every sequence once
    got, want = json.load(open(os.path.join(resumed, "head_tail.json"))), json.load(open(os.path.join(clean, "head_tail.json")))
    provenance = {"date", "machine", "command"}
    assert {k: v for k, v in got.items() if k not in provenance} == {k: v for k, v in want.items() if k not in provenance}
