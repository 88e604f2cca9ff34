"""calibrate(): the run-time estimate and max_minutes, the proxy-ranked search with its refinement, why a plan
has no layer, --candidates limiting the methods, and the retrieval check (fake probes; the RULER wiring with a
fake ruler module and with the real one on the tiny tokenizer).

The same tiny trained Llama as tests/test_calibrate.py (its fixtures are imported); the time a method saves is
injected there (``fake_timing``) so that the search is deterministic.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import pytest
import torch

import hf_sparse_attn
from hf_sparse_attn import PatchPlan, calibrate

sys.path.insert(0, str(Path(__file__).parent))
import test_calibrate as base  # noqa: E402
from tiny_checkpoint import WORDS, build_tokenizer, save_tiny_checkpoint  # noqa: E402

cal = importlib.import_module("hf_sparse_attn.eval.calibrate")
CANDIDATES, METHODS, fake_time_calls = base.CANDIDATES, base.METHODS, base.fake_time_calls
model, texts, fake_timing = base.model, base.texts, base.fake_timing  # the fixtures, shared


class FakeProbe:
    """Sample i scores ``exact[i]`` on the exact model and 0 on a model with any of ``breaks`` patched. Counts the
    calls per set of patched layers."""

    def __init__(self, exact=(100.0, 100.0, 100.0, 100.0), breaks=(), fingerprint="fake"):
        self.exact, self.breaks, self.fingerprint = list(exact), set(breaks), fingerprint
        self.calls: list[tuple[tuple[int, ...], int]] = []
        self.max_new_tokens = 4

    def __len__(self):
        return len(self.exact)

    def describe(self, index):
        return f"fake {index}"

    def __call__(self, model, index):
        plan = hf_sparse_attn.current_plan(model)
        patched = tuple(plan.patched_layers) if plan is not None else ()
        self.calls.append((patched, index))
        return 0.0 if self.breaks & set(patched) else self.exact[index]


def _cell(layer, cost, saving=1.0, key=0):
    return cal.Cell(layer=layer, method="local", params={"window": 100 + key}, served=True, cost=cost,
                    method_s=1.0, exact_s=1.0 + saving)


# ---------------------------------------------------------------------------------------------------------
# A: the estimate, the time budget, the proxy-ranked search with its refinement
# ---------------------------------------------------------------------------------------------------------

def test_estimate_counts_each_step():
    common = dict(forward_s=10.0, attention_s=0.5, texts=2, layers=30, candidates=4, timed_layers=3, repeats=1)
    fast = cal.estimate_run(metric="output_error", **common)
    steps = dict(fast.steps)
    assert steps["capture forwards"] == 20.0
    assert steps["output error of 30 layers x 4 candidates, timed on 3 layers"] == (2 * 30 * 5 + 3 * 1 * 5) * 0.5
    assert steps["combined plans"] == pytest.approx(cal.typical_search_forwards(30) * 2 * 10.0)
    assert 4 <= cal.typical_search_forwards(30) <= 5  # the prefix search measures ~4.4 plans on 30 layers
    assert not any(what.startswith("single-layer") for what, _ in fast.steps)
    slow = cal.estimate_run(metric="loss", **common)
    assert dict(slow.steps)["single-layer losses (up to 120 forwards)"] == 120 * 2 * 10.0
    assert slow.total_s > 5 * fast.total_s  # the per-cell loss is what made calibrate unusably slow
    probed = cal.estimate_run(metric="output_error", refine=1, heldout_texts=3, probe_samples=4, generate_s=7.0,
                              **common)
    extra = dict(probed.steps)
    assert extra["retrieval probe (4 samples: exact model + plan)"] == 2 * 4 * 7.0
    assert extra["held-out check"] == 2 * 3 * 10.0 and extra["1 refinement round(s)"] > 0
    assert probed.total_s == pytest.approx(sum(s for _, s in probed.steps))
    assert "estimated run time ~" in probed.text() and "retrieval probe" in probed.text()


def test_calibrate_prints_the_estimate_first_and_records_it(model, texts, fake_timing, capsys):
    plan = calibrate(model, texts[0], budget=0.02, methods=METHODS, candidates=CANDIDATES, retrieval_budget=None,
                     progress=True)
    err = capsys.readouterr().err
    assert "calibrate: estimated run time ~" in err and "capture forwards" in err
    info = plan.calibration
    assert info["estimate_s"] > 0 and info["elapsed_s"] > 0
    assert "run time: estimated ~" in plan.report()


def test_max_minutes_refuses_a_run_whose_mandatory_steps_do_not_fit(model, texts, monkeypatch):
    monkeypatch.setattr(cal, "measure_layer", lambda *a, **k: pytest.fail("nothing is measured past the refusal"))
    with pytest.raises(ValueError, match=r"more than max_minutes=1e-05.*fewer candidates"):
        calibrate(model, texts[0], budget=0.02, methods=METHODS, candidates=CANDIDATES, retrieval_budget=None,
                  max_minutes=1e-5, progress=False)
    for bad in (0, -1, float("nan"), "5", True):
        with pytest.raises(ValueError, match="max_minutes must be"):
            calibrate(model, texts[0], budget=0.02, methods=METHODS, retrieval_budget=None, max_minutes=bad,
                      progress=False)


@pytest.mark.parametrize("allowed, budget", [(0, 0.02), (1, 1e-5), (1, 0.5)])
def test_out_of_time_returns_the_best_plan_measured_so_far(model, texts, fake_timing, monkeypatch, allowed, budget):
    """The clock lets ``allowed`` combined plans through, then says the time is up."""
    asked = []

    def check(self, seconds, what):
        if what.startswith("the combined plan"):
            asked.append(what)
            if len(asked) > allowed:
                self.stopped = f"max_minutes reached: {what} was not started"
                raise cal.OutOfTime(self.stopped)

    monkeypatch.setattr(cal._Clock, "check", check)
    plan = calibrate(model, texts[0], budget=budget, methods=METHODS, candidates=CANDIDATES, metric="output_error",
                     retrieval_budget=None, max_minutes=60, progress=False)
    info = plan.calibration
    assert info["calibration_change"] <= budget  # whatever happened, the plan returned holds the budget
    if allowed == 0:  # nothing measured: all exact, and the report says the time ran out
        assert plan.patched_layers == [] and info["stopped"] and "stopped by the time budget" in info["why_exact"]
    elif budget < 1e-3:  # the first plan (all 3 layers) fails; the next one is refused
        assert len(asked) == 2 and plan.patched_layers == [] and info["stopped"]
        assert info["steps"] and not info["steps"][0]["holds"] and "time budget:" in plan.report()
    else:  # the first plan holds: nothing more to measure, no stop
        assert len(asked) == 1 and len(plan.patched_layers) == 3 and info["stopped"] is None


def test_prefix_search_skips_a_cell_that_breaks_the_budget_alone_and_searches_the_rest():
    """The proxy puts layer 0 first, but alone it costs 5% (the proxy's miss); the other layers cost 0.4% each."""
    cells = [_cell(i, cost=0.01 * (i + 1)) for i in range(6)]
    measured = {}

    def change(chosen):
        layers = {c.layer for c in chosen}
        value = (0.05 if 0 in layers else 0.0) + 0.004 * len(layers - {0})
        measured[cal._assignment_key(chosen)] = value
        return value

    def lookup(chosen):
        return 0.0 if not chosen else measured.get(cal._assignment_key(chosen))

    plain, _ = cal.greedy_plan(cells, 0.03, change, costs_in_budget_units=False)
    assert plain == []  # without refinement: every prefix holds layer 0, nothing is patched
    measured.clear()
    chosen, steps, skipped = cal.prefix_search(cells, 0.03, change, lookup, refine=1)
    assert [c.layer for c in skipped] == [0]
    assert [c.layer for c in chosen] == [1, 2, 3, 4, 5] and change(chosen) <= 0.03
    assert len(measured) <= 6  # a few combined plans, no single-layer loss per cell
    assert all(s["holds"] == (s["change"] <= 0.03) for s in steps)
    measured.clear()
    none, _, skipped = cal.prefix_search(cells, 0.03, change, lookup, refine=0)
    assert none == [] and skipped == []


def test_refinement_stops_when_the_budget_is_simply_used_up():
    cells = [_cell(i, cost=0.01 * (i + 1)) for i in range(8)]
    measured = {}

    def change(chosen):  # every layer costs the same 1%: the 4th breaks a 3.5% budget, not by its own fault
        measured[cal._assignment_key(chosen)] = 0.01 * len(chosen)
        return 0.01 * len(chosen)

    chosen, _, skipped = cal.prefix_search(cells, 0.035, change, lambda ch: 0.0 if not ch else measured.get(
        cal._assignment_key(ch)), refine=3)
    assert len(chosen) == 3 and skipped == []


def test_default_search_measures_no_single_layer_loss(model, texts, fake_timing, monkeypatch):
    calls = []
    real = cal.measure_nll
    monkeypatch.setattr(cal, "measure_nll", lambda *a, **k: calls.append(1) or real(*a, **k))
    plan = calibrate(model, texts[0], budget=0.02, methods=METHODS, candidates=CANDIDATES, retrieval_budget=None,
                     progress=False)
    info = plan.calibration
    assert info["metric"] == "output_error"  # the default: the proxy ranks, the loss is measured on plans only
    assert all(c["loss_change"] is None for c in info["cells"])
    assert len(calls) <= 1 + len(info["steps"]) and info["calibration_change"] <= 0.02


def test_timing_on_a_few_layers_gives_the_others_the_medians(model, texts, monkeypatch):
    timed = []

    def fake(run_exact, runs, repeats):
        timed.append(len(runs))
        return 1e-3, {key: 0.5e-3 for key in runs}

    monkeypatch.setattr(cal, "time_calls", fake)
    plan = calibrate(model, texts[0], budget=0.02, methods=["local"], candidates={"local": CANDIDATES["local"]},
                     retrieval_budget=None, timed_layers=1, progress=False)
    assert len(timed) == 1  # one layer timed (of 3)
    cells = plan.calibration["cells"]
    assert all(c["exact_s"] == 1e-3 and c["method_s"] == 0.5e-3 for c in cells if c["served"])
    assert cal.spread(list(range(30)), 4) == [0, 10, 19, 29] and cal.spread([3, 5], None) == [3, 5]


# ---------------------------------------------------------------------------------------------------------
# B: why a plan has no layer; --candidates limits the methods
# ---------------------------------------------------------------------------------------------------------

def test_no_candidate_served_says_why_and_what_to_change(model, texts, fake_timing):
    long = {"local": [{"window": 16, "min_seq_len": 4096}]}
    plan = calibrate(model, texts[0], budget=0.05, candidates=long, retrieval_budget=None, progress=False)
    assert plan.patched_layers == []
    why = plan.calibration["why_exact"]
    assert "no candidate served a call of 256 tokens" in why and "min_seq_len 4096" in why and "--tokens" in why
    assert "no layer patched: no candidate served" in plan.report()


def test_nothing_faster_and_budget_too_small_say_why(model, texts, monkeypatch):
    monkeypatch.setattr(cal, "time_calls", lambda run_exact, runs, repeats: (1e-3, {k: 2e-3 for k in runs}))
    slow = calibrate(model, texts[0], budget=0.05, candidates={"local": CANDIDATES["local"]}, retrieval_budget=None,
                     progress=False)
    assert slow.patched_layers == [] and "no served candidate was faster than exact attention" in \
        slow.calibration["why_exact"] and "0.50x" in slow.calibration["why_exact"]
    monkeypatch.setattr(cal, "time_calls", fake_time_calls)
    tight = calibrate(model, texts[0], budget=1e-6, candidates={"local": [dict(CANDIDATES["local"][0])]},
                      retrieval_budget=None, progress=False)
    if not tight.patched_layers:  # a window of 16 on a model that copies from 64 back costs more than 0.0001%
        assert "over the budget +0.00%: raise the budget" in tight.calibration["why_exact"]
    budget0 = calibrate(model, texts[0], budget=0, retrieval_budget=None, progress=False)
    assert budget0.calibration["why_exact"].startswith("budget 0")
    plan = calibrate(model, texts[0], budget=0.05, candidates={"local": CANDIDATES["local"]}, retrieval_budget=None,
                     progress=False)
    assert plan.patched_layers and plan.calibration["why_exact"] is None


def test_candidates_limit_the_methods_measured(model, texts, fake_timing, tmp_path, capsys):
    plan = calibrate(model, texts[0], budget=0.02, candidates={"local": CANDIDATES["local"]}, retrieval_budget=None,
                     progress=False)
    assert {m for m, _ in plan.calibration["candidates"]} == {"local"}
    both = calibrate(model, texts[0], budget=0.02, methods=["local", "hyper"], candidates={"local": CANDIDATES["local"]},
                     retrieval_budget=None, progress=False)  # methods given: hyper takes its default settings
    assert {m for m, _ in both.calibration["candidates"]} == {"local", "hyper"}

    from hf_sparse_attn.cli import main

    save_tiny_checkpoint(tmp_path / "ckpt")
    g = torch.Generator().manual_seed(0)
    (tmp_path / "cal.txt").write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (300,), generator=g)))
    argv = ["calibrate", "--model", str(tmp_path / "ckpt"), "--text", str(tmp_path / "cal.txt"), "--tokens", "128",
            "--candidates", json.dumps({"local": CANDIDATES["local"]}), "--retrieval-budget", "none",
            "--out", str(tmp_path / "plan.json")]
    assert main(argv) == 0
    saved = PatchPlan.load(tmp_path / "plan.json").calibration
    assert {m for m, _ in saved["candidates"]} == {"local"} and saved["retrieval"] is None
    assert "retrieval probe: off" in capsys.readouterr().out
    assert main(argv[:-2] + ["--retrieval-budget", "lots", "--out", str(tmp_path / "x.json")]) == 2
    assert "--retrieval-budget must be points" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# C: the retrieval check
