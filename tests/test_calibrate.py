"""calibrate(): per-layer cells, greedy plan with measured back-off, JSONL resume, held-out check, plans as data.

A tiny random Llama at 256 tokens, with candidates whose min_seq_len / window are small enough to serve there. The
time a method saves is real on real models; here it is injected (``time_calls``) so that the search is exercised
deterministically — at these sizes every method is slower than SDPA and nothing would ever be chosen.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import hf_sparse_attn
from hf_sparse_attn import PatchPlan, calibrate, patch_model, unpatch_model
from hf_sparse_attn.eval.model_bench import prefill_and_nll

sys.path.insert(0, str(Path(__file__).parent))
from tiny_checkpoint import build_tokenizer, save_tiny_checkpoint, tiny_llama  # noqa: E402

cal = importlib.import_module("hf_sparse_attn.eval.calibrate")

SMALL = {"min_seq_len": 16, "num_sink_tokens": 4}
CANDIDATES = {
    "local": [dict(SMALL, window=16), dict(SMALL, window=64)],
    "sparse_hyper": [dict(SMALL, causal_mode="single_pass", window=16, block_size=16, causal_min_seq_len=16)],
    "hyper": [dict(SMALL, causal_mode="single_pass", window=16, block_size=16, sample_size=16, causal_min_seq_len=16)],
}
METHODS = ["hyper", "sparse_hyper", "local"]


def fake_time_calls(run_exact, runs, repeats):
    """Exact 1 ms; local 0.4 ms (window 16) / 0.6 ms (window 64); the LSH methods 0.7 ms. The calls still run."""
    run_exact()
    times = {}
    for key, run in runs.items():
        run()
        times[key] = 0.4e-3 if key.startswith("local") and '"window": 16' in key else (
            0.6e-3 if key.startswith("local") else 0.7e-3)
    return 1e-3, times


@pytest.fixture
def fake_timing(monkeypatch):
    monkeypatch.setattr(cal, "time_calls", fake_time_calls)


def copy_batch(generator: torch.Generator, batch: int, period: int = 64, length: int = 256) -> torch.Tensor:
    """Random blocks of ``period`` tokens repeated to ``length``: the next token is found ``period`` positions back."""
    vocab = len(build_tokenizer())
    return torch.randint(4, vocab, (batch, period), generator=generator).repeat(1, length // period)


@pytest.fixture(scope="module")
def model():
    """A tiny Llama trained (~20 s on one core) to copy from 64 positions back: its attention matters, so a window
    shorter than 64 costs perplexity (a random model's loss barely depends on its attention)."""
    model = tiny_llama(len(build_tokenizer()), seed=0, num_layers=3).train()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        x = copy_batch(g, 8)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def texts():
    g = torch.Generator().manual_seed(3)
    return copy_batch(g, 2), copy_batch(g, 2)


def ppl_change(model, ids, plan=None) -> float:
    exact = [prefill_and_nll(model, row[None]) for row in ids]
    if plan is not None:
        patch_model(model, plan=plan)
    try:
        patched = [prefill_and_nll(model, row[None]) for row in ids]
    finally:
        if plan is not None:
            unpatch_model(model)
    tokens = sum(t for _, t, _ in exact)
    return math.exp((sum(n for n, _, _ in patched) - sum(n for n, _, _ in exact)) / tokens) - 1


def test_plan_holds_budget_measured_and_reports_heldout(model, texts, fake_timing):
    calib, held = texts
    budget = 0.02
    plan = calibrate(model, calib, budget=budget, methods=METHODS, candidates=CANDIDATES, heldout_ids=held,
                     progress=False)
    info = plan.calibration
    assert plan.patched_layers, "with local saving time in every layer, something fits a 2% budget"
    assert info["calibration_change"] <= budget
    single = [c for c in info["cells"] if c["loss_change"] is not None]
    assert max(c["loss_change"] for c in single) > budget  # the model is not indifferent: some cells cost too much
    chosen = {(r["layer"], r["method"]) for r in info["layers"] if r["choice"]}
    assert all(r["cost"] <= budget for r in info["layers"] if r["choice"]) and len(chosen) == len(plan.patched_layers)
    # measured again from scratch, the combined plan holds the budget on the calibration text
    again = ppl_change(model, calib, plan)
    assert again == pytest.approx(info["calibration_change"], abs=1e-9) and again <= budget
    # held-out numbers: measured on the other text, equal to an independent measurement, and in the report
    assert info["heldout"]["change"] == pytest.approx(ppl_change(model, held, plan), abs=1e-9)
    assert info["heldout"]["data_sha256"] != info["data_sha256"] and info["heldout"]["tokens"] == 2 * 255
    report = plan.report()
    assert "held-out text" in report and f"{100 * info['heldout']['change']:+.2f}%" in report
    assert f"budget {100 * budget:+.2f}%" in report
    # every served cell of a layer was measured alone; the proxy is ranked against the loss over those cells
    measured = [c for c in info["cells"] if c["loss_change"] is not None]
    assert len(measured) == 3 * 4  # 3 layers x 4 candidates, all served and all saving time
    assert info["proxy_spearman"]["n"] == 12 and info["proxy_spearman"]["rho"] is not None
    assert hf_sparse_attn.current_plan(model) is None  # calibrate leaves the model unpatched


def _cell(layer, cost, saving=1.0, method="local"):
    return cal.Cell(layer=layer, method=method, params={"window": layer}, served=True, cost=cost,
                    method_s=1.0, exact_s=1.0 + saving)


def test_backoff_when_single_costs_sum_within_budget_but_the_combination_does_not():
    cells = [_cell(0, 0.010, saving=3.0), _cell(1, 0.010, saving=2.0), _cell(2, 0.010, saving=1.0),
             _cell(2, 0.050, saving=9.0)]  # layer 2's second cell is over budget alone
    calls = []

    def measure(chosen):  # interactions: the combination of 3 layers costs far more than the sum
        calls.append(sorted(c.layer for c in chosen))
        return {1: 0.010, 2: 0.025, 3: 0.060}[len(chosen)]

    chosen, steps = cal.greedy_plan(cells, 0.035, measure)
    assert sum(c.cost for c in cells[:3]) <= 0.035  # summed, all three would fit
    assert [c.layer for c in chosen] == [0, 1]  # measured: the worst-ratio layer (2) is dropped
    assert calls == [[0, 1, 2], [0, 1]]
    assert [s["holds"] for s in steps] == [False, True] and steps[0]["change"] == 0.060


def test_greedy_order_and_output_error_bisection():
    cells = [_cell(0, 0.5, saving=1.0), _cell(1, 0.1, saving=1.0), _cell(2, -0.001, saving=0.5),
             _cell(3, 0.2, saving=-1.0)]  # layer 3 saves nothing: never chosen
    assert [c.layer for c in cal.greedy_order(cells)] == [2, 1, 0]
    chosen, steps = cal.greedy_plan(cells, 0.03, lambda ch: 0.01 * len(ch) ** 2, costs_in_budget_units=False)
    assert [c.layer for c in chosen] == [2]  # 1 layer: 0.01; 2 layers: 0.04 > 0.03
    assert all(s["holds"] == (s["change"] <= 0.03) for s in steps)


def test_resume_from_cache_remeasures_nothing(model, texts, fake_timing, tmp_path, monkeypatch):
    calib, held = texts
    cache = tmp_path / "cells.jsonl"
    counts = {"nll": 0, "layer": 0}
    real_nll, real_layer = cal.measure_nll, cal.measure_layer

    def counting_nll(*a, **k):
        counts["nll"] += 1
        return real_nll(*a, **k)

    def counting_layer(*a, **k):
        counts["layer"] += 1
        return real_layer(*a, **k)

    monkeypatch.setattr(cal, "measure_nll", counting_nll)
    monkeypatch.setattr(cal, "measure_layer", counting_layer)
    kwargs = dict(budget=0.02, methods=METHODS, candidates=CANDIDATES, heldout_ids=held, cache=cache, progress=False)
    first = calibrate(model, calib, **kwargs)
    full = dict(counts)
    assert full["layer"] == 3 * 2 and full["nll"] >= 1 + 12 + 1 + 2  # base, 12 cells, >=1 combined, held-out x2
    lines = cache.read_text().splitlines()
    assert len(lines) == full["nll"] + full["layer"]  # every measurement is one record

    counts.update(nll=0, layer=0)
    second = calibrate(model, calib, **kwargs)
    assert counts == {"nll": 0, "layer": 0}
    assert [(l.method, l.params) for l in second.layers] == [(l.method, l.params) for l in first.layers]
    assert second.calibration["heldout"] == first.calibration["heldout"]

    # a run killed half-way: the first half of the records and half a line survive; only the rest is measured
    keep = len(lines) // 2
    cache.write_text("\n".join(lines[:keep]) + "\n" + lines[keep][: len(lines[keep]) // 2])
    counts.update(nll=0, layer=0)
    third = calibrate(model, calib, **kwargs)
    assert counts["nll"] + counts["layer"] == len(lines) - keep
    assert [(l.method, l.params) for l in third.layers] == [(l.method, l.params) for l in first.layers]


def test_budget_zero_is_all_exact_without_measuring_cells(model, texts, monkeypatch):
    monkeypatch.setattr(cal, "measure_layer", lambda *a, **k: pytest.fail("budget 0 measures no cell"))
    plan = calibrate(model, texts[0], budget=0, methods=METHODS, candidates=CANDIDATES, progress=False)
    assert plan.patched_layers == [] and plan.calibration["calibration_change"] == 0.0
    assert "0/3 layers patched" in plan.report()


@pytest.mark.parametrize("kwargs, message", [
    ({"budget": -0.01}, "budget must be"), ({"budget": 3}, "0.03 for +3%"), ({"budget": float("nan")}, "budget"),
    ({"budget": "0.03"}, "budget"), ({"methods": ["nope"]}, "unknown method 'nope'"), ({"methods": []}, "empty"),
    ({"methods": ["exact"]}, "unknown method 'exact'"), ({"metric": "ppl"}, "metric must be one of"),
    ({"candidates": {"local": [{"windw": 3}]}}, "no parameter 'windw'"),
    ({"candidates": {"kmv": [{}]}}, "not in methods"), ({"layers": [7]}, "do not exist"),
])
def test_bad_arguments_are_clear_errors(model, texts, kwargs, message):
    args = dict(budget=0.03, methods=METHODS, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("+", r"\+").replace("(", r"\(")):
        calibrate(model, texts[0], **args)


def test_bad_ids_and_patched_model_are_errors(model, texts):
    with pytest.raises(ValueError, match="token ids"):
        calibrate(model, torch.randn(1, 16), budget=0.03, progress=False)
    patch_model(model, method="local", layers=[0])
    try:
        with pytest.raises(ValueError, match="unpatch_model"):
            calibrate(model, texts[0], budget=0.03, progress=False)
    finally:
        unpatch_model(model)


def test_plan_round_trip_patch_model_and_from_pretrained(tmp_path, fake_timing):
    model, _ = save_tiny_checkpoint(tmp_path / "ckpt")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, model.config.vocab_size, (1, 256), generator=g)
    plan = calibrate(model, ids, budget=0.05, methods=["local"], candidates={"local": CANDIDATES["local"]},
                     progress=False)
    assert plan.patched_layers
    plan.save(tmp_path / "plan.json")
    loaded = PatchPlan.load(tmp_path / "plan.json")
    assert loaded.calibration == json.loads(json.dumps(plan.calibration))  # budget, fingerprint, cells: all of it
    assert loaded.calibration["budget"] == 0.05 and loaded.calibration["data_sha256"] == cal.data_fingerprint([ids])
    assert [(l.method, l.params) for l in loaded.layers] == [(l.method, l.params) for l in plan.layers]

    applied = patch_model(model, plan=tmp_path / "plan.json")
    with torch.no_grad():
        out = model(ids).logits
    assert applied.patched_layers == plan.patched_layers and all(applied.layer(i).served == 1 for i in plan.patched_layers)
    model.save_pretrained(tmp_path / "patched")
    unpatch_model(model)
    with torch.no_grad():
        exact = model(ids).logits
    assert not torch.allclose(out, exact)  # the plan really approximates

    reloaded = hf_sparse_attn.from_pretrained(tmp_path / "patched")
    in_force = hf_sparse_attn.current_plan(reloaded)
    assert in_force.patched_layers == plan.patched_layers and in_force.calibration["budget"] == 0.05
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, out)


def test_cli_calibrate_writes_a_plan_and_resumes(tmp_path, fake_timing, capsys):
    from hf_sparse_attn.cli import main
    from tiny_checkpoint import WORDS

    save_tiny_checkpoint(tmp_path / "ckpt")
    g = torch.Generator().manual_seed(0)
    words = [WORDS[int(i)] for i in torch.randint(0, len(WORDS), (700,), generator=g)]
    (tmp_path / "cal.txt").write_text(" ".join(words[:400]))
    (tmp_path / "held.txt").write_text(" ".join(words[400:]))
    argv = ["calibrate", "--model", str(tmp_path / "ckpt"), "--text", str(tmp_path / "cal.txt"), "--heldout",
            str(tmp_path / "held.txt"), "--budget", "0.05", "--tokens", "128", "--methods", "local",
            "--candidates", json.dumps({"local": CANDIDATES["local"]}), "--out", str(tmp_path / "plan.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Calibrated plan: budget 5.00%" in out and "held-out text (2 text(s)" in out
    plan = PatchPlan.load(tmp_path / "plan.json")
    assert plan.calibration["texts"] == 3 and plan.calibration["budget"] == 0.05
    records = (tmp_path / "plan.json.cells.jsonl").read_text().splitlines()
    assert main(argv) == 0  # resumed: nothing measured again, nothing appended
    assert (tmp_path / "plan.json.cells.jsonl").read_text().splitlines() == records
    assert main(argv + ["--budget", "3"]) == 2  # a percentage where a fraction belongs
    assert "budget must be" in capsys.readouterr().err


def test_output_error_metric_measures_only_combined_plans_and_reuses_cached_losses(model, texts, fake_timing,
                                                                                    tmp_path, monkeypatch):
    calib, _ = texts
    calls = []
    real_nll = cal.measure_nll
    monkeypatch.setattr(cal, "measure_nll", lambda *a, **k: calls.append(1) or real_nll(*a, **k))
    cache = tmp_path / "cells.jsonl"
    plan = calibrate(model, calib, budget=0.02, methods=METHODS, candidates=CANDIDATES, metric="output_error",
                     cache=cache, progress=False)
    info = plan.calibration
    assert info["calibration_change"] <= 0.02 and info["steps"]  # combined plans measured by loss
    assert len(calls) == 1 + len(info["steps"])  # the exact loss and each combined plan: no single-layer loss
    assert all(c["cost"] == c["error"] for c in info["cells"]) and info["proxy_spearman"]["rho"] is None
    assert ppl_change(model, calib, plan) == pytest.approx(info["calibration_change"], abs=1e-9)
    calibrate(model, calib, budget=0.02, methods=METHODS, candidates=CANDIDATES, metric="loss", cache=cache,
              progress=False)
    again = calibrate(model, calib, budget=0.02, methods=METHODS, candidates=CANDIDATES, metric="output_error",
                      cache=cache, progress=False)
    assert again.calibration["proxy_spearman"]["n"] == 12  # the single-layer losses of the loss run rank the proxy
