"""`hf-sparse-attn ruler` on a tiny random Llama checkpoint (tests/tiny_checkpoint.py): the outputs, resume without
redoing samples, a rerun adding tasks and lengths, a rerun with other settings refused, the bad-input errors (exit
code 2, before any model loads), and a run sharded over two processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_sparse_attn.cli import main
from tiny_checkpoint import save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
TASKS = "niah_single_1,passkey"


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hf_sparse_attn.cli", "ruler", *args, "--no-progress"], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_ruler_model")
    save_tiny_checkpoint(path)  # 512 positions, word-level tokenizer without a chat template
    return str(path)


def _records(out: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{task}.jsonl").read_text().splitlines() if line.strip()]


def test_outputs_resume_and_refusal(model_dir, tmp_path):
    out = tmp_path / "run"
    base = ["--model", model_dir, "--tasks", TASKS, "--lengths", "300,500", "--samples", "3", "--out", str(out)]
    first = _run(*base)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert set(result) == {"niah_single_1", "passkey", "average"}
    assert set(result["passkey"]) == {"300", "500"} and all(0 <= v <= 100 for v in result["passkey"].values())
    assert result["average"] == {n: result["niah_single_1"][n] for n in ("300", "500")}  # passkey not averaged
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"]["passkey"] == {"300": 3, "500": 3}
    assert summary["chat_template"] is False and "Wikipedia" in summary["substitutions"][0]
    assert set(summary["depth"]) == {"niah_single_1", "passkey"}
    report = (out / "report.md").read_text()
    assert "Wikipedia" in report and "qa_1" in report and "Machine:" in report and "Command:" in report
    assert (out / "scores.png").stat().st_size > 0 and (out / "depth_heatmap.png").stat().st_size > 0
    records = _records(out, "passkey")
    assert [r["depth"] for r in records] == [0.0, 10.0, 20.0, 0.0, 10.0, 20.0]
    assert all(r["prompt_tokens"] + r["max_new_tokens"] <= r["length"] for r in records)

    # resume: lose the last two passkey records (and leave a torn line, as a kill mid-write does)
    path = out / "passkey.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]) + lines[-2][: len(lines[-2]) // 2])
    again = _run(*base)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["this_invocation"][0]["predicted"] == 2  # only the lost ones were redone
    resumed = path.read_text().splitlines(keepends=True)
    assert resumed[:-2] == lines[:-2] and len(resumed) == len(lines)
    assert [r["id"] for r in _records(out, "passkey")] == [r["id"] for r in records]
    assert [r["pred"] for r in _records(out, "passkey")] == [r["pred"] for r in records]  # same as uninterrupted

    # a rerun that adds a task and a length predicts only those; what was there is kept as it was
    grown = ["--model", model_dir, "--tasks", "niah_single_2," + TASKS, "--lengths", "300,400,500", "--samples", "3", "--out",
             str(out)]
    more = _run(*grown)
    assert more.returncode == 0, more.stderr[-3000:]
    assert "adding to the run" in more.stderr and "tasks" in more.stderr and "lengths" in more.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["this_invocation"][0]["predicted"] == 3 * 3 + 2 * 3  # the new task at 3 lengths, 2 at 400
    assert path.read_text().splitlines(keepends=True)[:len(resumed)] == resumed
    result = json.loads((out / "result.json").read_text())
    assert set(result) == {"niah_single_2", "niah_single_1", "passkey", "average"} and set(result["niah_single_2"]) == {"300", "400", "500"}
    assert json.loads((out / "run_settings.json").read_text())["tasks"] == ["niah_single_2", "niah_single_1", "passkey"]
    resumed = path.read_text().splitlines(keepends=True)
    # a rerun that leaves a task out is another run: refused (its report would drop that task)
    fewer = _run("--model", model_dir, "--tasks", "passkey", "--lengths", "300,400,500", "--samples", "3", "--out",
                 str(out))
    assert fewer.returncode == 2 and "other settings" in fewer.stderr and "tasks (" in fewer.stderr

    # other settings: refused, naming what differs; nothing touched
    other = _run(*[a if a != "3" else "4" for a in grown[:-2]], "--seed", "1", "--out", str(out))
    assert other.returncode == 2
    assert "other settings" in other.stderr and "samples (3 -> 4)" in other.stderr and "seed (0 -> 1)" in other.stderr
    assert path.read_text().splitlines(keepends=True) == resumed

    # --overwrite discards the earlier results, and only the files the command wrote
    (out / "notes.txt").write_text("mine")
    (out / "vt_notes.jsonl").write_text("{}\n")
    done = _run("--model", model_dir, "--tasks", "passkey", "--lengths", "300", "--samples", "2", "--out", str(out),
                "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "notes.txt").read_text() == "mine" and (out / "vt_notes.jsonl").exists()
    assert not (out / "niah_single_1.jsonl").exists() and len(_records(out, "passkey")) == 2


def _main_error(capsys, *args: str) -> str:
    assert main(["ruler", *args]) == 2
    return capsys.readouterr().err


def test_bad_input_errors_before_loading_the_model(model_dir, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "never")
    err = _main_error(capsys, "--model", model_dir, "--tasks", "niah_single_1,qa_1", "--out", out)
    assert "unknown task(s) qa_1" in err and "niah_multikey_3" in err and "passkey" in err
    err = _main_error(capsys, "--model", model_dir, "--tasks", "niah_single_1", "--lengths", "40", "--out", out)
    assert "niah_single_1 at [40] needs at least" in err
    err = _main_error(capsys, "--model", model_dir, "--tasks", "passkey", "--lengths", "1024", "--out", out)
    assert "exceed the 512 positions" in err and "--rope-scaling" in err
    err = _main_error(capsys, "--model", model_dir, "--lengths", "4k", "--out", out)
    assert "--lengths" in err
    err = _main_error(capsys, "--model", model_dir, "--method", "no_such_method", "--tasks", "passkey", "--out", out)
    assert "unknown method" in err
    monkeypatch.setitem(sys.modules, "wonderwords", None)
    from hf_sparse_attn.eval.ruler import tasks as T

    T._wonderwords_list.cache_clear()
    try:
        err = _main_error(capsys, "--model", model_dir, "--tasks", "niah_single_1", "--out", out)
        assert 'pip install "hf_sparse_attn[ruler]"' in err
    finally:
        T._wonderwords_list.cache_clear()
    assert not os.path.exists(out)  # nothing written by a refused run


def test_patched_run_beyond_the_positions_with_rope_scaling(model_dir, tmp_path):
    out = tmp_path / "patched"
    done = _run("--model", model_dir, "--tasks", "passkey", "--lengths", "700", "--samples", "1", "--method", "local",
                "--layers", "all", "--rope-scaling", "yarn", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    record = _records(out, "passkey")[0]
    assert 512 < record["prompt_tokens"] + record["max_new_tokens"] <= 700
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["rope"]["700"]["rope_type"] == "yarn"
    counts = summary["plan_counts_this_invocation"]
    assert counts["patched_layers"] == [0, 1, 2]
    assert counts["served"] + sum(counts["fallbacks"].values()) == counts["prefill_calls"] == 3
    assert counts["decode_served"] > 0 and counts["decode_steps_exact"] == 0 and (out / "plan.json").exists()
    loud = "SERVED" in done.stderr and "SERVED" in (out / "report.md").read_text()
    assert loud == (counts["served"] < 2)  # a plan serving fewer than half its prefill calls is said loudly


def test_decode_methods_from_the_command_line_are_served_and_part_of_the_settings(model_dir, tmp_path):
    """--decode-method lsh runs generate() with a GrowingCache (its index lives there): every decode step served; a
    rerun with another decode method (the default exact one included) into the same directory is refused rather
    than mixed."""
    out = tmp_path / "lsh"
    common = ("--model", model_dir, "--tasks", "passkey", "--lengths", "400", "--samples", "1", "--method", "exact",
              "--layers", "all", "--out", str(out))
    done = _run(*common, "--decode-method", "lsh", "--decode-param", "window=16", "--decode-param", "block_size=8",
                "--decode-param", "sample_size=8")
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads((out / "summary.json").read_text())["plan_counts_this_invocation"]
    assert counts["decode_served"] > 0 and counts["decode_steps_exact"] == 0, counts
    plan = json.loads((out / "plan.json").read_text())
    assert {layer["decode_method"] for layer in plan["layers"]} == {"lsh"}
    assert plan["layers"][0]["decode_params"]["window"] == 16
    again = _run(*common, "--decode-method", "local")
    assert again.returncode != 0 and "decode_method" in again.stderr
    exact = _run(*common)  # the default decode records no decode keys (runs made before decode methods resume)...
    assert exact.returncode != 0 and "decode_method" in exact.stderr  # ...and still differs from lsh's settings
    bad = _run(*common[:-1], str(tmp_path / "bad"), "--decode-method", "nope")
    assert bad.returncode != 0 and "decode-capable methods: exact, local, lsh, quest" in bad.stderr


def test_other_layers_from_the_command_line_make_a_mixed_plan_recorded_in_the_settings(model_dir, tmp_path):
    """--param 'other_layers={...}' patches the layers --layers does not choose with the other method; a rerun with
    another other-layers method is refused, naming what differs."""
    out = tmp_path / "mixed"
    common = ("--model", model_dir, "--tasks", "passkey", "--lengths", "400", "--samples", "1", "--method", "exact",
              "--layers", "1", "--out", str(out))
    done = _run(*common, "--param", 'other_layers={method = "local", window = 16, min_seq_len = 1}')
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"] is None
    assert sorted(layer["method"] for layer in plan["layers"]) == ["exact", "local", "local"]
    assert {layer["params"]["window"] for layer in plan["layers"] if layer["method"] == "local"} == {16}
    counts = json.loads((out / "summary.json").read_text())["plan_counts_this_invocation"]
    assert counts["patched_layers"] == [0, 1, 2] and counts["served"] == 3
    again = _run(*common, "--param", 'other_layers={method = "local", window = 32, min_seq_len = 1}')
    assert again.returncode != 0 and "other_layers" in again.stderr


def test_a_prompt_fed_in_chunks_is_served_by_the_prefill_method_and_recorded(model_dir, tmp_path):
    """--prefill-chunk-size 100: each chunk of the prompt is a call the prefill method (local) serves, so the plan
    serves more calls than one prefill per layer; the chunk size is part of the settings (a rerun without it is
    refused, naming it)."""
    out = tmp_path / "chunked"
    common = ("--model", model_dir, "--tasks", "passkey", "--lengths", "400", "--samples", "1", "--method", "local",
              "--layers", "all", "--param", "window=16", "--param", "min_seq_len=1", "--out", str(out))
    done = _run(*common, "--prefill-chunk-size", "100")
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads((out / "summary.json").read_text())["plan_counts_this_invocation"]
    prompt = _records(out, "passkey")[0]["prompt_tokens"]
    assert prompt > 300 and counts["served"] == 3 * -(-prompt // 100), (counts, prompt)
    assert json.loads((out / "run_settings.json").read_text())["generation"]["prefill_chunk_size"] == 100
    again = _run(*common)
    assert again.returncode != 0 and "prefill_chunk_size" in again.stderr
    bad = _run(*common[:-1], str(tmp_path / "bad"), "--prefill-chunk-size", "0")
    assert bad.returncode != 0 and "--prefill-chunk-size must be >= 1" in bad.stderr


def test_two_processes_predict_each_sample_once_and_equal_one_process(model_dir, tmp_path):
    """Sharded over two processes (``python -m torch.distributed.run``, gloo on CPU): each sample predicted once, by
    one of the two shards, the merged files in the order of one process's, the same predictions and scores."""
    args = ["--model", model_dir, "--tasks", TASKS, "--lengths", "300", "--samples", "3", "--no-progress"]
    single = _run(*args[:-1], "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-3000:]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "hf_sparse_attn.cli", "ruler", *args, "--out", str(tmp_path / "two")]
    sharded = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    for task in TASKS.split(","):
        one, two = _records(tmp_path / "one", task), _records(tmp_path / "two", task)
        assert [r["id"] for r in two] == [r["id"] for r in one]  # each sample once, in one process's order
        assert [r["pred"] for r in two] == [r["pred"] for r in one]
        assert {r["shard"] for r in two} == {"00-of-02", "01-of-02"}
    assert (json.loads((tmp_path / "two" / "result.json").read_text())
            == json.loads((tmp_path / "one" / "result.json").read_text()))
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["meta"]["num_processes"] == 2
    assert not [name for name in os.listdir(tmp_path / "two") if "part" in name]  # the parts merged and removed
