"""The served / fallback counts of a resumed run describe every prediction of its directory: `hf-sparse-attn ruler`
and `hf-sparse-attn longbench` rerun over a finished directory keep them (and say that nothing was left to predict),
a run resumed after lost samples counts each sample once, and more samples add their counts to the earlier ones
(:mod:`hf_sparse_attn.eval.plan_counts`). Tiny random Llamas, the commands run in this process."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from hf_sparse_attn.cli import main
from hf_sparse_attn.eval.plan_counts import COUNTS_FILE, SampleCounts, run_plan
from hf_sparse_attn.plan import LayerPlan, PatchPlan
from longbench_tiny import samples, tiny_llama, write_jsonl
from tiny_checkpoint import save_tiny_checkpoint

NOTHING_LEFT = "nothing left to predict"


def _summary(out) -> dict:
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        return json.load(f)


def _layer_counts(plan: dict) -> dict:
    """{layer_idx: (served, decode_served, fallbacks)} of a plan's patched layers (its JSON form)."""
    return {layer["layer_idx"]: (layer["served"], layer["decode_served"], layer["fallbacks"])
            for layer in plan["layers"] if layer["method"]}


def _plan_file_counts(out) -> dict:
    """:func:`_layer_counts` of ``out``'s plan.json."""
    with open(os.path.join(out, "plan.json"), encoding="utf-8") as f:
        return _layer_counts(json.load(f))


