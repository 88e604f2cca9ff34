"""The run directory of a resumable command: settings recorded, other settings refused, one writer at a time,
nothing the run did not write ever deleted."""

import json
import subprocess
import sys

import pytest

from hf_sparse_attn.eval.run_dir import LOCK_FILE, SETTINGS_FILE, RunDir, RunSettingsError, settings_diff


def test_same_settings_resume_and_other_settings_are_refused(tmp_path):
    out = tmp_path / "run"
    with RunDir(str(out), {"method": "none", "seed": 0}, owned_files=["a.jsonl"]):
        (out / "a.jsonl").write_text('{"x": 1}\n')
    with RunDir(str(out), {"method": "none", "seed": 0}, owned_files=["a.jsonl"]):
        pass  # resumes
    assert (out / "a.jsonl").exists()
    with pytest.raises(RunSettingsError, match=r"method \(\"none\" -> \"local\"\).*--overwrite"):
        RunDir(str(out), {"method": "local", "seed": 0}, owned_files=["a.jsonl"]).open()
    assert json.loads((out / SETTINGS_FILE).read_text())["method"] == "none"


def test_overwrite_deletes_only_owned_files(tmp_path):
    out = tmp_path / "run"
    with RunDir(str(out), {"method": "none"}, owned_files=["a.jsonl"]):
        (out / "a.jsonl").write_text("{}\n")
    (out / "notes.jsonl").write_text("mine\n")
    with RunDir(str(out), {"method": "local"}, owned_files=["a.jsonl"], overwrite=True):
        assert not (out / "a.jsonl").exists()
    assert (out / "notes.jsonl").read_text() == "mine\n"
    assert json.loads((out / SETTINGS_FILE).read_text()) == {"method": "local"}


def test_results_without_settings_are_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    with pytest.raises(RunSettingsError, match="record no settings"):
        RunDir(str(tmp_path), {"m": 1}, owned_files=["a.jsonl"]).open()


def test_out_that_is_or_holds_or_lies_in_the_input_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for out in (data, tmp_path, data / "sub"):
        with pytest.raises(RunSettingsError, match="input"):
            RunDir(str(out), {}, forbidden=[str(data)])
    RunDir(str(tmp_path / "elsewhere"), {}, forbidden=[str(data)])  # a sibling is fine


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from hf_sparse_attn.eval.run_dir import RunDir\n"
        f"r = RunDir({str(out)!r}, {{}}).open(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunSettingsError, match=f"process {holder.pid}"):
            RunDir(str(out), {}).open()
    finally:
        holder.kill()
        holder.wait()
    with RunDir(str(out), {}):  # the kernel released the dead holder's lock
        assert (out / LOCK_FILE).exists()


def test_settings_diff_names_each_change():
    assert settings_diff({"a": 1, "b": [1, 2]}, {"a": 1, "b": (1, 2)}) == []
    assert settings_diff({"a": 1}, {"a": 2, "c": 3}) == ["a (1 -> 2)", "c (unset -> 3)"]
    # inside a dict setting, the entry that differs is named, however long the dict (a truncated dict would hide it)
    long = {f"param_{i:02d}": i for i in range(20)}
    assert settings_diff({"params": long}, {"params": {**long, "param_19": 7}, "seed": 0}) == [
        "params.param_19 (19 -> 7)", "seed (unset -> 0)"]
    assert settings_diff({"params": None}, {"params": {"a": 1}}) == ['params (null -> {"a": 1})']


def test_a_rerun_may_grow_the_extendable_settings_and_nothing_else(tmp_path):
    extendable = ("tasks", "generation.max_new_tokens")
    old = {"tasks": ["a", "b"], "generation": {"max_new_tokens": {"a": 8, "b": 16}, "greedy": True}, "seed": 0}
    grown = {"tasks": ["c", "a", "b"], "generation": {"max_new_tokens": {"a": 8, "b": 16, "c": 30}, "greedy": True},
             "seed": 0}
    assert settings_diff(old, grown, extendable) == []
    assert settings_diff(old, grown) == ["generation.max_new_tokens.c (unset -> 30)", 'tasks (["a", "b"] -> ["c", "a", "b"])']
    fewer = {**old, "tasks": ["a"]}
    assert settings_diff(old, fewer, extendable) == ['tasks (["a", "b"] -> ["a"])']
    changed = {**grown, "generation": {"max_new_tokens": {"a": 9, "b": 16, "c": 30}, "greedy": True}}
    assert settings_diff(old, changed, extendable) == ["generation.max_new_tokens.a (8 -> 9)"]
    assert settings_diff(old, {**grown, "seed": 1}, extendable) == ["seed (0 -> 1)"]  # not extendable

    out = tmp_path / "run"
    with RunDir(str(out), old, owned_files=["a.jsonl"], extendable=extendable) as run:
        (out / "a.jsonl").write_text("{}\n")
        assert run.extended == []
    with RunDir(str(out), grown, owned_files=["a.jsonl"], extendable=extendable) as run:
        assert run.extended == settings_diff(old, grown)
    assert (out / "a.jsonl").read_text() == "{}\n"  # kept
    assert json.loads((out / SETTINGS_FILE).read_text()) == grown  # the grown settings are the run's now
    for other in (old, changed):  # the old, smaller settings are now fewer tasks: refused, nothing discarded
        with pytest.raises(RunSettingsError, match="other settings"):
            RunDir(str(out), other, owned_files=["a.jsonl"], extendable=extendable).open()
    assert (out / "a.jsonl").exists()
    with pytest.raises(RunSettingsError, match="tasks"):  # without extendable, growth is a change like any other
        RunDir(str(out), {**grown, "tasks": grown["tasks"] + ["d"]}, owned_files=["a.jsonl"]).open()
