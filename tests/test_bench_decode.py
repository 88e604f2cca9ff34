"""`bench model --decode-tokens`: timed greedy decode steps against a KV cache (hf_sparse_attn/eval/bench/measure.py),
on tiny random Llama models."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import warnings

import pytest
import torch

from hf_sparse_attn import current_plan
from hf_sparse_attn.eval.bench import baseline_cell
from hf_sparse_attn.eval.bench.grid import Cell
from hf_sparse_attn.eval.bench.grid import run_decode_cells
from hf_sparse_attn.eval.bench import measure
from hf_sparse_attn.eval.bench.measure import compare_decode, ratio_interval, time_decode
from hf_sparse_attn.eval.bench.report import decode_lines
from hf_sparse_attn.eval.bench.results import read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def llama(tiny_model):
    return tiny_model("llama")


def _prompt(n: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 101, (1, n), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids: torch.Tensor, new_tokens: int) -> list[int]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("cache", ["dynamic", "growing"])
def test_timed_decode_generates_what_generate_generates(llama, cache):
    ids = _prompt()
    result = time_decode(llama, ids, 6, cache=cache)
    assert len(result["step_ms"]) == 6 and all(t > 0 for t in result["step_ms"])
    assert result["tokens"] == _generate(llama, ids, 7)  # the prefill's token + one per timed step
    assert result["cache"] == {"dynamic": "DynamicCache", "growing": "GrowingCache"}[cache]
    assert result["tokens_per_s"] == pytest.approx(1e3 / result["median_ms"])
    with pytest.raises(ValueError, match="steps"):
        time_decode(llama, ids, 0)


def test_compare_decode_shared_prefill_and_patched_cell(llama):
    ids = _prompt(seed=1)
    same = compare_decode(llama, ids, 5, baseline_cache="dynamic", cell_cache="growing")
    assert len(same["baseline"]["step_ms"]) == len(same["cell"]["step_ms"]) == 5
    assert same["baseline"]["tokens"] == same["cell"]["tokens"] == _generate(llama, ids, 6)
    assert same["same_tokens"] == 6
    assert same["speedup"] == pytest.approx(same["baseline"]["median_ms"] / same["cell"]["median_ms"])
    assert (same["baseline"]["cache"], same["cell"]["cache"]) == ("DynamicCache", "GrowingCache")

    from hf_sparse_attn import patch_model, unpatch_model

    events = []

    def enter():
        events.append("enter")
        patch_model(llama, method="local", layers="all", window=8, num_sink_tokens=2, min_seq_len=16)

    def leave():
        events.append("exit")
        unpatch_model(llama)

    real_step = measure._DecodeRun.step

    def step(run):  # which side steps, the cell's model patched or not
        events.append("cell step" if current_plan(llama) is not None else "baseline step")
        real_step(run)

    measure._DecodeRun.step = step
    try:
        patched = compare_decode(llama, ids, 4, enter_cell=enter, exit_cell=leave, cell_first=True)
    finally:
        measure._DecodeRun.step = real_step
    # the cell's prefill patched, then the steps alternating, the cell's first, each of its steps patched, then the
    # cell's teacher-forced steps over the prompt's end, patched
    assert events == ["enter", "exit"] + ["enter", "cell step", "exit", "baseline step"] * 4 + ["enter", "exit"]
    assert current_plan(llama) is None
    assert len(patched["cell"]["step_ms"]) == 4
    assert patched["baseline"]["tokens"] == _generate(llama, ids, 5)
    enter()
    try:
        assert patched["cell"]["tokens"] == _generate(llama, ids, 5)  # the patched model's own greedy tokens
    finally:
        unpatch_model(llama)


def _reference_nll(model, ids: torch.Tensor, tokens: list[int]) -> float:
    """Mean nll of ``tokens`` after ``ids`` from one forward of the whole sequence, no cache."""
    full = torch.cat([ids, torch.tensor([tokens])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full).logits[0, ids.shape[1] - 1:-1].float()
    return -float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None]).mean())


@pytest.mark.parametrize("cache", ["dynamic", "growing"])
def test_teacher_forced_decode_nll_is_the_full_forward_nll_of_the_prompts_end(llama, cache):
    """Through exact decode steps the prompt's last tokens score as one forward of the whole prompt scores them; local
    decode with a short window scores them otherwise (its steps do not see the middle of the prompt)."""
    from hf_sparse_attn import patch_model, unpatch_model

    ids = _prompt(48, 5)
    with torch.no_grad():
        logits = llama(input_ids=ids).logits[0, 48 - 7:-1].float()  # positions 41..46 predict tokens 42..47
    reference = -float(torch.log_softmax(logits, -1).gather(-1, ids[0, 42:, None]).mean())

    def forced(decode_method: str, **decode_params) -> float:
        kv = measure.new_decode_cache(cache, llama)
        patch_model(llama, method="exact", layers="all", decode_method=decode_method, decode_params=decode_params)
        try:
            measure._prefill(llama, ids, kv)
            return measure.teacher_forced_decode_nll(llama, kv, ids, 6)
        finally:
            unpatch_model(llama)

    assert forced("exact") == pytest.approx(reference, abs=1e-4)
    assert abs(forced("local", window=4, num_sink_tokens=1) - reference) > 1e-3
    with pytest.raises(ValueError, match="tokens must be in"):
        measure.teacher_forced_decode_nll(llama, measure.new_decode_cache(cache, llama), ids, 47)


@pytest.mark.parametrize("cache", ["dynamic", "growing"])
def test_continuations_are_scored_by_the_exact_model(llama, cache):
    """compare_decode scores both sides' generated tokens with the exact model, from the baseline's cache cropped back
    to the prompt: the same numbers as one forward of prompt + tokens; a cell whose decode sees only a few keys
    generates other tokens, and those are scored by the exact model, not by the cell's."""
    from hf_sparse_attn import patch_model, unpatch_model

    ids = _prompt(seed=2)
    same = compare_decode(llama, ids, 5, baseline_cache=cache, cell_cache=cache)
    reference = _reference_nll(llama, ids, same["baseline"]["tokens"])
    assert same["exact_nll"]["baseline"] == pytest.approx(reference, rel=1e-4)
    assert same["exact_nll"]["cell"] == pytest.approx(reference, rel=1e-4)

    def enter():
        patch_model(llama, method="local", layers="all", window=4, num_sink_tokens=1, min_seq_len=16,
                    decode_method="local", decode_params={"window": 2, "num_sink_tokens": 1})

    patched = compare_decode(llama, ids, 8, baseline_cache=cache, cell_cache=cache, enter_cell=enter,
                             exit_cell=lambda: unpatch_model(llama))
    tokens = patched["cell"]["tokens"]
    assert tokens != patched["baseline"]["tokens"]  # the window of 2 changes what is generated...
    assert patched["exact_nll"]["cell"] == pytest.approx(_reference_nll(llama, ids, tokens), rel=1e-4)  # ...scored exact
    assert patched["exact_nll"]["baseline"] == pytest.approx(_reference_nll(llama, ids, patched["baseline"]["tokens"]),
                                                             rel=1e-4)