def _count_lines(out) -> int:
    with open(os.path.join(out, COUNTS_FILE), encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


# ------------------------------------------------------------------------------------------------ ruler
@pytest.fixture(scope="module")
def ruler_model(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny_ruler_model")
    save_tiny_checkpoint(path)  # 512 positions, 3 layers
    return str(path)


def _ruler(model_dir: str, out, capsys) -> tuple[dict, str]:
    """(summary.json, stderr) of ``ruler`` over ``out``: local attention in every layer, served from 300 tokens on,
    so the 200-token samples fall back and the 400-token ones are served."""
    capsys.readouterr()
    code = main(["ruler", "--model", model_dir, "--tasks", "passkey", "--lengths", "200,400", "--samples", "2",
                 "--method", "local", "--layers", "all", "--param", "min_seq_len=300", "--param", "window=64",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    return _summary(out), capsys.readouterr().err


def test_ruler_rerun_with_nothing_left_keeps_the_counts(ruler_model, tmp_path, capsys):
    out = tmp_path / "run"
    first, err = _ruler(ruler_model, out, capsys)
    counts = first["plan_counts_this_invocation"]
    assert counts["served"] == 2 * 3 and counts["prefill_calls"] == 4 * 3  # 2 served samples x 3 layers of 4 samples
    assert counts["fallbacks"] == {"seq_len < min_seq_len=300": 2 * 3}
    assert counts["warning"] is None and NOTHING_LEFT not in err
    plan_counts = _plan_file_counts(out)
    assert sum(served for served, _, _ in plan_counts.values()) == 6

    again, err = _ruler(ruler_model, out, capsys)
    assert again["meta"]["this_invocation"][0]["predicted"] == 0
    assert again["plan_counts_this_invocation"] == counts  # not this invocation's zeros
    assert _layer_counts(again["plan"]) == _layer_counts(first["plan"])
    assert _plan_file_counts(out) == plan_counts
    assert NOTHING_LEFT in err and "SERVED" not in err
    assert "served 6 of 12" in (out / "report.md").read_text()
    assert counts["samples_counted"] == 4


def test_ruler_plan_serving_nothing_warns_once_then_says_nothing_was_left(ruler_model, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["ruler", "--model", ruler_model, "--tasks", "passkey", "--lengths", "200", "--samples", "2", "--method",
            "local", "--layers", "all", "--out", str(out), "--no-progress"]  # min_seq_len 4096: nothing served
    capsys.readouterr()
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "THE PLAN SERVED 0 OF 6" in err
    assert main(args) == 0
    err = capsys.readouterr().err
    assert NOTHING_LEFT in err and "SERVED" not in err
    counts = _summary(out)["plan_counts_this_invocation"]
    assert counts["prefill_calls"] == 6 and counts["warning"].startswith("!! THE PLAN SERVED 0 OF 6")  # still said


def test_ruler_lost_samples_are_redone_and_every_sample_counted_once(ruler_model, tmp_path, capsys):
    out = tmp_path / "run"
    fresh, _ = _ruler(ruler_model, out, capsys)
    path = out / "passkey.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]))  # the two 400-token samples lost, as after a kill: their counts stay
    resumed, err = _ruler(ruler_model, out, capsys)
    assert resumed["meta"]["this_invocation"][0]["predicted"] == 2 and NOTHING_LEFT not in err
    assert _count_lines(out) == 4 + 2  # both invocations' lines kept
    # the first invocation's two fallback samples and the second's two served ones, the lost ones counted once
    assert resumed["plan_counts_this_invocation"] == fresh["plan_counts_this_invocation"]

    path.write_text("".join(lines[:-3]))  # one fallback sample lost as well: redone, and its counts with it
    redone, _ = _ruler(ruler_model, out, capsys)
    assert redone["meta"]["this_invocation"][0]["predicted"] == 3
    assert redone["plan_counts_this_invocation"] == fresh["plan_counts_this_invocation"]


def test_ruler_directory_without_counts_keeps_what_its_summary_had(ruler_model, tmp_path, capsys):
    out = tmp_path / "run"
    fresh, _ = _ruler(ruler_model, out, capsys)
    os.remove(out / COUNTS_FILE)  # a directory predicted by a version that kept no per-sample counts
    again, err = _ruler(ruler_model, out, capsys)
    assert NOTHING_LEFT in err
    assert again["plan_counts_this_invocation"] == fresh["plan_counts_this_invocation"]


def test_ruler_overwrite_discards_the_counts(ruler_model, tmp_path, capsys):
    out = tmp_path / "run"
    _ruler(ruler_model, out, capsys)
    capsys.readouterr()
    assert main(["ruler", "--model", ruler_model, "--tasks", "passkey", "--lengths", "200", "--samples", "1",
                 "--method", "local", "--layers", "all", "--out", str(out), "--no-progress", "--overwrite"]) == 0
    counts = _summary(out)["plan_counts_this_invocation"]
    assert counts["prefill_calls"] == 3 and counts["samples_counted"] == 1 and _count_lines(out) == 1


# ------------------------------------------------------------------------------------------------ processes
def _plan(served: int = 0, fallbacks: dict | None = None) -> PatchPlan:
    """A two-layer plan, layer 1 patched with ``local``, its counters at ``served`` and ``fallbacks``."""
    plan = PatchPlan(method="local", select="all", layers=[LayerPlan(0, 1.0, 1, None), LayerPlan(1, 2.0, 0, "local")])
    plan.layers[1].served, plan.layers[1].fallbacks = served, dict(fallbacks or {})
    return plan


def test_counts_of_several_processes_sum_and_a_sample_predicted_again_counts_once(tmp_path):
    out = str(tmp_path)
    rank0, rank1 = _plan(), _plan()  # two processes appending to the same file, each with its own counters
    c0, c1 = SampleCounts(rank0, out), SampleCounts(rank1, out)
    rank0.layers[1].served += 1
    c0.record("hotpotqa", "a")
    rank1.layers[1].fallbacks["short"] = 1
    c1.record("hotpotqa", "b")
    rank0.layers[1].served += 1
    c0.record("samsum", "a")  # the same id in another task is another sample
    rank1.layers[1].served += 1
    c1.record("hotpotqa", "lost")  # counted, but its prediction never written
    total, counted = run_plan(_plan(), out, {"hotpotqa": ["a", "b"], "samsum": ["a"]})
    assert counted == 3 and total.layers[1].served == 2 and total.layers[1].fallbacks == {"short": 1}

    later = _plan(5, {"short": 7})  # a later invocation, its counters not starting at zero (a --plan with counts)
    counts = SampleCounts(later, out)
    later.layers[1].served += 1
    counts.record("hotpotqa", "b")  # "b" predicted again (its line lost): the last line counts
    total, counted = run_plan(_plan(), out, {"hotpotqa": ["a", "b"], "samsum": ["a"]})
    assert counted == 3 and total.layers[1].served == 3 and total.layers[1].fallbacks == {}
    assert run_plan(_plan(), out, {})[1] == 0


# ------------------------------------------------------------------------------------------------ longbench
@pytest.fixture(scope="module")
def longbench_setup(tmp_path_factory) -> tuple[str, str]:
    """(model_dir, data_dir): a tiny random Llama and 4 hotpotqa samples."""
    root = tmp_path_factory.mktemp("resume_counts_longbench")
    model_dir, data_dir = str(root / "model"), str(root / "data")
    tiny_llama(model_dir)
    write_jsonl(os.path.join(data_dir, "hotpotqa.jsonl"), samples("hotpotqa", 4))
    return model_dir, data_dir


def _longbench(setup, out, capsys, max_samples: int, *extra: str) -> tuple[dict, str]:
    model_dir, data_dir = setup
    capsys.readouterr()
    code = main(["longbench", "--model", model_dir, "--data", data_dir, "--tasks", "hotpotqa", "--out", str(out),
                 "--method", "local", "--layers", "all", "--param", "window=16", "--max-length", "300",
                 "--max-new-tokens", "4", "--max-samples", str(max_samples), "--no-progress", *extra])
    assert code == 0
    return _summary(out), capsys.readouterr().err


def test_longbench_rerun_keeps_the_counts_and_more_samples_add_theirs(longbench_setup, tmp_path, capsys):
    reference, _ = _longbench(longbench_setup, tmp_path / "four", capsys, 4, "--param", "min_seq_len=1")
    assert sum(served for served, _, _ in _layer_counts(reference["plan"]).values()) == 4 * 2  # every call served

    out = tmp_path / "run"
    two, err = _longbench(longbench_setup, out, capsys, 2, "--param", "min_seq_len=1")
    assert sum(served for served, _, _ in _layer_counts(two["plan"]).values()) == 2 * 2 and NOTHING_LEFT not in err
    four, err = _longbench(longbench_setup, out, capsys, 4, "--param", "min_seq_len=1")
    assert four["meta"]["this_invocation"]["predicted"] == 2 and NOTHING_LEFT not in err
    assert _layer_counts(four["plan"]) == _layer_counts(reference["plan"])  # both invocations' samples
    assert _plan_file_counts(out) == _plan_file_counts(tmp_path / "four")

    again, err = _longbench(longbench_setup, out, capsys, 4, "--param", "min_seq_len=1")
    assert again["meta"]["this_invocation"]["predicted"] == 0
    assert _layer_counts(again["plan"]) == _layer_counts(reference["plan"])  # not this invocation's zeros
    assert _plan_file_counts(out) == _plan_file_counts(tmp_path / "four")
    assert NOTHING_LEFT in err and again["meta"]["fallbacks_this_invocation"] == {}
    assert again["meta"]["plan_counts"] == four["meta"]["plan_counts"] == reference["meta"]["plan_counts"]
    assert reference["meta"]["plan_counts"]["served"] == 8 and reference["meta"]["plan_counts"]["samples_counted"] == 4


def test_longbench_plan_serving_nothing_warns_once_then_says_nothing_was_left(longbench_setup, tmp_path, capsys):
    out = tmp_path / "run"
    first, err = _longbench(longbench_setup, out, capsys, 2)  # min_seq_len 4096: every call falls back
    assert "served none of the 4 prefill attention calls" in err and "warning" in first["meta"]
    again, err = _longbench(longbench_setup, out, capsys, 2)
    assert "served none of the 4 prefill attention calls" in again["meta"]["warning"]  # the directory's counts
    assert NOTHING_LEFT in err and "served none" not in err
    assert again["meta"]["plan_counts"] == first["meta"]["plan_counts"]
    assert again["meta"]["plan_counts"]["prefill_calls"] == 4


def test_longbench_directory_without_counts_keeps_what_its_summary_had(longbench_setup, tmp_path, capsys):
    out = tmp_path / "run"
    first, _ = _longbench(longbench_setup, out, capsys, 2, "--param", "min_seq_len=1")
    os.remove(out / COUNTS_FILE)  # a directory predicted by a version that kept no per-sample counts
    shutil.copy(out / "plan.json", tmp_path / "plan.json")
    again, err = _longbench(longbench_setup, out, capsys, 2, "--param", "min_seq_len=1")
    assert NOTHING_LEFT in err
    assert _layer_counts(again["plan"]) == _layer_counts(first["plan"])
    assert again["meta"]["plan_counts"]["served"] == first["meta"]["plan_counts"]["served"] == 4
    assert _plan_file_counts(out) == _plan_file_counts(tmp_path)  # plan.json untouched
