"""Issue 32, items 1-5, 13 and 16 (the evaluation tools' data and labels): run directories record their settings and
refuse other ones, never consume a user's files, never write into the data, take one writer at a time, refuse bad
input with one line, say when a method served nothing, and name what they miss.

The CLI cases run the real command (``hf_sparse_attn.cli.main``, what the ``hf-sparse-attn`` script calls) in a
subprocess; several commands of one case share one interpreter (:func:`_cli`) to keep the file fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hf_sparse_attn.eval.longbench.files import merge_shards, part_file_name, task_prediction_files
from hf_sparse_attn.eval.longbench.score import score_directory
from longbench_tiny import cli_env, samples, tiny_llama, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_BATCH = r"""
import contextlib, io, json, sys
from hf_sparse_attn.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 2
        except Exception as exc:
            rc, err = "traceback", io.StringIO(f"{type(exc).__name__}: {exc}")
    results.append({"rc": rc, "stderr": err.getvalue(), "stdout": out.getvalue()})
print("RESULTS" + json.dumps(results))
"""


def _cli(*commands: list[str], cwd: str = REPO) -> list[dict]:
    """Run ``hf-sparse-attn`` commands one after the other in one fresh interpreter: [{rc, stderr, stdout}]."""
    proc = subprocess.run([sys.executable, "-c", _BATCH, json.dumps([list(map(str, c)) for c in commands])],
                          cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(line[len("RESULTS"):])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    tiny_llama(path)
    return path


def _longbench(model_dir, data, out, *extra):
    return ["longbench", "--model", model_dir, "--data", data, "--tasks", "hotpotqa", "--out", out,
            "--max-new-tokens", "2", "--max-length", "200", "--no-progress", *extra]


# ---------------------------------------------------------------------------------------------------- items 1, 2, 13
def test_longbench_refuses_other_settings_keeps_user_files_and_says_what_served_nothing(model_dir, tmp_path):
    data, out = str(tmp_path / "data"), tmp_path / "out"
    write_jsonl(os.path.join(data, "hotpotqa.jsonl"), samples("hotpotqa", 3))
    out.mkdir()
    mine = {"pred": "mine", "answers": ["x"], "_id": "hotpotqa-000"}
    (out / "hotpotqa.methodA.jsonl").write_text(json.dumps(mine) + "\n")  # a user's file, named like a task's
    local = ["--method", "local", "--layers", "all", "--param", "window=8"]
    first, refused, overwritten = _cli(_longbench(model_dir, data, out),
                                       _longbench(model_dir, data, out, *local),
                                       _longbench(model_dir, data, out, *local, "--overwrite"))
    assert first["rc"] == 0, first["stderr"][-2000:]
    assert refused["rc"] == 2 and "other settings" in refused["stderr"], refused
    assert 'method ("none" -> "local")' in refused["stderr"] and "params" in refused["stderr"]
    assert refused["stderr"].count("\n") == 1  # one line
    assert overwritten["rc"] == 0, overwritten["stderr"][-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["meta"]["method"] == "local" and summary["samples"] == {"hotpotqa": 3}
    # the user's file was neither merged nor deleted, by the runs or by --overwrite
    assert json.loads((out / "hotpotqa.methodA.jsonl").read_text()) == mine
    preds = [json.loads(x) for x in (out / "hotpotqa.jsonl").read_text().splitlines()]
    assert [p["_id"] for p in preds] == [f"hotpotqa-{i:03d}" for i in range(3)] and "mine" not in [p["pred"] for p in preds]
    # item 13: every prefill of the 3 samples fell back (prompts < min_seq_len): said on the console, in report.md,
    # and the final plan.json holds the counts (it used to keep served 0 and no fallbacks from the start)
    assert "warning" in overwritten["stderr"] and "served none of the 6 prefill" in overwritten["stderr"]
    assert "min_seq_len" in overwritten["stderr"]
    assert "served none" in (out / "report.md").read_text()
    plan = json.loads((out / "plan.json").read_text())
    layers = [layer for layer in plan["layers"] if layer["method"]]
    assert sum(layer["served"] for layer in layers) == 0
    assert sum(n for layer in layers for r, n in layer["fallbacks"].items() if "min_seq_len" in r) == 6
    # an unpatched rerun (the first settings) is refused now: the directory is local's
    settings = json.loads((out / "run_settings.json").read_text())
    assert settings["method"] == "local" and settings["params"] == {"window": 8}


def test_shard_parts_have_a_name_no_user_picks_and_only_the_runs_own_are_merged(tmp_path):
    rec = {"pred": "a", "answers": ["a"], "all_classes": None, "length": 1}
    write_jsonl(str(tmp_path / "qasper.methodA.jsonl"), [dict(rec, _id="q1", pred="user")])
    write_jsonl(str(tmp_path / "notes.jsonl"), [{"note": 1}])
    write_jsonl(str(tmp_path / part_file_name("qasper", 0, 2, "run1")), [dict(rec, _id="q1")])
    write_jsonl(str(tmp_path / part_file_name("qasper", 1, 2, "other")), [dict(rec, _id="q2")])
    files = task_prediction_files(str(tmp_path), run_id="run1")
    assert list(files) == ["qasper"] and [os.path.basename(p) for p in files["qasper"]] == [
        "qasper.hfsa-part00-of-02.run1.jsonl"]
    merge_shards(str(tmp_path), "qasper", run_id="run1")
    assert sorted(os.listdir(tmp_path)) == ["notes.jsonl", "qasper.hfsa-part01-of-02.other.jsonl", "qasper.jsonl",
                                            "qasper.methodA.jsonl"]
    assert [json.loads(x)["pred"] for x in (tmp_path / "qasper.methodA.jsonl").read_text().splitlines()] == ["user"]


# ---------------------------------------------------------------------------------------------------- items 3, 4, 5, 16
def test_out_holding_the_data_a_held_lock_and_bad_input_each_give_one_line(model_dir, tmp_path):
    data = tmp_path / "data"
    write_jsonl(str(data / "hotpotqa.jsonl"), samples("hotpotqa", 2))
    before = (data / "hotpotqa.jsonl").read_bytes()

    def bad(name: str, lines: list[str], task: str = "hotpotqa") -> str:
        folder = tmp_path / name
        folder.mkdir()
        (folder / f"{task}.jsonl").write_text("\n".join(lines) + "\n")
        return str(folder)

    row = samples("hotpotqa", 1)[0]
    dup = bad("dup", [json.dumps(dict(row, _id=i)) for i in ("x", "x", "x-1")])
    listid = bad("listid", [json.dumps(dict(row, _id=[1]))])
    toplist = bad("toplist", [json.dumps([row])])
    surrogate = bad("surrogate", [json.dumps(row)[:-1] + ', "extra": "\\ud800"}'])
    classes = bad("classes", [json.dumps(dict(row, all_classes=[1, 2]))], task="trec")
    nan = bad("nan", [json.dumps(row).replace(f'"length": {row["length"]}', '"length": NaN')], task="hotpotqa_e")
    scores = tmp_path / "scores"
    write_jsonl(str(scores / "hotpotqa.jsonl"), [{"answers": ["a"], "_id": "1"}])
    write_jsonl(str(scores / "trec.jsonl"), [{"pred": None, "answers": ["a"], "all_classes": ["a"], "_id": "1"}])
    stray = tmp_path / "stray"
    write_jsonl(str(stray / "hotpotqa.jsonl"), [{"pred": "Paris", "answers": ["Paris"], "_id": "1"}])
    write_jsonl(str(stray / "notes.jsonl"), [{"note": "mine"}])

    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from hf_sparse_attn.eval.run_dir import RunDir\n"
        f"RunDir({str(tmp_path / 'busy')!r}, {{}}).open(); print('locked', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        results = _cli(
            _longbench(model_dir, str(data), str(data)),  # 3: --out is the data directory
            _longbench(model_dir, str(data / "hotpotqa.jsonl"), str(data)),  # 3: --out holds the data file
            _longbench(model_dir, str(data), str(tmp_path / "busy")),  # 4: another process writes --out
            _longbench(model_dir, dup, str(tmp_path / "o1")),  # 5: ids x, x, x-1
            _longbench(model_dir, listid, str(tmp_path / "o2")),
            _longbench(model_dir, toplist, str(tmp_path / "o3")),
            _longbench(model_dir, surrogate, str(tmp_path / "o4")),
            ["longbench", "--model", model_dir, "--data", classes, "--tasks", "trec", "--out", tmp_path / "o5"],
            ["longbench", "--model", model_dir, "--data", nan, "--tasks", "hotpotqa", "--e", "--out", tmp_path / "o6"],
            _longbench(model_dir, str(data), str(tmp_path / "o7"), "--max-length", "1"),
            ["longbench-score", scores],
            ["longbench-score", stray],
            # 16: every missing task file named, with the --tasks that would run
            ["longbench", "--model", model_dir, "--data", data, "--tasks", "hotpotqa,qasper,trec", "--out", tmp_path / "o8"],
        )
    finally:
        holder.kill()
        holder.wait()
    (out_is_data, out_holds_data, busy, dup_ids, list_id, top_list, lone, int_classes, nan_length, max_len, score_bad,
     score_stray, missing) = results
    for case in results:
        if case is not score_stray:
            assert case["rc"] == 2 and case["stderr"].count("\n") == 1, case  # one line, never a traceback
    assert (data / "hotpotqa.jsonl").read_bytes() == before and sorted(os.listdir(data)) == ["hotpotqa.jsonl"]
    assert "input" in out_is_data["stderr"] and "input" in out_holds_data["stderr"]
    assert f"process {holder.pid}" in busy["stderr"]
    assert "repeated" in dup_ids["stderr"] and "x" in dup_ids["stderr"]
    assert "'_id' must be a string or an integer" in list_id["stderr"]
    assert "not an object" in top_list["stderr"]
    assert "surrogate" in lone["stderr"]
    assert "'all_classes'" in int_classes["stderr"]
    assert "'length'" in nan_length["stderr"]
    assert "--max-length must be >= 2" in max_len["stderr"]
    assert "'pred' missing or invalid" in score_bad["stderr"]
    assert score_stray["rc"] == 0 and "skipped notes.jsonl" in score_stray["stderr"]
    assert json.loads((stray / "result.json").read_text()) == {"hotpotqa": 100.0}
    assert "qasper.jsonl, trec.jsonl" in missing["stderr"] and "--tasks hotpotqa" in missing["stderr"]
    for name in ("o1", "o2", "o3", "o4", "o5", "o6", "o7", "o8"):
        assert not (tmp_path / name / "hotpotqa.jsonl").exists()  # refused before anything was predicted


def test_middle_truncation_keeps_at_most_max_length_tokens(model_dir):
    from transformers import AutoTokenizer

    from hf_sparse_attn.eval.longbench.predict import truncate_middle

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = " ".join(["river city music"] * 200)
    for budget in (2, 3, 50):
        kept = truncate_middle(tokenizer, prompt, budget)
        assert len(tokenizer(kept, add_special_tokens=False)["input_ids"]) <= budget + 1
    with pytest.raises(ValueError, match="at least 2"):
        truncate_middle(tokenizer, prompt, 1)  # used to keep the whole prompt (token_ids[-0:])


def test_score_refuses_a_nan_length_instead_of_bucketing_it(tmp_path):
    write_jsonl(str(tmp_path / "hotpotqa.jsonl"), [{"pred": "a", "answers": ["a"], "length": float("nan"), "_id": "1"}])
    with pytest.raises(ValueError, match="'length' missing or invalid"):
        score_directory(str(tmp_path), longbench_e=True, write=False)


# ---------------------------------------------------------------------------------------------------- longbench-grid
def test_grid_rerun_with_another_window_is_refused(model_dir, tmp_path):
    data = tmp_path / "data"
    write_jsonl(str(data / "hotpotqa.jsonl"), samples("hotpotqa", 2))
    config = tmp_path / "grid.toml"
    config.write_text(f"""