def test_ratio_interval_resamples_prompts():
    lo, hi = ratio_interval([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert lo == pytest.approx(2.0) and hi == pytest.approx(2.0)  # every prompt 2x: no spread
    lo, hi = ratio_interval([2.0, 1.0], [1.0, 1.0])
    assert 1.0 <= lo < 1.5 < hi <= 2.0
    with pytest.raises(ValueError):
        ratio_interval([1.0], [1.0, 2.0])


def test_decode_cells_record_steps_per_model_and_the_cache_kinds(llama, tmp_path):
    texts = [("a", _prompt(48, 2)), ("b", _prompt(48, 3))]
    cells = [baseline_cell(48), Cell("local", 48, 3, "last")]
    path = str(tmp_path / "results.jsonl")
    params = {"local": {"window": 8, "num_sink_tokens": 2, "min_seq_len": 16}}
    records = run_decode_cells(llama, cells, lambda n: texts, path, steps=3, cell_cache="growing",
                               baseline_cache="dynamic", method_params=params, progress=False)
    assert [r["key"] for r in records] == [c.key for c in cells] and current_plan(llama) is None
    for r in records:
        assert (r["cache"], r["baseline_cache"], r["decode_tokens"]) == ("GrowingCache", "DynamicCache", 3)
        assert [a["title"] for a in r["per_article"]] == ["a", "b"]
        assert all(len(a["baseline_step_ms"]) == len(a["cell_step_ms"]) == 3 for a in r["per_article"])
        lo, hi = r["speedup_ci"]
        assert lo <= r["speedup"] <= hi
    exact = records[0]["per_article"]
    assert all(a["same_tokens"] == 4 for a in exact)  # the same model with either cache: the same tokens...
    assert records[0]["continuation_ppl_change_pct"] == pytest.approx(0.0, abs=1e-3)  # ...scored the same
    assert records[1]["continuation_ppl_change_pct"] == pytest.approx(100 * (math.exp(
        sum(a["cell_exact_nll"] - a["baseline_exact_nll"] for a in records[1]["per_article"]) / 2) - 1))
    assert exact[0]["cell_tokens"] == _generate(llama, texts[0][1], 4)
    again = run_decode_cells(llama, cells, lambda n: texts, path, steps=3, cell_cache="growing",
                             baseline_cache="dynamic", method_params=params, progress=False)
    assert again == [] and len([r for r in read_jsonl(path) if r["kind"] == "decode"]) == 2  # done: skipped
    rows, lines = decode_lines(read_jsonl(path))
    assert len(rows) == 2 and any("DynamicCache" in x and "GrowingCache" in x for x in lines)


LOCAL_CELL = Cell("local", 48, 3, "last")
LOCAL_PARAMS = {"local": {"window": 8, "num_sink_tokens": 2, "min_seq_len": 16}}


def _decode_records(path: str) -> list[dict]:
    return [r for r in read_jsonl(path) if r["kind"] == "decode"]


def test_decode_method_is_patched_recorded_and_part_of_the_setting(llama, tmp_path):
    texts = [("a", _prompt(48, 2)), ("b", _prompt(48, 3))]
    cells = [baseline_cell(48), LOCAL_CELL]
    path = str(tmp_path / "results.jsonl")

    def run(decode_method, decode_params=None):
        return run_decode_cells(llama, cells, lambda n: texts, path, steps=3, cell_cache="growing", baseline_cache="dynamic",
                                method_params=LOCAL_PARAMS, progress=False, decode_method=decode_method,
                                decode_params=decode_params)

    base, local = run("local", {"window": 8, "num_sink_tokens": 2})
    assert (base["decode_method"], base["decode_params"], base["decode_served"], base["served"]) == (None, {}, 0, 0)
    assert (local["decode_method"], local["decode_params"]) == ("local", {"window": 8, "num_sink_tokens": 2})
    # 2 texts x 3 layers: one prefill call each served by the prefill method, 3 timed decode steps and 3
    # teacher-forced ones by the decode method
    assert (local["served"], local["decode_served"], local["fallbacks"]) == (6, 36, {})
    assert current_plan(llama) is None
    assert run("local", {"window": 8, "num_sink_tokens": 2}) == []  # the same setting: done
    (exact,) = run("exact")  # another decode method: the patched cell again, the unpatched baseline is done
    assert (exact["key"], exact["decode_method"], exact["decode_params"], exact["decode_served"]) == (LOCAL_CELL.key, "exact", {}, 36)
    (wider,) = run("local", {"window": 16, "num_sink_tokens": 2})  # other parameters: again
    assert wider["decode_params"] == {"window": 16, "num_sink_tokens": 2}
    assert len(_decode_records(path)) == 4
    rows, lines = decode_lines(read_jsonl(path))
    assert len(rows) == 4
    table = [x for x in lines if x.startswith("| 48 |")]
    assert [x.split(" | ")[5] for x in table] == ["-", "exact", "local window=16, num_sink_tokens=2",
                                                  "local window=8, num_sink_tokens=2"]  # parameters other than defaults
    assert [x.split(" | ")[-2] for x in table] == ["-", "36", "36", "36"]  # decode served
    forced = [x.split(" | ")[-3] for x in table]  # the prompt's end through each decode path, against exact decode
    assert forced[0] == "+0.00%" and all(re.fullmatch(r"[+-]\d+\.\d\d%", p) for p in forced)
    ppl = [x.split(" | ")[-4] for x in table]  # continuation perplexity against the exact model's own tokens
    assert ppl[0] == "+0.0%" and all(re.fullmatch(r"[+-]\d+\.\d%", p) for p in ppl)
    assert ("Decode parameters (all of them): exact: none; local window=16, num_sink_tokens=2: window=16, num_sink_tokens=2; "
            "local window=8, num_sink_tokens=2: window=8, num_sink_tokens=2.") in lines


@pytest.mark.parametrize("cache, served", [("dynamic", 0), ("growing", 36)])
def test_lsh_decode_is_served_only_with_a_growing_cache(llama, tmp_path, cache, served):
    from hf_sparse_attn.patches.reasons import NO_INDEXED_CACHE_REASON

    texts = [("a", _prompt(48, 2)), ("b", _prompt(48, 3))]
    path = str(tmp_path / "results.jsonl")
    (record,) = run_decode_cells(llama, [LOCAL_CELL], lambda n: texts, path, steps=3, cell_cache=cache,
                                 method_params=LOCAL_PARAMS, progress=False, decode_method="lsh",
                                 decode_params={"window": 8, "num_sink_tokens": 2, "block_size": 8, "sample_size": 8})
    assert record["decode_method"] == "lsh" and record["decode_params"]["block_size"] == 8
    assert record["decode_served"] == served
    assert record["fallbacks"] == ({NO_INDEXED_CACHE_REASON: 36} if cache == "dynamic" else {})
    _, lines = decode_lines(read_jsonl(path))
    row = next(x for x in lines if x.startswith("| 48 |"))
    assert (f"0 (fallback {NO_INDEXED_CACHE_REASON}: 36)" if cache == "dynamic" else "| 36 |") in row


def test_records_without_a_decode_method_measured_the_models_own_attention(llama, tmp_path):
    """A decode record made before --decode-method existed counts as decode_method None (the model's own attention
    in the patched layers): done for that setting, not for patch_model's default "exact"."""
    texts = [("a", _prompt(48, 2))]
    path = str(tmp_path / "results.jsonl")

    def run(decode_method):
        return run_decode_cells(llama, [LOCAL_CELL], lambda n: texts, path, steps=2, method_params=LOCAL_PARAMS,
                                progress=False, decode_method=decode_method)

    (own,) = run(None)
    assert (own["decode_method"], own["decode_served"]) == (None, 0)
    assert sum(own["fallbacks"].values()) == 2 * 2 * 3  # timed + teacher-forced steps ran the model's attention
    older = {k: v for k, v in own.items() if k not in ("decode_method", "decode_params", "served", "decode_served", "fallbacks")}
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(older) + "\n")
    assert run(None) == []
    (exact,) = run("exact")
    assert exact["decode_method"] == "exact" and exact["decode_served"] == 2 * 2 * 3
    rows, lines = decode_lines(read_jsonl(path))
    assert [r.get("decode_method") for r in rows] == [None, "exact"]


def test_cli_bench_model_refuses_an_unknown_decode_method_before_loading(tmp_path, capsys):
    from hf_sparse_attn.cli import main

    (tmp_path / "model").mkdir()  # nothing in it: the model is never loaded
    common = ["bench", "model", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"), "--decode-tokens", "2"]
    rc = main([*common, "--decode-method", "nope"])
    assert rc == 2 and "nope" in capsys.readouterr().err
    rc = main([*common, "--decode-method", "local", "--decode-param", "windw=8"])
    assert rc == 2 and "windw" in capsys.readouterr().err


@pytest.mark.integration  # bench model reads the offline Wikipedia articles
def test_cli_bench_model_decode_tokens(tmp_path):
    from tiny_checkpoint import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "bench"
    argv = [sys.executable, "-m", "hf_sparse_attn.cli", "bench", "model", "--model", str(tmp_path / "ckpt"), "--out",
            str(out), "--tokens", "64", "--articles", "2", "--methods", "local", "--layers", "0", "1", "--no-profile",
            "--no-progress", "--calibration-tokens", "32", "--threads", "1", "--decode-tokens", "3",
            "--decode-cache", "growing", "--decode-baseline-cache", "dynamic", "--decode-method", "local",
            "--decode-param", "window=16", "--method-param", "local.min_seq_len=16", "--selections", "weight_norm"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    decode = [r for r in read_jsonl(str(out / "results.jsonl")) if r["kind"] == "decode"]
    assert [r["key"] for r in decode] == ["exact|N=64|layers=0|none|seed=0", "local|N=64|layers=1|weight_norm|seed=0"]
    assert all(len(a["cell_step_ms"]) == 3 for a in decode[0]["per_article"]) and len(decode[0]["per_article"]) == 2
    assert decode[1]["decode_method"] == "local" and decode[1]["decode_params"]["window"] == 16
    assert decode[1]["decode_served"] == 2 * 2 * 3  # 2 articles x (3 timed + 3 teacher-forced steps) x 1 layer
    report = (out / "results.md").read_text()
    assert "## Decode" in report and "| DynamicCache |" in report and "| GrowingCache |" in report
    assert "| local window=16 | 3 |" in report and "local window=16: window=16, num_sink_tokens=64" in report
    assert json.loads((out / "results.json").read_text())["decode"][0]["cache"] == "GrowingCache"


def test_decode_cells_record_how_many_layers_ran_each_decode_method(llama, tmp_path):
    """patch_model's other_layers with a decode method of its own: the record counts the layers of each."""
    texts = [("a", _prompt(48, 4))]
    path = str(tmp_path / "results.jsonl")
    cell = Cell("local", 48, 1, "last")
    params = {"local": {**LOCAL_PARAMS["local"],
                        "other_layers": {"method": "local", **LOCAL_PARAMS["local"], "decode_method": "local",
                                         "decode_params": {"window": 8, "num_sink_tokens": 2}}}}
    (base, split) = run_decode_cells(llama, [baseline_cell(48), cell], lambda n: texts, path, steps=3,
                                     cell_cache="growing", baseline_cache="dynamic", method_params=params,
                                     progress=False, decode_method="exact")
    assert split["layer_decode"] == {"exact": 1, "local": 2} and split["decode_served"] == 18
    assert base["layer_decode"] == {}
    _, lines = decode_lines(read_jsonl(path))
    assert [x.split(" | ")[5] for x in lines if x.startswith("| 48 |")] == ["-", "exact (exact on 1, local on 2 layers)"]
