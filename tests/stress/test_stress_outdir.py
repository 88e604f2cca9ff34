"""Two `longbench` runs on one --out at once, and a sharded run in a directory holding a user's files named like
shard parts (issue 32, items 2 and 4): the second writer is refused naming the first, the files end clean (each id
once, a rerun resumes), and nothing the run did not write is merged or deleted. Tiny random Llama, one thread."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hf_sparse_attn.eval.longbench.files import read_predictions
from hf_sparse_attn.eval.store import repair_tail
from longbench_tiny import cli_env, samples, tiny_llama, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.stress


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    tiny_llama(path)
    return path


def _longbench(model_dir: str, data: str, out: str, *extra: str, launcher: list[str] | None = None) -> subprocess.Popen:
    command = [*(launcher or [sys.executable, "-m"]), "hf_sparse_attn.cli", "longbench", "--model", model_dir,
               "--data", data, "--tasks", "hotpotqa", "--out", out, "--max-length", "300", "--max-new-tokens", "8",
               "--no-progress", *extra]
    return subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_a_second_run_on_the_same_out_is_refused_naming_the_first_and_the_files_stay_clean(model_dir, tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    rows = samples("hotpotqa", 400)
    write_jsonl(os.path.join(data, "hotpotqa.jsonl"), rows)
    first = _longbench(model_dir, data, out)
    pred_file = os.path.join(out, "hotpotqa.jsonl")
    deadline = time.time() + 180
    while time.time() < deadline and first.poll() is None:
        if os.path.exists(pred_file) and open(pred_file, "rb").read().count(b"\n") >= 1:
            break  # the first run holds the lock and writes
        time.sleep(0.01)
    assert first.poll() is None, "the first run ended before the second started:\n" + first.communicate()[1][-3000:]
    try:
        second = _longbench(model_dir, data, out)
        _, err = second.communicate(timeout=180)
        assert first.poll() is None, "the first run ended before the second was refused: no overlap was tested"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2, err[-3000:]
    assert f"being written by process {first.pid}" in err and err.strip().count("\n") == 0
    written = read_predictions(pred_file)
    ids = [r["_id"] for r in written]
    assert len(ids) == len(set(ids)) and ids == [r["_id"] for r in rows[: len(ids)]]  # each once, in order
    # the killed run's lock died with it: the same command resumes; a first sample predicted twice with the same
    # prediction (what two writers could append) is harmless
    repair_tail(pred_file)  # the line the kill cut, if any, so that the copy below is a line of its own
    with open(pred_file, "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(written[0], seconds=written[0]["seconds"] + 1.0)) + "\n")  # same prediction, other time
    resumed = _longbench(model_dir, data, out, "--max-samples", str(len(ids) + 2))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    result = json.load(open(os.path.join(out, "result.json")))
    assert set(result) == {"hotpotqa"}
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["samples"] == {"hotpotqa": len(ids) + 2}  # the copied line counted once
    assert summary["meta"]["this_invocation"]["predicted"] == 2


def test_a_sharded_run_never_takes_a_users_files_for_its_parts(model_dir, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    rows = samples("hotpotqa", 6)
    write_jsonl(str(data / "hotpotqa.jsonl"), rows)
    out.mkdir()
    users = {  # a user's files: named like a task's file variant, like the old shard parts, and unrelated
        "hotpotqa.methodA.jsonl": json.dumps({"pred": "A", "answers": ["x"], "_id": rows[0]["_id"]}) + "\n",
        "hotpotqa.part00-of-02.jsonl": json.dumps({"pred": "B", "answers": ["x"], "_id": rows[1]["_id"]}) + "\n",
        "notes.jsonl": '{"note": "mine"}\n',
    }
    for name, text in users.items():
        (out / name).write_text(text)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
    proc = _longbench(str(model_dir), str(data), str(out), launcher=launcher)
    log, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (log + err)[-4000:]
    for name, text in users.items():
        assert (out / name).read_text() == text, name  # untouched: neither merged nor deleted
    merged = read_predictions(str(out / "hotpotqa.jsonl"))
    assert [r["_id"] for r in merged] == [r["_id"] for r in rows]
    assert not {"A", "B"} & {r["pred"] for r in merged}
    assert {r["shard"] for r in merged} == {"00-of-02", "01-of-02"}
    assert not [name for name in os.listdir(out) if "hfsa-part" in name]  # the run's own parts merged and removed
    settings = json.load(open(out / "run_settings.json"))
    assert settings["command"] == "longbench"
