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
from hf_sparse_attn.eval.bench import prefill_and_nll

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
                     progress=False, retrieval_budget=None, metric="loss")
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
    kwargs = dict(budget=0.02, methods=METHODS, candidates=CANDIDATES, heldout_ids=held, cache=cache, progress=False,
                  metric="loss", retrieval_budget=None)
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
    plan = calibrate(model, texts[0], budget=0, methods=METHODS, candidates=CANDIDATES, progress=False,
                     retrieval_budget=None)
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
    args = dict(budget=0.03, methods=METHODS, progress=False, retrieval_budget=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message.replace("+", r"\+").replace("(", r"\(")):
        calibrate(model, texts[0], **args)


def test_bad_ids_and_patched_model_are_errors(model, texts):
    with pytest.raises(ValueError, match="token ids"):
        calibrate(model, torch.randn(1, 16), budget=0.03, progress=False, retrieval_budget=None)
    patch_model(model, method="local", layers=[0])
    try:
        with pytest.raises(ValueError, match="unpatch_model"):
            calibrate(model, texts[0], budget=0.03, progress=False, retrieval_budget=None)
    finally:
        unpatch_model(model)


def test_plan_round_trip_patch_model_and_from_pretrained(tmp_path, fake_timing):
    model, _ = save_tiny_checkpoint(tmp_path / "ckpt")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, model.config.vocab_size, (1, 256), generator=g)
    plan = calibrate(model, ids, budget=0.05, methods=["local"], candidates={"local": CANDIDATES["local"]},
                     progress=False, retrieval_budget=None)
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
            "--candidates", json.dumps({"local": CANDIDATES["local"]}), "--retrieval-budget", "none",
            "--out", str(tmp_path / "plan.json")]
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
                     cache=cache, progress=False, retrieval_budget=None)
    info = plan.calibration
    assert info["calibration_change"] <= 0.02 and info["steps"]  # combined plans measured by loss
    assert len(calls) == 1 + len(info["steps"])  # the exact loss and each combined plan: no single-layer loss
    assert all(c["cost"] == c["error"] for c in info["cells"]) and info["proxy_spearman"]["rho"] is None
    assert ppl_change(model, calib, plan) == pytest.approx(info["calibration_change"], abs=1e-9)
    calibrate(model, calib, budget=0.02, methods=METHODS, candidates=CANDIDATES, metric="loss", cache=cache,
              progress=False, retrieval_budget=None)
    again = calibrate(model, calib, budget=0.02, methods=METHODS, candidates=CANDIDATES, metric="output_error",
                      cache=cache, progress=False, retrieval_budget=None)
    assert again.calibration["proxy_spearman"]["n"] == 12  # the single-layer losses of the loss run rank the proxy


# ---------------------------------------------------------------------------------------------------------
# The output-error search (regula falsi on prefix lengths), the proxy check, the fixed-plan comparison, the script
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("curve_seed", range(12))
def test_output_error_search_finds_the_longest_holding_prefix_in_few_steps(curve_seed):
    g = torch.Generator().manual_seed(curve_seed)
    n = 30
    increments = torch.rand(n, generator=g) ** 2 * 0.004  # a monotone, uneven combined change
    change = torch.cumsum(increments, 0).tolist()
    cells = [_cell(i, cost=0.1 + i, saving=1.0) for i in range(n)]  # the order is by layer
    budget = float(torch.rand(1, generator=g)) * change[-1] * 1.1
    measured = []

    def measure(chosen):
        measured.append(len(chosen))
        return change[len(chosen) - 1]

    chosen, steps = cal.greedy_plan(cells, budget, measure, costs_in_budget_units=False)
    best = max([0] + [k for k in range(1, n + 1) if change[k - 1] <= budget])
    assert len(chosen) == best and [c.layer for c in chosen] == list(range(best))
    assert len(measured) <= 8  # bisection over 30 prefixes needs 1 + 5; the clamped regula falsi at most 1 + 7
    assert all(s["holds"] == (s["change"] <= budget) for s in steps)
    # a second budget with the first one's measurements known: nothing measured twice
    known = {k: change[k - 1] for k in set(measured)}
    measured.clear()
    second, _ = cal.greedy_plan(cells, budget * 0.5, measure, costs_in_budget_units=False, known=known)
    assert not (set(measured) - {len(second)}) & set(known)  # the returned plan's step is recorded (a cache hit)


