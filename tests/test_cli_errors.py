"""Bad input to the LongBench and audit commands: a clear one-line error and exit status 2 before any model loads
(a traceback only with --debug); every task asked for in result.json; what head-tail and sparsity leave out of
their input counted in the JSON and the summary; a launch that would leave a process alone refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hf_sparse_attn.cli import main
from hf_sparse_attn.commands import longbench as longbench_cli
from longbench_tiny import cli_env, samples, tiny_bert, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model fails the test: errors must come before."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(longbench_cli, "load_model", refuse)


def _longbench(tmp_path, rows_by_task: dict, *extra: str) -> list[str]:
    data = tmp_path / "data"
    for task, rows in rows_by_task.items():
        write_jsonl(str(data / f"{task}.jsonl"), rows)
    return ["longbench", "--model", "no-such-model", "--data", str(data), "--out", str(tmp_path / "out"),
            "--tasks", ",".join(rows_by_task), *extra]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_sample_without_answers_is_refused_before_the_model_loads(tmp_path, capsys, no_model):
    rows = samples("hotpotqa", 4)
    del rows[2]["answers"]
    assert main(_longbench(tmp_path, {"hotpotqa": rows})) == 2
    err = _error_line(capsys)
    assert err.startswith("hf-sparse-attn longbench: error:")
    assert "'answers' missing or invalid in 1 of 4 samples (sample 3)" in err and "hotpotqa" in err
    with pytest.raises(ValueError, match="'answers'"):  # --debug: the exception itself, with its traceback
        main(_longbench(tmp_path, {"hotpotqa": rows}) + ["--debug"])


@pytest.mark.parametrize("case, expected", [
    ("empty", "task samsum has no samples"),
    ("unknown", "unknown task 'hotpot'"),
    ("no_context", "'context' missing or invalid in 2 of 2 samples"),
    ("trec_classes", "'all_classes' missing or invalid"),
    ("e_length", "'length' missing or invalid"),
])
def test_bad_longbench_input_is_a_clear_error(tmp_path, capsys, no_model, case, expected):
    extra: list[str] = []
    if case == "empty":
        args = _longbench(tmp_path, {"hotpotqa": samples("hotpotqa", 2), "samsum": []})
    elif case == "unknown":
        args = _longbench(tmp_path, {"hotpot": samples("hotpotqa", 2)})
    elif case == "no_context":
        args = _longbench(tmp_path, {"hotpotqa": [{k: v for k, v in r.items() if k != "context"}
                                                  for r in samples("hotpotqa", 2)]})
    elif case == "trec_classes":
        args = _longbench(tmp_path, {"trec": samples("trec", 2)})  # all_classes None
    else:
        rows = samples("hotpotqa", 2)
        rows[1]["length"] = "long"
        data = tmp_path / "data"
        write_jsonl(str(data / "hotpotqa_e.jsonl"), rows)
        args = ["longbench", "--model", "x", "--data", str(data), "--out", str(tmp_path / "o"), "--tasks",
                "hotpotqa", "--e"]
    assert main(args + extra) == 2
    assert expected in _error_line(capsys)


def test_bad_numbers_and_missing_data_are_clear_errors(tmp_path, capsys, no_model):
    assert main(["longbench", "--model", "x", "--out", str(tmp_path)]) == 2
    assert "--data is required" in _error_line(capsys)
    assert main(_longbench(tmp_path, {"hotpotqa": samples("hotpotqa", 2)}, "--max-samples", "0")) == 2
    assert "--max-samples must be >= 1" in _error_line(capsys)
    assert main(["longbench", "--model", "x", "--suite", "offline", "--tasks", "needle", "--out", str(tmp_path)]) == 2
    assert "unknown offline kind(s) needle" in _error_line(capsys)
    assert main(["longbench", "--model", "x", "--data", str(tmp_path / "nowhere.zip"), "--out", str(tmp_path / "o"),
                 "--tasks", "trec"]) == 2
    assert "nowhere.zip: no such file or directory" in _error_line(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["longbench", "--model", "x", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"),
                 "--tasks", "trec", "--plan", str(tmp_path / "nope.json")]) == 2
    assert "--plan" in _error_line(capsys)


def test_the_installed_command_exits_2_with_one_line(tmp_path):
    rows = samples("hotpotqa", 2)
    del rows[0]["answers"]
    write_jsonl(str(tmp_path / "data" / "hotpotqa.jsonl"), rows)
    proc = subprocess.run([sys.executable, "-m", "hf_sparse_attn.cli", "longbench", "--model", "no-such-model",
                           "--data", str(tmp_path / "data"), "--tasks", "hotpotqa", "--out", str(tmp_path / "o")],
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "'answers' missing or invalid in 1 of 2 samples" in proc.stderr


@pytest.mark.parametrize("env, expected", [
    ({"WORLD_SIZE": "2"}, "RANK, MASTER_ADDR, MASTER_PORT not set"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "WORLD_SIZE is not set, so each would predict every sample"),
])
def test_a_process_that_would_run_alone_refuses(tmp_path, capsys, no_model, monkeypatch, env, expected):
    for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(_longbench(tmp_path, {"hotpotqa": samples("hotpotqa", 2)})) == 2
    assert expected in _error_line(capsys)


# ------------------------------------------------------------------------------------------------ scoring
def test_every_task_asked_for_is_in_result_json_with_its_count(tmp_path, capsys):
    write_jsonl(str(tmp_path / "hotpotqa.jsonl"), [{"pred": "Paris", "answers": ["Paris"], "all_classes": None,
                                                   "length": 10, "_id": "h1"}])
    write_jsonl(str(tmp_path / "samsum.jsonl"), [])  # empty: a crashed run's first file, or an empty task
    assert main(["longbench-score", str(tmp_path), "--tasks", "hotpotqa,samsum,trec"]) == 0
    assert json.load(open(tmp_path / "result.json")) == {"hotpotqa": 100.0, "samsum": None, "trec": None}
    report = (tmp_path / "report.md").read_text()
    assert "| samsum | few-shot | rouge | – | 0 |" in report and "| hotpotqa | multi-doc QA | qa_f1 | 100.00 | 1 |" in report
    assert main(["longbench-score", str(tmp_path), "--e"]) == 0  # without --tasks: every file, empty ones too
    assert json.load(open(tmp_path / "result.json"))["samsum"] == {"0-4k": None, "4-8k": None, "8k+": None}
    assert main(["longbench-score", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in _error_line(capsys)


# ------------------------------------------------------------------------------------------------ audit CLIs
@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_bert"))
    tiny_bert(path, max_positions=64)
    return path


def _corpus(tmp_path) -> str:
    """6 lines: 2 empty, 1 of 3 characters, 1 of ~150 tokens (over the model's 64 positions), 2 ordinary."""
    lines = ["River city music history school north station paper light garden.", "", "Abc",
             " ".join(["winter army village market bridge"] * 30), "   ",
             "King queen island road summer valley mountain church."]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("command", ["head-tail", "sparsity"])
def test_audit_input_left_out_is_counted_in_json_and_summary(tmp_path, capsys, bert_dir, command):
    out = tmp_path / "out"
    extra = ["--min-prefix", "4", "--scaling-step", "16"] if command == "head-tail" else ["--k", "1", "4"]
    assert main([command, "--model", bert_dir, "--text", _corpus(tmp_path), "--out", str(out), "--min-chars", "5",
                 "--min-tokens", "2", "--threads", "1", *extra]) == 0
    result = json.load(open(out / ("head_tail.json" if command == "head-tail" else "sparsity.json")))
    assert result["input"] == {"texts_read": 6, "empty_lines_dropped": 2, "shorter_than_min_chars_dropped": 1,
                               "not_drawn": 0, "used": 3, "skipped_min_tokens": 0, "truncated_to_max_length": 1}
    summary = (out / "summary.txt").read_text()
    assert "input: 6 texts read, 3 used; left out: 2 empty, 1 shorter than --min-chars" in summary
    assert "1 cut to --max-length 64 tokens" in summary


@pytest.mark.parametrize("command", ["head-tail", "sparsity"])
def test_audit_bad_input_is_one_line_before_the_model_loads(tmp_path, capsys, command, monkeypatch):
    from hf_sparse_attn.commands import head_tail as head_tail_cli, sparsity as sparsity_cli

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(head_tail_cli, "load_model", refuse)
    monkeypatch.setattr(sparsity_cli, "load_model", refuse)
    assert main([command, "--model", "x", "--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.txt: no such text file" in _error_line(capsys)
    (tmp_path / "blank.txt").write_text("\n\n")
    assert main([command, "--model", "x", "--text", str(tmp_path / "blank.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "no text left" in _error_line(capsys)
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"text": "a b c"}\n{"body": "x"}\n')
    assert main([command, "--model", "x", "--corpus", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "line 2 has no field 'text'" in _error_line(capsys)