# ---------------------------------------------------------------------------------------------------------

def test_a_tokenizer_is_required_while_the_check_is_on(model, texts):
    with pytest.raises(ValueError, match=r"pass tokenizer=\.\.\., or retrieval_budget=None"):
        calibrate(model, texts[0], budget=0.03, progress=False)
    with pytest.raises(ValueError, match="retrieval_budget must be points"):
        calibrate(model, texts[0], budget=0.03, retrieval_budget=500, probe=FakeProbe(), progress=False)


def test_retrieval_falls_back_to_the_longest_plan_that_passes(model, texts, fake_timing, tmp_path):
    calib, _ = texts
    free = calibrate(model, calib, budget=0.5, methods=METHODS, candidates=CANDIDATES, retrieval_budget=None,
                     progress=False)
    assert len(free.patched_layers) >= 2, "a 50% budget patches several layers"
    order = [layer for layer, _ in next(s for s in free.calibration["steps"] if s["holds"] and len(s["layers"]) ==
                                        len(free.patched_layers))["layers"]]
    culprit = order[-1]  # the last layer the search added breaks retrieval
    probe = FakeProbe(breaks={culprit})
    cache = tmp_path / "cells.jsonl"
    plan = calibrate(model, calib, budget=0.5, methods=METHODS, candidates=CANDIDATES, probe=probe,
                     retrieval_budget=5.0, cache=cache, progress=False)
    assert culprit not in plan.patched_layers and plan.patched_layers  # the longest plan without it
    assert len(plan.patched_layers) == len(free.patched_layers) - 1
    info = plan.calibration["retrieval"]
    assert info["exact_score"] == 100.0 and [s["score"] for s in info["exact_samples"]] == [100.0] * 4
    first = info["plans"][0]
    assert first["layers"] == len(free.patched_layers) and not first["passes"] and first["lost"] > 5.0
    assert first["samples_probed"] == 1  # a failing plan stops at its first lost sample
    final = next(p for p in info["plans"] if sorted(l for l, _ in p["cells"]) == sorted(plan.patched_layers))
    assert final["passes"] and final["lost"] <= 5.0 and final["change"] <= 0.5
    assert sum(1 for patched, _ in probe.calls if not patched) == 4  # the exact model is probed once
    report = plan.report()
    assert "retrieval probe (4 samples, budget 5 points): exact model 100.0" in report
    assert "fails: fall back to a smaller plan" in report and "passes" in report
    calls = len(probe.calls)
    again = calibrate(model, calib, budget=0.5, methods=METHODS, candidates=CANDIDATES, probe=probe,
                      retrieval_budget=5.0, cache=cache, progress=False)
    assert len(probe.calls) == calls and again.patched_layers == plan.patched_layers  # probes resume from the cache


