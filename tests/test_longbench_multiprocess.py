"""`hf-sparse-attn longbench` over two real processes: ``python -m torch.distributed.run --nproc_per_node 2`` (the
torchrun launcher) with the gloo backend on CPU, a tiny random Llama saved to disk and a small LongBench-format
fixture. Each sample is predicted exactly once across the shards, the merged result equals a single-process run's,
and a run with one process killed by SIGKILL completes when relaunched with another process count, redoing nothing
that was finished."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from hf_sparse_attn.eval.longbench.predict import read_predictions
from longbench_tiny import cli_env, samples, tiny_llama, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = {"hotpotqa": 20, "samsum": 6}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model_dir, data_dir, samples by task, the single-process reference run's directory)."""
    root = tmp_path_factory.mktemp("multiprocess")
    model_dir, data_dir = str(root / "model"), str(root / "data")
    tiny_llama(model_dir)
    by_task = {task: samples(task, n, seed=i) for i, (task, n) in enumerate(TASKS.items())}
    for task, rows in by_task.items():
        write_jsonl(os.path.join(data_dir, f"{task}.jsonl"), rows)
    reference = str(root / "single")
    from hf_sparse_attn.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes (OMP_NUM_THREADS=1)
    try:
        assert main(["longbench", *_args(model_dir, data_dir, reference)]) == 0
    finally:
        torch.set_num_threads(threads)
    return model_dir, data_dir, by_task, reference


def _args(model_dir: str, data_dir: str, out: str) -> list[str]:
    return ["--model", model_dir, "--data", data_dir, "--tasks", ",".join(TASKS), "--out", out, "--method", "exact",
            "--layers", "1", "--max-length", "300", "--max-new-tokens", "8", "--no-progress"]


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "hf_sparse_attn.cli", "longbench", *args]
    return subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _predictions(out: str, task: str) -> dict:
    return {r["_id"]: r for r in read_predictions(os.path.join(out, f"{task}.jsonl"))}


def _assert_complete_and_equal(out: str, by_task: dict, reference: str) -> None:
    for task, rows in by_task.items():
        with open(os.path.join(out, f"{task}.jsonl"), encoding="utf-8") as f:
            ids = [json.loads(line)["_id"] for line in f]
        assert ids == [r["_id"] for r in rows], task  # every sample once, in dataset order
        merged, single = _predictions(out, task), _predictions(reference, task)
        assert {i: r["pred"] for i, r in merged.items()} == {i: r["pred"] for i, r in single.items()}, task
    assert not [name for name in os.listdir(out) if "hfsa-part" in name]  # parts merged and removed
    with open(os.path.join(out, "result.json")) as f, open(os.path.join(reference, "result.json")) as g:
        assert json.load(f) == json.load(g)


def test_two_processes_predict_each_sample_once_and_equal_one_process(setup, tmp_path):
    model_dir, data_dir, by_task, reference = setup
    out = str(tmp_path / "out")
    proc = _torchrun(_args(model_dir, data_dir, out))
    log = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, log[-4000:]
    _assert_complete_and_equal(out, by_task, reference)
    shards = {}
    for task in by_task:
        for record in _predictions(out, task).values():
            shards.setdefault(record["shard"], []).append(record["_id"])
    assert sorted(shards) == ["00-of-02", "01-of-02"]
    assert abs(len(shards["00-of-02"]) - len(shards["01-of-02"])) <= 1  # dealt out one by one
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["meta"]["num_processes"] == 2
    assert summary["samples"] == TASKS
    per_process = summary["meta"]["this_invocation"]["per_process"]
    assert [c["predicted"] for c in per_process] == [len(shards["00-of-02"]), len(shards["01-of-02"])]


def _worker_of_rank(launcher: subprocess.Popen, rank: int) -> psutil.Process | None:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "hf_sparse_attn.cli" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def test_one_process_killed_then_relaunched_with_three_completes_without_duplicates(setup, tmp_path):
    model_dir, data_dir, by_task, reference = setup
    out = str(tmp_path / "out")
    proc = _torchrun(_args(model_dir, data_dir, out))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        parts = glob.glob(os.path.join(out, "hotpotqa.hfsa-part01-of-02.*.jsonl"))  # named with the run's id
        if parts and open(parts[0], "rb").read().count(b"\n") >= 2:
            break
        time.sleep(0.005)
    worker = _worker_of_rank(proc, 1)
    assert proc.poll() is None and worker is not None, "the run ended before a process could be killed"
    os.kill(worker.pid, signal.SIGKILL)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0, "the launcher reported success although a process was killed:\n" + log[-3000:]
    done_before = sum(len(read_predictions(os.path.join(out, name))) for name in os.listdir(out)
                      if name.endswith(".jsonl"))
    assert 2 <= done_before < sum(TASKS.values())

    proc = _torchrun(_args(model_dir, data_dir, out), nproc=3)
    log = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, log[-4000:]
    _assert_complete_and_equal(out, by_task, reference)
    summary = json.load(open(os.path.join(out, "summary.json")))
    per_process = summary["meta"]["this_invocation"]["per_process"]
    # the relaunch predicted exactly the missing samples, dealt out over 3: nothing finished was redone
    assert len(per_process) == 3 and all(c["predicted"] >= 1 for c in per_process)
    assert sum(c["predicted"] for c in per_process) == sum(TASKS.values()) - done_before
    assert all(c["skipped_done"] == done_before for c in per_process)
    shards = {r["shard"] for task in by_task for r in _predictions(out, task).values()}
    assert {"00-of-02", "00-of-03", "01-of-03", "02-of-03"} <= shards


_LEAVE = """
import json, os, sys, time
from hf_sparse_attn.eval.longbench.distributed import start_processes
processes = start_processes()
if processes.rank == 0:
    time.sleep(2.0)  # process 0 still works (merges the shards) while process 1 is done
began = time.time()
processes.close(finished=sys.argv[1] == "finished")
with open(os.path.join(sys.argv[2], f"rank{processes.rank}.json"), "w") as f:  # a file each: no interleaved prints
    json.dump({"began": began, "left": time.time()}, f)
if sys.argv[1] != "finished":
    time.sleep(3.0)  # outlive process 0's write: an exit that aborts here must not stop it before it writes
"""


@pytest.mark.parametrize("finished", [True, False])
def test_processes_leave_the_group_together_only_after_a_finished_run(finished, tmp_path):
    """A process done before the others waits for them in close() and they leave the group together (one that
    left alone while another still used the group could abort at exit, failing a finished run); after an error it
    neither waits nor leaves."""
    script = tmp_path / "leave.py"
    script.write_text(_LEAVE)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
               "finished" if finished else "failed", str(tmp_path)]
    proc = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    if finished:  # (after an error the real command exits with it; this script's exit code says nothing then)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    written = {rank: tmp_path / f"rank{rank}.json" for rank in (0, 1)}
    assert all(path.exists() for path in written.values()), (proc.stdout + proc.stderr)[-3000:]
    times = {rank: json.loads(path.read_text()) for rank, path in written.items()}
    if finished:
        assert times[1]["left"] >= times[0]["began"]  # process 1 waited for process 0
    else:
        assert times[1]["left"] < times[0]["began"]  # process 1 did not wait