def test_output_error_search_with_everything_known_measures_only_the_plan_it_returns():
    cells = [_cell(i, cost=0.1 + i) for i in range(4)]
    calls = []
    chosen, steps = cal.greedy_plan(cells, 0.025, lambda ch: calls.append(len(ch)) or 0.01 * len(ch),
                                    costs_in_budget_units=False, known={1: 0.01, 2: 0.02, 3: 0.03, 4: 0.04})
    assert len(chosen) == 2 and calls == [2] and steps[-1]["holds"]  # the step the plan rests on is recorded


def test_proxy_check_ranks_error_against_single_layer_loss_and_resumes(model, texts, tmp_path, monkeypatch):
    calib, _ = texts
    cache = tmp_path / "cells.jsonl"
    cells = [(layer, "local", CANDIDATES["local"][0]) for layer in range(3)] + \
        [(layer, "sparse_hyper", CANDIDATES["sparse_hyper"][0]) for layer in range(3)]
    forwards = []
    real = cal.measure_nll
    monkeypatch.setattr(cal, "measure_nll", lambda *a, **k: forwards.append(1) or real(*a, **k))
    stops = iter([False, False, False, True])  # capture allowed, base, one cell, then stop
    partial = cal.proxy_check(model, calib[0], cells, cache=cache, progress=False,
                              should_stop=lambda: next(stops, True))
    assert not partial["complete"] and sum(c["loss_change"] is not None for c in partial["cells"]) == 1
    result = cal.proxy_check(model, calib[0], cells, cache=cache, progress=False)
    assert result["complete"] and len(forwards) == 1 + 6  # base + every cell once: the partial run's is reused
    assert result["spearman"]["n"] == 6 and result["spearman"]["rho"] is not None
    one = result["cells"][0]  # the loss change of a cell is the perplexity change with that layer alone replaced
    plan = cal._with_cells(cal._skeleton_plan(model, hf_sparse_attn.patches.find_adapter(model), 0),
                           [cal.Cell(0, "local", one["params"], True)])
    assert one["loss_change"] == pytest.approx(ppl_change(model, calib[:1], plan), abs=1e-9)
    assert 0 < one["error"] < 2
    again = cal.proxy_check(model, calib[0], cells, cache=cache, progress=False)
    assert len(forwards) == 7 and again["cells"] == result["cells"]  # all from the cache
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        cal.proxy_check(model, calib[0], [(9, "local", {})], progress=False)


def _fixed_records():
    """Two runs of a model benchmark on articles a, b, c: run r1 times exact on a, b and the plan on a; run r2 times
    exact on b, c and finishes the plan on b, c (its record marks a as resumed from r1). A second plan lacks c."""
    exact = {"a": (100.0, 10, 10.0), "b": (200.0, 10, 20.0), "c": (300.0, 10, 30.0)}
    art = lambda t, nll, s, run, resumed=False: {"title": t, "nll_sum": nll, "tokens": 10, "prefill_s": s,  # noqa: E731
                                                 "run_id": run, "resumed": resumed}
    return [
        {"kind": "cell", "key": "exact", "method": "exact", "run_id": "r1",
         "per_article": [art(t, n, s, "r1") for t, (n, _, s) in exact.items() if t != "c"]},
        {"kind": "baseline_rerun", "key": "exact", "method": "exact", "run_id": "r2",
         "per_article": [art("b", 200.0, 40.0, "r2"), art("c", 300.0, 60.0, "r2")]},
        {"kind": "cell", "key": "p1", "method": "local", "select": "weight_norm", "layers": 2, "seed": 0,
         "params": {"window": 4}, "run_id": "r2",
         "per_article": [art("a", 101.0, 5.0, "r1", True), art("b", 202.0, 20.0, "r2"), art("c", 303.0, 30.0, "r2")]},
        {"kind": "cell", "key": "p2", "method": "sparse_hyper", "select": "last", "layers": 1, "seed": 0,
         "params": {}, "run_id": "r1", "per_article": [art("a", 100.5, 8.0, "r1"), art("b", 201.0, 16.0, "r1")]},
    ]