def test_retrieval_budget_allows_a_partial_loss_and_skips_what_exact_misses(model, texts, fake_timing):
    calib, _ = texts
    breaks_everything = set(range(3))
    # the exact model misses samples 1 and 3: they are never probed on a plan; losing sample 0 costs 25 points
    probe = FakeProbe(exact=(100.0, 0.0, 100.0, 0.0), breaks=breaks_everything)
    strict = calibrate(model, calib, budget=0.5, methods=METHODS, candidates=CANDIDATES, probe=probe,
                       retrieval_budget=5.0, progress=False)
    assert strict.patched_layers == []
    assert "every plan probed lost more than retrieval_budget=5" in strict.calibration["why_exact"]
    assert all(index in (0, 2) for patched, index in probe.calls if patched)
    lenient = calibrate(model, calib, budget=0.5, methods=METHODS, candidates=CANDIDATES, probe=probe,
                        retrieval_budget=50.0, progress=False)
    assert lenient.patched_layers and lenient.calibration["retrieval"]["plans"][0]["lost"] == 50.0


def test_retrieval_never_returns_a_plan_over_the_budget_on_random_probes():
    """retrieval_fallback on nested plans whose probe results are arbitrary: whatever it returns passed."""
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 12, (1,), generator=g))
        ladder = [list(range(k)) for k in range(n + 1)]
        ok = {k: bool(torch.rand(1, generator=g) < 0.5) for k in range(1, n + 1)}
        asked = []
        index, last_passed = cal.retrieval_fallback(ladder, lambda plan: asked.append(len(plan)) or ok[len(plan)])
        assert index == 0 or (index in asked and ok[index])
        assert last_passed == ok[n] and len(asked) <= 1 + max(n - 1, 1).bit_length()


