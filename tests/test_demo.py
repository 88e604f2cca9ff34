"""The main job (`make demo` = `hf-sparse-attn demo`) on the real SmolLM2, at a short length so that CI can afford it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from hf_sparse_attn.eval.plots import plot_demo


@pytest.mark.slow
def test_demo_ranks_patches_the_recommended_plan_checks_and_reports(tmp_path):
    argv = [sys.executable, "-m", "hf_sparse_attn.cli", "demo", "--tokens", "2048", "--check-tokens", "256",
            "--plan-out", "plan.json", "--plot-out", "demo.png"]
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "(OK, limit 1e-5); unpatched bit-identical: True" in out  # the exactness check passed
    plan = json.loads((tmp_path / "plan.json").read_text())
    layers = sorted(plan["layers"], key=lambda entry: entry["layer_idx"])
    patched = [e for e in layers if e["method"] == "block_select"]
    assert len(patched) == 30  # the recommendation: block_select on every layer
    # recommended(model, tokenizer): local decode on the 20 layers of least needle mass on its pass-key probe, exact on
    # the 10 of most (layers 6, 7, 14, 18, 20-23, 26 and 29 on SmolLM2: eval/results/ruler_frontier_smollm2)
    assert sorted(e["layer_idx"] for e in patched if e["decode_method"] == "exact") == [6, 7, 14, 18, 20, 21, 22, 23,
                                                                                       26, 29]
    assert sum(e["decode_method"] == "local" for e in patched) == 20 and plan["select"] == "retrieval"
    # at 2048 tokens block_select's defaults run exact (below min_seq_len = 4096), and the plan says so on every patched
    # layer; so the patched model is the exact model and the table must show the same perplexity
    assert all(e["served"] == 0 and sum(e["fallbacks"].values()) == 1 for e in patched)
    table = {line.split("  ")[0]: line.split() for line in out.splitlines() if line.startswith(("exact (sdpa)", "block_select on"))}
    (exact_row,), (patched_row,) = ([v for k, v in table.items() if k.startswith(p)] for p in ("exact", "block_select"))
    assert float(exact_row[-1]) == pytest.approx(float(patched_row[-1]), rel=1e-4)
    assert 5.0 < float(exact_row[-1]) < 60.0  # the real model on real text
    assert "over 2047 scored tokens" in out and "figure to demo.png" in out
    # the timed prefills show progress (issue 32 item 16): one bar per prefill, counting SmolLM2's 30 decoder layers
    for name in ("exact prefill, 2048 tokens", "block_select prefill, 2048 tokens"):
        assert f"{name}: 100%" in result.stderr and "30/30" in result.stderr, result.stderr[-2000:]
    # the pass keys: three asked of both models; below min_seq_len the patched prefill is exact (and its decode is the
    # exact decode method), so both find the same keys, and the unpatched model finds the one at 50% at 2k
    found = re.search(r"^found: exact (\d)/3, block_select (\d)/3 ", out, re.M)
    exact_found, patched_found = int(found[1]), int(found[2])
    assert exact_found == patched_found >= 1 and "pass keys hidden in" in out, out[-1500:]
    assert (tmp_path / "demo.png").stat().st_size > 20_000


def test_plot_demo_refuses_losses_of_different_tokens(tmp_path):
    with pytest.raises(ValueError, match="same tokens"):
        plot_demo([1.0, 2.0], [1], [0.5] * 10, [0.5] * 9, str(tmp_path / "x.png"), method="hyper")