def test_fixed_plans_are_scored_on_the_given_articles_with_same_run_speedups():
    rows = _script().fixed_plans_on(_fixed_records(), ["b", "c"], source="bench")
    assert [r["key"] for r in rows] == ["p1"]  # p2 lacks article c
    p1 = rows[0]
    assert p1["heldout_change"] == pytest.approx(math.exp((505.0 - 500.0) / 20) - 1)
    assert p1["heldout_speedup"] == pytest.approx((40.0 + 60.0) / (20.0 + 30.0))  # r2's exact times, not r1's
    assert p1["articles_timed"] == 2 and p1["label"] == "local w4, weight_norm, 2 layers"
    both = {r["key"]: r for r in _script().fixed_plans_on(_fixed_records(), ["a", "b"])}
    assert both["p1"]["heldout_speedup"] == pytest.approx((10.0 + 40.0) / (5.0 + 20.0))  # a with r1, b with r2
    assert both["p2"]["label"] == "sparse_hyper recursive, last, 1 layers"
    assert both["p2"]["heldout_speedup"] == pytest.approx((10.0 + 20.0) / (8.0 + 16.0))


def test_best_fixed_plan_and_goals():
    fixed = [{"label": "slow good", "heldout_change": 0.010, "heldout_speedup": 1.2},
             {"label": "fast", "heldout_change": 0.030, "heldout_speedup": 1.5},
             {"label": "fastest bad", "heldout_change": 0.080, "heldout_speedup": 1.9}]
    assert _script().best_fixed_plan(fixed, 0.035)["label"] == "fast"
    assert _script().best_fixed_plan(fixed, 0.030)["label"] == "fast"  # equal counts as no worse
    assert _script().best_fixed_plan(fixed, 0.005) is None
    plans = [{"budget": 0.03, "heldout_change": 0.035, "heldout_speedup": 1.70},
             {"budget": 0.01, "heldout_change": 0.025, "heldout_speedup": 1.40},
             {"budget": 0.05, "heldout_change": None, "heldout_speedup": None}]
    rows = _script().compare_budgets(plans, fixed)
    assert [r["budget"] for r in rows] == [0.01, 0.03, 0.05]
    low, mid, high = rows
    assert low["goal_quality"] is False and low["goal_speed"] is None  # 2.5% > 1% + 1 point; speed at 3% only
    assert low["best_fixed"]["label"] == "slow good" and low["vs_fixed"] == pytest.approx(1.40 / 1.2)
    assert mid["goal_quality"] is True and mid["vs_fixed"] == pytest.approx(1.70 / 1.5) and mid["goal_speed"] is True
    assert high["goal_quality"] is None and high["best_fixed"] is None  # no held-out check yet
    slower = _script().compare_budgets([{"budget": 0.03, "heldout_change": 0.002, "heldout_speedup": 1.05}], fixed)[0]
    assert slower["best_fixed"] is None and slower["best_fixed_speedup"] == 1.0 and slower["goal_speed"] is False
    md = _script().results_markdown(rows, [dict(f, source="s", articles=16, articles_timed=16, ) for f in fixed], None,
                              {"command": "x", "articles": {"calibration": ["a"], "heldout": ["b", "c"]}})
    assert "| 3% |" in md and "NOT met" in md and "fast (+3.00%, 1.50x)" in md and "not decided yet" in md
    assert "Compare speed-ups, not seconds" in md and "Not measured yet" in md and "(s) on the same machine" in md
    windows = _script().results_markdown([{"budget": 0.03, "choices": {"0": "local", "1": "local", "2": "local(window=512)",
                                                                  "3": "local", "5": "local"}}], [], None, {})
    assert "- 3%: local: 0-1, 3, 5; local(window=512): 2" in windows


def test_layer_ranges():
    assert _script().layer_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert _script().layer_ranges([3]) == "3" and _script().layer_ranges([]) == ""


def _script():
    spec = importlib.util.spec_from_file_location(
        "calibrate_smollm2", Path(__file__).parent.parent / "scripts" / "calibrate_smollm2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["--budgets", "3"], "budget must be"),
    (["--budgets", ","], "--budgets is empty"),
    (["--proxy", "some"], "invalid choice"),
    (["--methods", "nope"], "unknown method"),
    (["--layers", "1,x"], "--layers must be comma-separated"),
    (["--calib-articles", "0"], ">= 1"),
])
def test_script_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        _script().parse_args(argv)
    assert message in capsys.readouterr().err