def test_the_ruler_probe_is_wired_to_the_ruler_api(monkeypatch):
    calls = {"generate": [], "predict": 0}

    def generate_sample(task, tokenizer, length, *, seed, index=0, depth=None, chat_template=True):
        calls["generate"].append((task, length, seed, index, depth, chat_template))
        return types.SimpleNamespace(id=f"{task}-{index}", task=task, length=length, prompt=f"p{index}",
                                     answers=[f"a{index}"], max_new_tokens=12, depth=depth)

    def predict(model, tokenizer, sample, *, chat_template=True):
        assert chat_template is False  # the plain prompt: the one the exact model answers (see RulerProbe)
        calls["predict"] += 1
        return sample.answers[0] if model == "good" else "nothing"

    def score(task, predictions, references):
        return 100.0 * sum(all(r in p for r in refs) for p, refs in zip(predictions, references)) / len(predictions)

    fake = types.ModuleType("hf_sparse_attn.eval.ruler")
    fake.generate_sample, fake.predict, fake.score = generate_sample, predict, score
    fake.LengthTooShortError = type("LengthTooShortError", (ValueError,), {})
    monkeypatch.setitem(sys.modules, "hf_sparse_attn.eval.ruler", fake)
    monkeypatch.setattr(sys.modules["hf_sparse_attn.eval"], "ruler", fake, raising=False)
    probe = cal.RulerProbe("tok", 2048, samples=4, seed=7)
    assert [c[0] for c in calls["generate"]] == ["passkey", "niah_single_1", "passkey", "passkey"]
    assert all(c[1] == 2048 and c[2] == 7 and c[5] is False for c in calls["generate"])
    assert calls["generate"][2][4] == 10.0
    assert len(probe) == 4 and probe.max_new_tokens == 12 and probe.fingerprint.startswith("ruler:2048:7:")
    assert probe("good", 1) == 100.0 and probe("bad", 1) == 0.0 and calls["predict"] == 2
    assert probe.describe(0) == "passkey at 50%"
    with pytest.raises(ValueError, match="probe_samples must be"):
        cal.RulerProbe("tok", 2048, samples=7)