[model]
path = "{model_dir}"
[data]
path = "{data}"
longbench_e = false
tasks = ["hotpotqa"]
[predict]
max_length = 200
max_new_tokens_cap = 2
[grid]
methods = ["local"]
layers = [1]
[params.local]
window = 8
""")
    out = tmp_path / "grid"
    first, refused, same = _cli(["longbench-grid", config, "--out", out, "--no-progress"],
                                ["longbench-grid", config, "--out", out, "--set", "params.local.window=16"],
                                ["longbench-grid", config, "--out", out, "--no-progress"])
    assert first["rc"] == 0, first["stderr"][-2000:]
    assert "warning: arm local-1-weight_norm: 'local' served none of the 2 prefill" in first["stderr"]  # item 13
    plan = json.loads((out / "local-1-weight_norm" / "plan.json").read_text())
    assert sum(n for layer in plan["layers"] for n in layer["fallbacks"].values()) >= 2  # the final plan, counted
    assert refused["rc"] == 2 and "local-1-weight_norm" in refused["stderr"] and "params" in refused["stderr"]
    assert 'params.window (8 -> 16)' in refused["stderr"]
    assert same["rc"] == 0  # the same settings resume
    arm = json.loads((out / "local-1-weight_norm" / "run_settings.json").read_text())
    assert arm["params"] == {"window": 8}
    refused_out = _cli(["longbench-grid", config, "--out", data])[0]  # --out holding the data
    assert refused_out["rc"] == 2 and "input" in refused_out["stderr"]


# ---------------------------------------------------------------------------------------------------- bench
def test_bench_model_refuses_other_settings_and_report_only_reads_old_results(model_dir, tmp_path):
    out = tmp_path / "bench"
    base = ["bench", "model", "--model", model_dir, "--tokens", "64", "--articles", "1", "--methods", "local",
            "--layers", "0", "1", "--selections", "weight_norm", "--random-seeds", "0", "--no-profile",
            "--calibration-tokens", "64", "--no-progress", "--out", out]
    first, other_param, other_model = _cli(base, [*base, "--method-param", "local.window=16"],
                                           [*base[:3], "--model", "smollm2", *base[5:]])
    assert first["rc"] == 0, first["stderr"][-2000:]
    assert other_param["rc"] == 2 and "method_params" in other_param["stderr"]
    assert other_model["rc"] == 2 and "model" in other_model["stderr"]
    report = (out / "results.md").read_text()
    os.remove(out / "run_settings.json")  # results written by an older version: no settings recorded
    report_only = _cli([*base, "--report-only"])[0]
    assert report_only["rc"] == 0, report_only["stderr"][-2000:]
    assert (out / "results.md").read_text().split("Command:")[1].split("\n", 1)[1] == \
        report.split("Command:")[1].split("\n", 1)[1]  # the same tables
    assert not (out / "run_settings.json").exists()  # --report-only records nothing


def test_bench_kernel_refuses_other_params_has_no_shard_and_dry_run_elsewhere_prints_absolute_paths(tmp_path):
    from hf_sparse_attn.eval.bench.grid import SELECTIONS
    from hf_sparse_attn.commands.bench import SELECTIONS as CLI_SELECTIONS

    assert CLI_SELECTIONS == SELECTIONS
    config = os.path.join(REPO, "eval", "experiments", "model_bench_grid.toml")
    kernel = ["bench", "kernel", "--methods", "hyper", "--ns", "64", "--causal", "causal", "--repeats", "1",
              "--no-progress", "--out", tmp_path / "k", "--method-param", "hyper.min_seq_len=16"]
    kernel_help, dry, overwrite, first, other = _cli(
        ["bench", "kernel", "--help"], ["bench", "run", config, "--dry-run"],
        ["bench", "run", config, "--dry-run", "--overwrite"], kernel, [*kernel, "--method-param", "hyper.block_size=16"],
        cwd=str(tmp_path))
    assert first["rc"] == 0, first["stderr"][-2000:]
    assert other["rc"] == 2 and "method_params" in other["stderr"] and "--overwrite" in other["stderr"]
    assert kernel_help["rc"] == 0 and "--shard" not in kernel_help["stdout"] and "--ns" in kernel_help["stdout"]
    assert dry["rc"] == 0, dry
    line = dry["stdout"].splitlines()[0]
    assert f"--out {os.path.join(REPO, 'eval', 'results', 'model_bench_grid')}" in line
    assert f"--experiment {config}" in line and "--overwrite" not in line
    lines = overwrite["stdout"].splitlines()
    assert lines[0].endswith("--overwrite") and not any("--overwrite" in x for x in lines[1:])


def test_longbench_score_imports_no_torch(tmp_path):
    write_jsonl(str(tmp_path / "hotpotqa.jsonl"), [{"pred": "Paris", "answers": ["Paris"], "_id": "1"}])
    code = ("import sys; sys.modules['torch'] = None  # any import of torch fails\n"
            "from hf_sparse_attn.cli import main\n"
            f"sys.exit(main(['longbench-score', {str(tmp_path)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "result.json").read_text()) == {"hotpotqa": 100.0}


# ---------------------------------------------------------------------------------------------------- run_dir additions
def test_run_dir_patterns_check_only_mode_and_shard_locks(tmp_path):
    from hf_sparse_attn.eval.run_dir import RunDir, RunSettingsError

    out = tmp_path / "run"
    parts = [r"x\.hfsa-part\d+\.jsonl"]
    with RunDir(str(out), {"m": 1}, owned_patterns=parts) as run:
        (out / "x.hfsa-part0.jsonl").write_text("{}\n")
        assert len(run.run_id) == 10 and run.run_id == RunDir(str(out), {"m": 1}).run_id != RunDir(str(out), {"m": 2}).run_id
    (out / "x.part0.jsonl").write_text("mine\n")
    with pytest.raises(RunSettingsError, match="other settings"):
        RunDir(str(out), {"m": 2}, record=False).open()  # check-only still compares recorded settings
    RunDir(str(tmp_path / "old"), {"m": 2}, record=False).open()  # and accepts a directory without settings
    assert not (tmp_path / "old").exists()  # writing nothing
    with RunDir(str(out), {"m": 2}, owned_patterns=parts, overwrite=True):
        assert sorted(os.listdir(out)) == [".run.lock", "run_settings.json", "x.part0.jsonl"]  # the user's file kept
    with RunDir(str(out), {"m": 2}, lock_name=".run.shard-0-of-2.lock"), \
            RunDir(str(out), {"m": 2}, lock_name=".run.shard-1-of-2.lock"):
        pass  # shards of one grid hold their own locks side by side
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunSettingsError, match="is a file"):
        RunDir(str(tmp_path / "file"), {}).open()


def test_max_length_beyond_the_models_positions_is_refused(model_dir, tmp_path):
    """A --max-length the model has no positions for would let prompts through untruncated: one-line error."""
    from transformers import AutoConfig

    positions = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    data = str(tmp_path / "data")
    write_jsonl(os.path.join(data, "hotpotqa.jsonl"), samples("hotpotqa", 2))
    (refused,) = _cli(_longbench(model_dir, data, str(tmp_path / "out"), "--max-length", str(positions + 1)))
    last = refused["stderr"].strip().splitlines()[-1]  # after the weights' loading bar: the one-line error
    assert refused["rc"] == 2 and "Traceback" not in refused["stderr"], refused
    assert f"--max-length {positions + 1} is more than the model's {positions} positions" in last
    assert not (tmp_path / "out" / "hotpotqa.jsonl").exists()