def test_script_report_only_on_partial_results(model, texts, fake_timing, tmp_path):
    calib, held = texts
    out = tmp_path / "out"
    out.mkdir()
    plan = calibrate(model, calib, budget=0.03, methods=METHODS, candidates=CANDIDATES, metric="output_error",
                     heldout_ids=held, progress=False, retrieval_budget=None)
    plan.save(out / "plan_0.03.json")
    unchecked = calibrate(model, calib, budget=0.01, methods=METHODS, candidates=CANDIDATES, metric="output_error",
                          progress=False, retrieval_budget=None)
    unchecked.save(out / "plan_0.01.json")  # searched, not yet checked on held-out text
    (out / "articles.json").write_text(json.dumps({"tokens": 256, "calibration": ["a"], "heldout": ["b", "c"]}))
    fixed = tmp_path / "fixed.jsonl"
    fixed.write_text("\n".join(json.dumps(r) for r in _fixed_records()) + "\n")
    assert _script().main(["--report-only", "--out", str(out), "--fixed", str(fixed), "--tokens", "256"]) == 0
    result = json.loads((out / "results.json").read_text())
    by_budget = {r["budget"]: r for r in result["budgets"]}
    held_info = plan.calibration["heldout"]
    assert by_budget[0.03]["heldout_change"] == pytest.approx(held_info["change"])
    assert by_budget[0.03]["same_run"] is True and by_budget[0.01]["heldout_change"] is None
    assert [f["key"] for f in result["fixed"]] == ["p1"]
    md = (out / "results.md").read_text()
    assert "| 1% |" in md and "| 3% |" in md and (out / "frontier.png").stat().st_size > 1000


def test_upgrade_plans_let_a_layer_trade_up_to_a_faster_candidate():
    accurate = cal.Cell(0, "local", {"window": 1024}, True, cost=0.1, method_s=1.0, exact_s=2.0)  # saves 1.0
    fast = cal.Cell(0, "local", {"window": 512}, True, cost=0.3, method_s=0.0, exact_s=2.0)  # saves 2.0
    dominated = cal.Cell(0, "hyper", {}, True, cost=0.5, method_s=1.5, exact_s=2.0)  # costs more, saves less
    other = cal.Cell(1, "local", {"window": 1024}, True, cost=0.05, method_s=1.0, exact_s=2.0)
    plans = cal.upgrade_plans([fast, dominated, accurate, other])
    keys = [[(c.layer, c.params.get("window")) for c in p] for p in plans]
    assert keys == [[], [(1, 1024)], [(0, 1024), (1, 1024)], [(0, 512), (1, 1024)]]  # ratios 20, 10, 5
    assert [len(p) for p in cal.upgrade_plans([accurate, other])] == [0, 1, 2]  # one candidate each: the prefixes
    changes = {0: 0.0, 1: 0.01, 2: 0.02, 3: 0.05}
    chosen, _ = cal.greedy_plan([fast, accurate, other], 0.03, lambda ch: changes[
        next(k for k, p in enumerate(plans) if [c.key for c in p] == [c.key for c in ch])],
        costs_in_budget_units=False, plans=plans)
    assert [(c.layer, c.params["window"]) for c in chosen] == [(0, 1024), (1, 1024)]  # the trade-up costs 5%


def test_calibrate_upgrades_search_holds_the_budget(model, texts, fake_timing):
    calib, _ = texts
    plan = calibrate(model, calib, budget=0.02, methods=METHODS, candidates=CANDIDATES, metric="output_error",
                     search="upgrades", progress=False, retrieval_budget=None)
    assert plan.calibration["search"] == "upgrades" and plan.calibration["calibration_change"] <= 0.02
    assert ppl_change(model, calib, plan) == pytest.approx(plan.calibration["calibration_change"], abs=1e-9)
    with pytest.raises(ValueError, match="search must be one of"):
        calibrate(model, calib, budget=0.02, methods=METHODS, candidates=CANDIDATES, metric="loss",
                  search="upgrades", progress=False, retrieval_budget=None)