def test_the_real_ruler_probe_on_the_tiny_tokenizer(model, texts, fake_timing, capsys):
    """The real hf_sparse_attn.eval.ruler: a probe too long for the calibration text is skipped with a note when the
    length was not asked for, an error when it was; at a length that holds the tasks, the exact model is probed."""
    pytest.importorskip("hf_sparse_attn.eval.ruler")
    tokenizer = build_tokenizer()
    plan = calibrate(model, texts[0][:, :40], budget=0.5, candidates={"local": CANDIDATES["local"]},
                     tokenizer=tokenizer, progress=False)
    if plan.calibration["retrieval"] and plan.calibration["retrieval"].get("skipped"):
        assert "the retrieval check is skipped" in plan.calibration["retrieval"]["skipped"]
        assert "retrieval probe: SKIPPED" in plan.report()
        with pytest.raises(ValueError, match="longer probe_length"):
            calibrate(model, texts[0][:, :40], budget=0.5, candidates={"local": CANDIDATES["local"]},
                      tokenizer=tokenizer, probe_length=40, progress=False)
    probe = cal.RulerProbe(tokenizer, 480, samples=2)
    assert [s.task for s in probe.samples] == ["passkey", "niah_single_1"] and len(probe) == 2
    assert 0.0 <= probe(model, 0) <= 100.0


