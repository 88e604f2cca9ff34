"""`bench model --decode-tokens`: timed greedy decode steps against a KV cache (hf_sparse_attn/eval/bench/measure.py),
on tiny random Llama models."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch

from hf_sparse_attn import current_plan
from hf_sparse_attn.eval.bench import baseline_cell
from hf_sparse_attn.eval.bench.grid import Cell
from hf_sparse_attn.eval.bench.grid import run_decode_cells
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

    patched = compare_decode(llama, ids, 4, enter_cell=enter, exit_cell=leave, cell_first=True)
    assert events == ["enter", "exit"] and current_plan(llama) is None
    assert len(patched["cell"]["step_ms"]) == 4
    assert patched["baseline"]["tokens"] == _generate(llama, ids, 5)
    enter()
    try:
        assert patched["cell"]["tokens"] == _generate(llama, ids, 5)  # the patched model's own greedy tokens
    finally:
        unpatch_model(llama)


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
    assert all(a["same_tokens"] == 4 for a in exact)  # the same model with either cache: the same tokens
    assert exact[0]["cell_tokens"] == _generate(llama, texts[0][1], 4)
    again = run_decode_cells(llama, cells, lambda n: texts, path, steps=3, cell_cache="growing",
                             baseline_cache="dynamic", method_params=params, progress=False)
    assert again == [] and len([r for r in read_jsonl(path) if r["kind"] == "decode"]) == 2  # done: skipped
    rows, lines = decode_lines(read_jsonl(path))
    assert len(rows) == 2 and any("DynamicCache" in x and "GrowingCache" in x for x in lines)


@pytest.mark.integration  # bench model reads the offline Wikipedia articles
def test_cli_bench_model_decode_tokens(tmp_path):
    from tiny_checkpoint import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "bench"
    argv = [sys.executable, "-m", "hf_sparse_attn.cli", "bench", "model", "--model", str(tmp_path / "ckpt"), "--out",
            str(out), "--tokens", "64", "--articles", "2", "--methods", "local", "--layers", "0", "--no-profile",
            "--no-progress", "--calibration-tokens", "32", "--threads", "1", "--decode-tokens", "3",
            "--decode-cache", "growing", "--decode-baseline-cache", "dynamic"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    decode = [r for r in read_jsonl(str(out / "results.jsonl")) if r["kind"] == "decode"]
    assert [r["key"] for r in decode] == ["exact|N=64|layers=0|none|seed=0"]
    assert all(len(a["cell_step_ms"]) == 3 for a in decode[0]["per_article"]) and len(decode[0]["per_article"]) == 2
    report = (out / "results.md").read_text()
    assert "## Decode" in report and "| DynamicCache |" in report and "| GrowingCache |" in report
    assert json.loads((out / "results.json").read_text())["decode"][0]["cache"] == "GrowingCache"