def test_cli_probes_retrieval_by_default_with_the_model_tokenizer(tmp_path, fake_timing, monkeypatch, capsys):
    from hf_sparse_attn.cli import main

    built = []

    class Probe(FakeProbe):
        def __init__(self, tokenizer, length, samples, seed=0):
            built.append((hasattr(tokenizer, "decode") and hasattr(tokenizer, "eos_token_id"), length, samples))
            super().__init__(exact=(100.0,) * samples)

    monkeypatch.setattr(cal, "RulerProbe", Probe)
    save_tiny_checkpoint(tmp_path / "ckpt")
    g = torch.Generator().manual_seed(1)
    (tmp_path / "cal.txt").write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (300,), generator=g)))
    argv = ["calibrate", "--model", str(tmp_path / "ckpt"), "--text", str(tmp_path / "cal.txt"), "--tokens", "128",
            "--budget", "0.5", "--candidates", json.dumps({"local": CANDIDATES["local"]}), "--probe-samples", "3",
            "--out", str(tmp_path / "plan.json")]
    assert main(argv) == 0
    assert built == [(True, 128, 3)]  # the model's tokenizer, the calibration length
    out = capsys.readouterr()
    saved = PatchPlan.load(tmp_path / "plan.json").calibration
    if saved["layers"] and any(r["choice"] for r in saved["layers"]):
        assert saved["retrieval"]["budget"] == 5.0 and saved["retrieval"]["exact_score"] == 100.0
        assert "retrieval probe (3 samples, budget 5 points)" in out.out
    assert "estimated run time" in out.err
    assert main(argv[:-2] + ["--probe-length", "64", "--out", str(tmp_path / "p2.json")]) == 0
    assert built[-1][1] == 64
