"""`hf-sparse-attn bench`: model-level and kernel-level benchmark machinery on tiny random models (cheap)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from hf_sparse_attn import current_plan
from hf_sparse_attn.eval import bench as mb
from hf_sparse_attn.eval.bench.kernel_suite import bench_on_inputs, random_qkv, relative_error, suite_cells


@pytest.fixture
def llama(tiny_model):
    return tiny_model("llama")


def _texts(n: int, count: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed + n)
    return [(f"text{i}", torch.randint(0, 101, (1, n), generator=g)) for i in range(count)]


# ---- perplexity -----------------------------------------------------------------------------------------

def test_prefill_and_nll_equals_full_logits_cross_entropy(llama):
    ids = torch.randint(0, 101, (1, 77), generator=torch.Generator().manual_seed(1))
    nll, tokens, seconds = mb.prefill_and_nll(llama, ids, loss_chunk=16)  # 16 does not divide 76: last chunk partial
    with torch.no_grad():
        logits = llama(ids).logits[0, :-1]
    mean_ce = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()  # independent: mean, natural log
    assert tokens == 76 and seconds > 0
    assert nll / tokens == pytest.approx(mean_ce, rel=1e-5)
    assert mb.perplexity(nll, tokens) == pytest.approx(math.exp(mean_ce), rel=1e-5)
    assert mb.perplexity(nll, tokens) != pytest.approx(2 ** mean_ce, rel=1e-3)  # not the exp2 slip
    with pytest.raises(ValueError, match=r"\[1, N\]"):
        mb.prefill_and_nll(llama, ids[0])


def test_cell_perplexity_pools_tokens_not_article_perplexities(llama):
    texts = [("a", _texts(40, 1, 1)[0][1]), ("b", _texts(40, 1, 2)[0][1])]
    rec = mb.run_cell(llama, mb.baseline_cell(40), texts)
    nlls = []
    for _, ids in texts:
        with torch.no_grad():
            logits = llama(ids).logits[0, :-1]
        nlls.append(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none"))
    pooled = math.exp(torch.cat(nlls).mean().item())
    assert rec["tokens_scored"] == 78 and rec["articles"] == 2
    assert rec["perplexity"] == pytest.approx(pooled, rel=1e-5)
    with pytest.raises(ValueError, match="needs 41"):
        mb.run_cell(llama, mb.baseline_cell(41), texts)


# ---- grid ---------------------------------------------------------------------------------------------------

def test_build_grid_structure():
    cells = mb.build_grid(["exact", "sparse_hyper"], [2048, 8192], [0, 8, 15, 30], ["weight_norm", "last", "random"],
                          random_seeds=[0, 1, 2], compare_selections_at=[15])
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys))
    for n in (2048, 8192):
        mine = [c for c in cells if c.tokens == n]
        assert mine[0].is_baseline and sum(c.is_baseline for c in mine) == 1  # one shared baseline, first
        assert sorted(c.layers for c in mine if c.select == "weight_norm") == [8, 15, 30]
        assert [c.layers for c in mine if c.select == "last"] == [15]
        assert sorted(c.seed for c in mine if c.select == "random") == [0, 1, 2]
        assert all(c.method == "sparse_hyper" for c in mine if not c.is_baseline)  # patching "exact" adds nothing
    assert len(cells) == 2 * (1 + 3 + 1 + 3)
    full = mb.build_grid(["hyper"], [4096], [0, 10, 20], ["weight_norm", "first"])
    assert len(full) == 1 + 2 * 2
    mixed = mb.build_grid(["sparse_hyper", "hyper"], [8192], [0, 15, 30], ["weight_norm", "last"], compare_selections_at=[15],
                          method_layers={"hyper": [30]}, compare_methods=["sparse_hyper"])
    assert sorted((c.method, c.layers, c.select) for c in mixed if not c.is_baseline) == [
        ("hyper", 30, "weight_norm"), ("sparse_hyper", 15, "last"), ("sparse_hyper", 15, "weight_norm"), ("sparse_hyper", 30, "weight_norm")]
    with pytest.raises(ValueError, match="unknown selection"):
        mb.build_grid(["hyper"], [4096], [10], ["weightnorm"])


def test_amdahl_ceiling():
    assert mb.amdahl_ceiling(0.5, 30, 30) == pytest.approx(2.0)
    assert mb.amdahl_ceiling(0.5, 15, 30) == pytest.approx(1 / 0.75)
    assert mb.amdahl_ceiling(0.3, 0, 30) == 1.0
    with pytest.raises(ValueError):
        mb.amdahl_ceiling(1.0, 30, 30)


# ---- running, resuming, speed-ups from the same run --------------------------------------------------------

class FakeClockScorer:
    """Real losses, but prefill seconds set by the test: ``base_s`` when the model is unpatched, ``patched_s`` else."""

    def __init__(self, base_s: float, patched_s: float):
        self.base_s, self.patched_s, self.calls = base_s, patched_s, 0

    def __call__(self, model, ids):
        self.calls += 1
        nll, tokens, _ = mb.prefill_and_nll(model, ids)
        return nll, tokens, self.base_s if current_plan(model) is None else self.patched_s


PARAMS = {"sparse_hyper": {"min_seq_len": 16, "block_size": 16, "num_sink_tokens": 0}}


def test_run_grid_records_resume_and_same_run_baseline(llama, tmp_path):
    out = str(tmp_path / "results.jsonl")
    texts = {64: _texts(64)}
    cells = mb.build_grid(["sparse_hyper"], [64], [0, 1, 3], ["weight_norm", "last"], compare_selections_at=[1])
    scorer = FakeClockScorer(2.0, 1.0)
    records = mb.run_grid(llama, cells, texts.__getitem__, out, method_params=PARAMS, profile=False, scorer=scorer, progress=False)
    done = mb.latest_cells(records)
    assert set(done) == {c.key for c in cells}
    base = done[mb.baseline_cell(64).key]
    wn3 = done[mb.Cell("sparse_hyper", 64, 3, "weight_norm").key]
    assert base["speedup"] == 1.0 and base["prefill_s"] == pytest.approx(4.0)  # 2 articles x 2.0 s
    assert wn3["speedup"] == pytest.approx(2.0) and wn3["baseline_prefill_s"] == pytest.approx(4.0)
    assert wn3["patched_layers"] == [0, 1, 2] and wn3["served"] == 3 * 2 and wn3["fallbacks"] == {}
    assert wn3["tokens_scored"] == base["tokens_scored"] == 2 * 63  # identical token sets
    assert wn3["perplexity"] != base["perplexity"]  # the method did change the attention
    last1 = done[mb.Cell("sparse_hyper", 64, 1, "last").key]
    assert last1["patched_layers"] == [2]
    assert len({r["run_id"] for r in done.values()}) == 1
    assert current_plan(llama) is None  # unpatched after every cell

    # resume: nothing left -> nothing runs
    calls = scorer.calls
    mb.run_grid(llama, cells, texts.__getitem__, out, method_params=PARAMS, profile=False, scorer=scorer, progress=False)
    assert scorer.calls == calls
    # a new cell in a later run (slower machine): its speed-up uses that run's own baseline, re-measured
    more = cells + [mb.Cell("sparse_hyper", 64, 2, "weight_norm")]
    scorer2 = FakeClockScorer(6.0, 1.5)
    records = mb.run_grid(llama, more, texts.__getitem__, out, method_params=PARAMS, profile=False, scorer=scorer2, progress=False)
    new = mb.latest_cells(records)[more[-1].key]
    assert new["speedup"] == pytest.approx(4.0) and new["baseline_prefill_s"] == pytest.approx(12.0)
    assert new["run_id"] != wn3["run_id"]
    reruns = [r for r in records if r["kind"] == "baseline_rerun"]
    assert len(reruns) == 1 and reruns[0]["run_id"] == new["run_id"]
    assert mb.latest_cells(records)[mb.baseline_cell(64).key]["prefill_s"] == pytest.approx(4.0)  # first result kept
    assert scorer2.calls == 1 + 2 + 2  # warm-up + baseline + the one new cell (2 articles each)


class CrashingScorer(FakeClockScorer):
    """Raises on call number ``crash_at`` (1-based), as a kill in the middle of a cell would stop the run."""

    def __init__(self, base_s: float, patched_s: float, crash_at: int):
        super().__init__(base_s, patched_s)
        self.crash_at = crash_at

    def __call__(self, model, ids):
        if self.calls + 1 == self.crash_at:
            raise KeyboardInterrupt("killed")
        return super().__call__(model, ids)


def test_run_grid_resumes_a_cell_from_its_finished_articles(llama, tmp_path):
    out = str(tmp_path / "results.jsonl")
    texts = {64: _texts(64, count=3)}
    cell = mb.Cell("sparse_hyper", 64, 2, "weight_norm")
    cells = [mb.baseline_cell(64), cell]
    clean = mb.run_grid(llama, cells, texts.__getitem__, str(tmp_path / "clean.jsonl"), method_params=PARAMS,
                        profile=False, scorer=FakeClockScorer(2.0, 1.0), progress=False)
    # calls: 1 warm-up, then per article the baseline and the cell: killed during the cell's third article
    with pytest.raises(KeyboardInterrupt):
        mb.run_grid(llama, cells, texts.__getitem__, out, method_params=PARAMS, profile=False,
                    scorer=CrashingScorer(2.0, 1.0, crash_at=1 + 2 + 2 + 2), progress=False)
    assert current_plan(llama) is None  # the kill did not leave the model patched
    saved = [(r["key"], r["title"]) for r in mb.read_jsonl(out) if r["kind"] == "article"]
    assert saved == [(cell.key, "text0"), (cell.key, "text1")]  # the baseline's times serve one run's ratios only
    assert cell.key not in mb.finished_keys(mb.read_jsonl(out))
    resumed_scorer = FakeClockScorer(4.0, 1.0)  # a slower machine for the baseline of the second run
    records = mb.run_grid(llama, cells, texts.__getitem__, out, method_params=PARAMS, profile=False,
                          scorer=resumed_scorer, progress=False)
    # warm-up, the baseline (not finished before the kill) on every article, the cell on the lost article only
    assert resumed_scorer.calls == 1 + 3 + 1
    done, reference = mb.latest_cells(records)[cell.key], mb.latest_cells(clean)[cell.key]
    assert [a["title"] for a in done["per_article"]] == ["text0", "text1", "text2"]
    assert done["perplexity"] == pytest.approx(reference["perplexity"], rel=1e-6)
    assert done["articles_timed"] == 1 and done["speedup"] == pytest.approx(4.0)  # this run's baseline of text2 only


class OrderScorer(FakeClockScorer):
    """Records which plan (None or its patched layers) scored which article, in call order."""

    def __init__(self, base_s: float, patched_s: float):
        super().__init__(base_s, patched_s)
        self.order = []

    def __call__(self, model, ids):
        plan = current_plan(model)
        self.order.append((None if plan is None else tuple(plan.patched_layers), int(ids[0, :8].sum())))
        return super().__call__(model, ids)


def test_run_grid_times_the_baseline_and_the_cells_article_by_article(llama, tmp_path):
    """Drift of the machine during a run must reach both sides of a ratio: each article is scored exact, then by every
    patched cell, before the next article (not every article exact, then every article patched)."""
    texts = _texts(64, count=3)
    cells = [mb.baseline_cell(64), mb.Cell("sparse_hyper", 64, 2, "weight_norm"), mb.Cell("sparse_hyper", 64, 1, "last")]
    scorer = OrderScorer(2.0, 1.0)
    records = mb.run_grid(llama, cells, {64: texts}.__getitem__, str(tmp_path / "r.jsonl"), method_params=PARAMS,
                          profile=False, scorer=scorer, progress=False)
    done = mb.latest_cells(records)
    plans = [None, tuple(done[cells[1].key]["patched_layers"]), tuple(done[cells[2].key]["patched_layers"])]
    assert len(plans[1]) == 2 and plans[2] == (2,)
    article = [int(ids[0, :8].sum()) for _, ids in texts]
    assert len(set(article)) == 3 and scorer.order[1:] == [(plan, a) for a in article for plan in plans]
    assert done[cells[1].key]["served"] == 2 * 3 and done[cells[2].key]["served"] == 1 * 3  # every patch counted
    assert [a["title"] for a in done[cells[2].key]["per_article"]] == ["text0", "text1", "text2"]
    rows = mb.summarize(records, 3)["rows"]
    assert all(r["timing"] == "paired by article" for r in rows)
    report = mb.model_report_markdown({**mb.summarize(records, 3), "profiles": {}}, [], header_lines=["# t"])
    assert "timed article by article in turn" in report and "†" not in report
    # a directory holding an earlier run's cells (timed in two halves) beside paired ones marks the paired speed-ups
    old = [dict(r, timing=None) if r.get("key") == cells[2].key else r for r in records]
    report = mb.model_report_markdown({**mb.summarize(old, 3), "profiles": {}}, [], header_lines=["# t"])
    # the exact row and cells[1] (its interval printed before the mark: every article 2.0 s exact, 1.0 s patched)
    assert "marked †" in report and report.count("| 1.00x †") == 1 and report.count("| 2.00x [2.00, 2.00] †") == 1
    assert "| 2.00x [2.00, 2.00] |" in report  # cells[2], older: unmarked


def _cell_record(key: str, layers: int, run_id: str, times: list, nll: list, kind: str = "cell") -> dict:
    return {"kind": kind, "key": key, "method": "exact" if layers == 0 else "local", "tokens": 64, "layers": layers,
            "select": "weight_norm", "seed": 0, "run_id": run_id, "tokens_scored": 3 * 63,
            "perplexity": math.exp(sum(nll) / (3 * 63)), "articles": 3, "prefill_s": sum(times),
            "per_article": [{"title": f"t{i}", "nll_sum": n, "tokens": 63, "prefill_s": t}
                            for i, (t, n) in enumerate(zip(times, nll))]}


def test_summary_gives_bootstrap_intervals_over_articles_against_the_same_runs_baseline():
    """The speed-up interval pairs each article with the exact time of the cell's own run (a later run's
    baseline_rerun), the perplexity change interval with the exact model's loss on the same article."""
    from hf_sparse_attn.eval.bench.measure import perplexity_change_interval, ratio_interval

    exact = _cell_record("exact|64", 0, "A", [2.0, 4.0, 3.0], [100.0, 110.0, 120.0])
    early = dict(_cell_record("local|64|1", 1, "A", [1.0, 1.0, 2.0], [101.0, 115.0, 121.0]), speedup=9 / 4)
    rerun = _cell_record("exact|64", 0, "B", [4.0, 8.0, 6.0], [100.0, 110.0, 120.0], kind="baseline_rerun")
    later = dict(_cell_record("local|64|2", 2, "B", [1.0, 2.0, 2.0], [102.0, 111.0, 130.0]), speedup=18 / 5)
    rows = {r["key"]: r for r in mb.summarize([exact, early, rerun, later], 3)["rows"]}
    assert rows["exact|64"]["speedup_ci"] is None and rows["exact|64"]["ppl_change_ci"] is None
    assert rows["local|64|1"]["speedup_ci"] == list(ratio_interval([2.0, 4.0, 3.0], [1.0, 1.0, 2.0]))
    assert rows["local|64|2"]["speedup_ci"] == list(ratio_interval([4.0, 8.0, 6.0], [1.0, 2.0, 2.0]))  # run B's
    assert rows["local|64|2"]["ppl_change_ci"] == list(perplexity_change_interval(
        [100.0, 110.0, 120.0], [102.0, 111.0, 130.0], [63, 63, 63]))
    for r in (rows["local|64|1"], rows["local|64|2"]):
        lo, hi = r["speedup_ci"]
        assert lo < r["speedup"] < hi
        lo, hi = r["ppl_change_ci"]
        assert lo < r["ppl_change_pct"] < hi
    # every article changed by the same loss per token: the interval collapses onto the change
    lo, hi = perplexity_change_interval([10.0, 20.0], [11.0, 21.0], [50, 50])
    assert lo == pytest.approx(100 * math.expm1(2 / 100)) and hi == pytest.approx(lo)
    with pytest.raises(ValueError, match="one token count per article"):
        perplexity_change_interval([1.0], [1.0, 2.0], [5])


def test_run_grid_extends_finished_cells_to_more_articles(llama, tmp_path):
    """A grid run on 2 articles, then asked for 3: no cell is skipped as finished; each computes the third article
    only, the baseline is timed on it alone, and the result equals a clean 3-article run."""
    out = str(tmp_path / "results.jsonl")
    three = _texts(64, count=3)
    cells = [mb.baseline_cell(64), mb.Cell("sparse_hyper", 64, 2, "weight_norm"), mb.Cell("sparse_hyper", 64, 1, "last")]
    clean = mb.latest_cells(mb.run_grid(llama, cells, {64: three}.__getitem__, str(tmp_path / "clean.jsonl"),
                                        method_params=PARAMS, profile=False, scorer=FakeClockScorer(2.0, 1.0), progress=False))
    mb.run_grid(llama, cells, {64: three[:2]}.__getitem__, out, method_params=PARAMS, profile=False,
                scorer=FakeClockScorer(2.0, 1.0), progress=False)
    assert mb.finished_keys(mb.read_jsonl(out), lambda n: [t for t, _ in three]) == set()
    later = FakeClockScorer(6.0, 2.0)  # the later run's machine is slower: its speed-ups use its own timings
    records = mb.run_grid(llama, cells, {64: three}.__getitem__, out, method_params=PARAMS, profile=False,
                          scorer=later, progress=False)
    assert later.calls == 1 + 1 + 2  # warm-up, baseline on text2, each patched cell on text2
    done = mb.latest_cells(records)
    for cell in cells:
        assert [a["title"] for a in done[cell.key]["per_article"]] == ["text0", "text1", "text2"]
        assert done[cell.key]["perplexity"] == pytest.approx(clean[cell.key]["perplexity"], rel=1e-6)
    wn = done[cells[1].key]
    assert wn["articles_timed"] == 1 and wn["speedup"] == pytest.approx(3.0) and wn["baseline_prefill_s"] == pytest.approx(6.0)
    # a cell left on 2 articles is compared with the exact model on those 2, not on the baseline's 3
    records.append({**done[cells[2].key], "per_article": done[cells[2].key]["per_article"][:2],
                    "perplexity": math.exp(
                        sum(a["nll_sum"] for a in done[cells[2].key]["per_article"][:2]) / 126)})
    rows = {r["key"]: r for r in mb.summarize(records, num_layers=3)["rows"]}
    assert rows[cells[1].key]["articles_timed"] == 1 and rows[cells[1].key]["prefill_s_timed"] == pytest.approx(2.0)
    base2 = done[mb.baseline_cell(64).key]["per_article"][:2]
    exact2 = math.exp(sum(a["nll_sum"] for a in base2) / 126)
    assert rows[cells[2].key]["exact_perplexity"] == pytest.approx(exact2)
    assert rows[cells[2].key]["ppl_change_pct"] == pytest.approx(100 * (records[-1]["perplexity"] / exact2 - 1))


def test_read_jsonl_ignores_a_line_cut_by_a_crash(tmp_path):
    path = str(tmp_path / "r.jsonl")
    mb.append_jsonl(path, {"kind": "cell", "key": "a"})
    with open(path, "a") as f:
        f.write('{"kind": "cell", "key": "b", "perpl')
    assert mb.finished_keys(mb.read_jsonl(path)) == {"a"}
    assert mb.read_jsonl(str(tmp_path / "missing.jsonl")) == []


def test_measured_selection_uses_one_calibration(llama, tmp_path):
    calls = []

    def order():
        calls.append(1)
        return mb.selection_order_measured(llama, _texts(48, 1, 7)[0][1])

    cells = [mb.baseline_cell(64), mb.Cell("sparse_hyper", 64, 1, "measured"), mb.Cell("sparse_hyper", 64, 2, "measured")]
    records = mb.run_grid(llama, cells, {64: _texts(64)}.__getitem__, str(tmp_path / "r.jsonl"), method_params=PARAMS,
                          measured_order_for=order, profile=False, progress=False)
    assert len(calls) == 1
    expected = order()
    done = mb.latest_cells(records)
    assert sorted(expected) == [0, 1, 2]
    assert done[cells[1].key]["patched_layers"] == [expected[0]]
    assert done[cells[2].key]["patched_layers"] == sorted(expected[:2])


def test_retrieval_selection_patches_the_least_needle_layers_once_computed(llama, tmp_path):
    """select="retrieval" cells take the needle-mass order (computed once, on a pass-key probe); the default grid
    leaves it out (it needs a tokenizer and is asked for by name)."""
    from hf_sparse_attn.eval.bench.grid import DEFAULT_SELECTIONS, selection_order_retrieval
    from hf_sparse_attn.commands import bench_options
    from tiny_checkpoint import build_tokenizer

    tokenizer = build_tokenizer()
    calls = []

    def order():
        calls.append(1)
        return selection_order_retrieval(llama, tokenizer, length=200)

    cells = [mb.baseline_cell(64), mb.Cell("sparse_hyper", 64, 1, "retrieval"), mb.Cell("sparse_hyper", 64, 2, "retrieval")]
    records = mb.run_grid(llama, cells, {64: _texts(64)}.__getitem__, str(tmp_path / "r.jsonl"), method_params=PARAMS,
                          retrieval_order_for=order, profile=False, progress=False)
    expected = order()
    assert len(calls) == 2 and sorted(expected) == [0, 1, 2]  # once in the grid, once here
    done = mb.latest_cells(records)
    assert done[cells[1].key]["patched_layers"] == [expected[0]]
    assert done[cells[2].key]["patched_layers"] == sorted(expected[:2])
    with pytest.raises(ValueError, match="retrieval_order_for"):
        mb.run_grid(llama, cells[1:2], {64: _texts(64)}.__getitem__, str(tmp_path / "other.jsonl"),
                    method_params=PARAMS, profile=False, progress=False)
    assert "retrieval" not in DEFAULT_SELECTIONS and bench_options.DEFAULT_SELECTIONS == DEFAULT_SELECTIONS


def test_profile_attention_share(llama):
    prof = mb.profile_attention_share(llama, _texts(96, 1)[0][1])
    assert prof["sdpa_calls"] == 3 and prof["attention_module_calls"] == 3  # one per layer
    assert 0 < prof["sdpa_s"] <= prof["attention_module_s"] <= prof["wall_s"] * 1.05
    assert prof["sdpa_share"] == pytest.approx(prof["sdpa_s"] / prof["wall_s"])


# ---- summaries, goals, report ------------------------------------------------------------------------------

def _row(method, layers, select, ppl, speedup, seed=0, tokens=8192):
    return {"kind": "cell", "key": mb.Cell(method, tokens, layers, select, seed).key, "method": method, "tokens": tokens,
            "layers": layers, "select": select, "seed": seed, "perplexity": ppl, "tokens_scored": 100, "articles": 1,
            "prefill_s": 10.0 / speedup, "baseline_prefill_s": 10.0, "speedup": speedup, "run_id": "r", "served": 1, "fallbacks": {},
            "per_article": [{"title": "a", "nll_sum": 100 * math.log(ppl), "tokens": 100, "prefill_s": 10.0 / speedup}]}


def _write_report(out, records, goals=()):
    """Write ``records`` as out/results.jsonl, build the report from it: (result dict, results.md text)."""
    os.makedirs(out)
    with open(out / "results.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    result = mb.write_model_results(str(out), 4, header_lines=["# test"], goals=goals)
    return result, (out / "results.md").read_text()


GOALS = [{"text": "half the layers within +5%", "method": "sparse_hyper", "layers": 2, "at_most": 5.0},
         {"text": "weight_norm beats last and random", "method": "sparse_hyper", "layers": 2, "beats": ["last", "random"]},
         {"text": "speed-up on every layer", "method": "sparse_hyper", "layers": 4},
         {"text": "half the layers within +3%", "method": "sparse_hyper", "layers": 2, "at_most": 3.0},
         {"text": "at 1024 tokens", "method": "sparse_hyper", "layers": 2, "tokens": 1024, "at_most": 5.0}]


def test_goals_and_report(tmp_path):
    records = [
        _row("exact", 0, "none", 10.0, 1.0),
        _row("sparse_hyper", 2, "weight_norm", 10.4, 1.3), _row("sparse_hyper", 2, "last", 10.3, 1.3),
        _row("sparse_hyper", 2, "random", 10.9, 1.3, seed=0), _row("sparse_hyper", 2, "random", 10.1, 1.3, seed=1),
        _row("sparse_hyper", 4, "weight_norm", 12.0, 1.6),
        {"kind": "profile", "tokens": 8192, "wall_s": 10.0, "sdpa_s": 4.0, "attention_module_s": 5.0, "sdpa_share": 0.4,
         "attention_module_share": 0.5, "sdpa_calls": 4, "attention_module_calls": 4},
    ]
    summary = mb.summarize(records, num_layers=4)
    rows = {r["key"]: r for r in summary["rows"]}
    assert rows[mb.Cell("sparse_hyper", 8192, 2, "weight_norm").key]["ppl_change_pct"] == pytest.approx(4.0)
    assert rows[mb.Cell("sparse_hyper", 8192, 4, "weight_norm").key]["amdahl_ceiling"] == pytest.approx(1 / 0.6)
    (group,) = summary["random"]
    assert group["mean_perplexity"] == pytest.approx(10.5) and group["seeds"] == 2
    goals = mb.evaluate_goals(summary, GOALS)
    assert [g["status"] for g in goals] == ["MET", "NOT MET", "REPORTED", "NOT MET", "NOT MEASURED"]
    # +4% is within 5%; weight_norm 10.4 loses to last 10.3 (and beats the random mean 10.5); not within 3%
    assert "beats 1/2 seeds" in goals[1]["detail"] and "last 10.300" in goals[1]["detail"]
    assert "1.67x" in goals[2]["detail"]  # Amdahl ceiling 1 / (1 - 0.4)
    assert "+4.0% (at most +3.0%)" in goals[3]["detail"] and "not run" in goals[4]["detail"]

    result, md = _write_report(tmp_path / "out", records, goals=GOALS)
    assert "**NOT MET** — weight_norm beats last and random" in md and "| 8192 | sparse_hyper | 4 | weight_norm |" in md
    assert [g["status"] for g in result["goals"]] == [g["status"] for g in goals]
    assert result["plots"] == ["ppl_vs_speedup_8192.png", "selections_by_article_sparse_hyper_2layers_8192.png"] and (tmp_path / "out" / "ppl_vs_speedup_8192.png").stat().st_size > 1000
    # an experiment without [[goal]] tables: no goals section
    no_goals = mb.write_model_results(str(tmp_path / "out"), 4, header_lines=["# test"])
    md = (tmp_path / "out" / "results.md").read_text()
    assert no_goals["goals"] == [] and "## Goals" not in md and "| 8192 | sparse_hyper | 4 | weight_norm |" in md


def test_goal_specs_are_checked():
    from hf_sparse_attn.eval.bench.goals import check_goal_spec

    with pytest.raises(ValueError, match="unknown key"):
        check_goal_spec({"text": "x", "method": "m", "layers": 2, "at_mots": 5})
    with pytest.raises(ValueError, match="missing"):
        check_goal_spec({"text": "x", "layers": 2})
    with pytest.raises(ValueError, match="not both"):
        check_goal_spec({"text": "x", "method": "m", "layers": 2, "at_most": 5, "beats": ["last"]})


def test_goals_of_a_method_that_served_nothing_are_not_applicable():
    """A cell whose every call fell back (outside the method's regime) is the exact model: same perplexity, a speed-up
    that is timing noise. Its goals must not read as MET."""
    fell_back = {**_row("feature_sketch", 2, "weight_norm", 10.0, 1.09), "served": 0,
                 "fallbacks": {"feature_sketch: head dim d=64 < min_dim_ratio*n": 40}}
    records = [_row("exact", 0, "none", 10.0, 1.0), fell_back, {**_row("feature_sketch", 4, "weight_norm", 10.0, 1.02), "served": 0}]
    profile = {"kind": "profile", "tokens": 8192, "wall_s": 10.0, "sdpa_s": 4.0, "attention_module_s": 5.0,
               "sdpa_share": 0.4, "attention_module_share": 0.5, "sdpa_calls": 4, "attention_module_calls": 4}
    specs = [{"text": "half", "method": "feature_sketch", "layers": 2, "at_most": 5.0},
             {"text": "beats", "method": "feature_sketch", "layers": 2, "beats": ["last"]},
             {"text": "all", "method": "feature_sketch", "layers": 4}]
    goals = mb.evaluate_goals(mb.summarize(records + [profile], num_layers=4), specs)
    assert [g["status"] for g in goals] == ["NOT APPLICABLE", "NOT APPLICABLE", "NOT APPLICABLE"]
    assert "served no call" in goals[0]["detail"] and "min_dim_ratio*n (40 calls)" in goals[0]["detail"]
    assert "no reason recorded" in goals[2]["detail"]


def _article_cell(select, nll_per_article, seed=0, layers=2):
    """A finished cell with per-article losses (100 tokens per article)."""
    per_article = [{"title": f"art{i}", "nll_sum": nll, "tokens": 100, "prefill_s": 1.0} for i, nll in enumerate(nll_per_article)]
    nll_sum = sum(nll_per_article)
    cell = mb.Cell("exact" if layers == 0 else "sparse_hyper", 8192, layers, "none" if layers == 0 else select, seed)
    return {"kind": "cell", "key": cell.key, "method": cell.method, "tokens": 8192, "layers": layers, "select": cell.select,
            "seed": seed, "perplexity": math.exp(nll_sum / (100 * len(nll_per_article))), "per_article": per_article,
            "tokens_scored": 100 * len(nll_per_article), "prefill_s": 3.0, "speedup": 1.0, "served": 1}


def test_selection_comparison_is_paired_by_article(tmp_path):
    records = [_article_cell("none", [200.0, 300.0, 250.0], layers=0),
               _article_cell("weight_norm", [210.0, 310.0, 270.0]),
               _article_cell("last", [215.0, 305.0, 280.0]),      # worse on articles 0 and 2, better on 1
               _article_cell("random", [205.0, 320.0, 260.0], seed=0),
               _article_cell("weight_norm", [230.0, 330.0, 260.0], layers=3)]  # alone at 3 layers: no comparison
    (group,) = mb.selection_comparison(records)
    assert (group["method"], group["layers"], group["titles"]) == ("sparse_hyper", 2, ["art0", "art1", "art2"])
    rows = {r["select"]: r for r in group["rows"]}
    assert list(rows) == ["weight_norm", "last", "random"]  # weight_norm first
    assert rows["last"]["weight_norm_lower_on"] == 2 and rows["random"]["weight_norm_lower_on"] == 1
    # per article: exp((nll - nll_exact) / tokens) - 1, in %
    assert rows["last"]["article_change_pct"] == pytest.approx([100 * (math.exp(0.15) - 1), 100 * (math.exp(0.05) - 1),
                                                                100 * (math.exp(0.30) - 1)])
    assert rows["weight_norm"]["ppl_change_pct"] == pytest.approx(100 * (math.exp(40 / 300) - 1))
    summary = mb.summarize(records, num_layers=4)
    medians = {(r["layers"], r["select"]): r["median_article_change_pct"] for r in summary["rows"]}
    assert medians[(2, "weight_norm")] == pytest.approx(100 * (math.exp(0.1) - 1))  # articles: +10.5%, +10.5%, +22.1%
    assert medians[(2, "last")] == pytest.approx(100 * (math.exp(0.15) - 1)) and medians[(0, "none")] == 0.0
    goal = mb.evaluate_goals(summary, [{"text": "t", "method": "sparse_hyper", "layers": 2, "beats": ["last", "random"]}],
                             comparison=[group])[0]
    assert "lower than last on 2/3 articles, random on 1/3 article-seed pairs" in goal["detail"]

    result, md = _write_report(tmp_path / "out", records)
    assert "## Layer selections article by article: sparse_hyper, 2 layers, 8192 tokens" in md
    assert "| last | 0 | " in md and "| 2/3 |" in md
    heatmap = tmp_path / "out" / "selections_by_article_sparse_hyper_2layers_8192.png"
    assert heatmap.name in result["plots"] and heatmap.stat().st_size > 1000


def test_selections_side_by_side_at_every_layer_count(tmp_path):
    records = [_article_cell("none", [200.0, 300.0], layers=0),
               _article_cell("weight_norm", [210.0, 310.0], layers=1), _article_cell("last", [215.0, 305.0], layers=1),
               _article_cell("weight_norm", [230.0, 330.0], layers=2), _article_cell("last", [240.0, 340.0], layers=2),
               _article_cell("random", [220.0, 350.0], seed=0, layers=2),
               _article_cell("random", [235.0, 320.0], seed=1, layers=2)]
    (overview,) = mb.selections_by_layer_count(mb.selection_comparison(records))
    assert (overview["method"], overview["tokens"], overview["layers"]) == ("sparse_hyper", 8192, [1, 2])
    cells = overview["cells"]
    assert ("random", 1) not in cells
    assert cells[("last", 1)]["weight_norm_lower_on"] == 1 and cells[("last", 2)]["weight_norm_lower_on"] == 2
    assert cells[("random", 2)]["weight_norm_lower_on"] == 2 and cells[("random", 2)]["articles"] == 4  # pairs
    change = lambda nll: 100 * (math.exp(nll / 200) - 1)  # noqa: E731 — pooled over the 2 x 100 tokens
    assert cells[("random", 2)]["ppl_change_pct"] == pytest.approx((change(70.0) + change(55.0)) / 2)
    assert cells[("weight_norm", 2)]["ppl_change_pct"] == pytest.approx(change(60.0))

    result, md = _write_report(tmp_path / "out", records)
    assert "## Layer selections at every layer count compared: sparse_hyper, 8192 tokens" in md
    assert "| layers | weight_norm | last | random |" in md
    assert f"| 1 | {change(20.0):+.1f}% | {change(20.0):+.1f}% (1/2) | - |" in md
    assert f"| 2 | {change(60.0):+.1f}% | {change(80.0):+.1f}% (2/2) | {(change(70.0) + change(55.0)) / 2:+.1f}% (2/4) |" in md
    curves = tmp_path / "out" / "selections_vs_layers_sparse_hyper_8192.png"
    assert curves.name in result["plots"] and curves.stat().st_size > 1000
    assert {(c["select"], c["layers"]) for c in result["selections_by_layer_count"][0]["cells"]} == set(cells)


# ---- kernel level ---------------------------------------------------------------------------------------------

def test_bench_on_inputs_values():
    q, k, v = random_qkv(96, heads=4, head_dim=16, seed=3)
    res = bench_on_inputs(["exact", "hyper"], q, k[:, :2], v[:, :2], causal=True, repeats=2,
                          params={"hyper": {"min_seq_len": 16, "block_size": 16, "sample_size": 8, "num_sink_tokens": 0}})
    assert res["n"] == 96 and res["heads"] == 4 and res["sdpa"]["rel_error"] == 0.0 and res["device"] == "cpu"
    exact, hyper = res["methods"]["exact"], res["methods"]["hyper"]
    assert exact["rel_error"] < 1e-5  # exact attention (GQA expanded) matches SDPA
    assert hyper["rel_error"] > 1e-3  # hyper approximates at this size: the error is measured, not assumed
    assert exact["speedup_vs_sdpa"] == pytest.approx(res["sdpa"]["time_s"] / exact["time_s"])
    assert len(exact["times_s"]) == 2 and exact["spread_s"] == pytest.approx(max(exact["times_s"]) - min(exact["times_s"]))
    flops = 4 * 1 * 4 * 96 * 96 * 16 / 2
    assert exact["useful_gflops"] == pytest.approx(flops / exact["time_s"] / 1e9)
    assert hyper["params"]["block_size"] == 16


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_bench_on_inputs_reports_a_refusing_method():
    q, k, v = random_qkv(64, heads=2, head_dim=8, seed=0)
    res = bench_on_inputs(["poly"], q * 40, k * 40, v, causal=False, repeats=1, params={"poly": {"min_seq_len": 0}})
    assert "failed" in res["methods"]["poly"] and "poly" in res["methods"]["poly"]["failed"]
    assert res["sdpa"]["time_s"] > 0


def test_relative_error_and_suite_cells():
    ref = torch.ones(2, 3)
    assert relative_error(ref * 1.1, ref) == pytest.approx(0.1)
    cells = suite_cells(["random", "smollm2", "minilm"], [1024, 16384], [False, True], ["fp32"])
    kinds = [(c["inputs"], c["n"], c["causal"]) for c in cells]
    assert ("smollm2", 16384, True) not in kinds and ("smollm2", 1024, True) in kinds  # SmolLM2 stops at 8192
    assert [k for k in kinds if k[0] == "minilm"] == [("minilm", 512, False)]
    assert len({c["key"] for c in cells}) == len(cells)


def test_cli_kernel_runs_resumes_and_writes(tmp_path, capsys):
    from hf_sparse_attn.cli import main

    out = str(tmp_path / "k")
    argv = ["bench", "kernel", "--methods", "exact", "hyper", "--ns", "64", "128", "--causal", "causal", "--repeats", "1",
            "--method-param", "hyper.block_size=16", "--method-param", "hyper.sample_size=8", "--method-param", "hyper.min_seq_len=16", "--out", out, "--no-progress"]
    assert main(argv) == 0
    with open(os.path.join(out, "results.json")) as f:
        first = json.load(f)
    assert sorted(first["cells"]) == ["random|N=128|causal=True|fp32", "random|N=64|causal=True|fp32"]
    cell = first["cells"]["random|N=128|causal=True|fp32"]
    assert cell["methods"]["hyper"]["params"]["block_size"] == 16 and cell["methods"]["hyper"]["params"]["min_seq_len"] == 16
    assert os.path.getsize(os.path.join(out, "time_vs_n_random.png")) > 1000
    assert "| 128 | True | float32 |" in open(os.path.join(out, "results.md")).read()
    assert main(argv) == 0  # resume: the cells are kept as they were
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["cells"] == first["cells"]
    assert main(["bench", "kernel", "--methods", "nope", "--out", out]) == 2
    capsys.readouterr()
    assert main(["bench", "kernel", "--methods", "exact", "--device", "tpu", "--out", out]) == 2
    assert "choose cpu or cuda" in capsys.readouterr().err
    if not torch.cuda.is_available():  # a clear refusal, not a crash deep inside the first cell
        assert main(["bench", "kernel", "--methods", "exact", "--device", "cuda", "--out", out]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "model", "--help"])
    assert "--compare-selections-at" in capsys.readouterr().out


def test_two_processes_appending_large_records_to_one_file_never_interleave(tmp_path):
    """Two bench processes (e.g. two shards of one grid) may append to one results file."""
    import subprocess
    import sys

    path = str(tmp_path / "shared.jsonl")
    writer = ("import sys\nfrom hf_sparse_attn.eval.bench import append_jsonl\n"
              "for i in range(40):\n"
              "    append_jsonl(sys.argv[1], {'writer': sys.argv[2], 'i': i, 'payload': sys.argv[2] * 100_000})\n")
    procs = [subprocess.Popen([sys.executable, "-c", writer, path, name]) for name in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    records = [json.loads(line) for line in lines]  # an interleaved line would not parse
    assert len(records) == 80
    for writer_name in ("a", "b"):
        mine = [r for r in records if r["writer"] == writer_name]
        assert [r["i"] for r in mine] == list(range(40))
        assert all(r["payload"] == writer_name * 100_000 for r in mine)


def test_kernel_configs_from_the_command_line():
    """The causal kernel benchmark's ``--configs``: a table name or NAME=METHOD:param=value,...; a wrong name, a pair
    without '=' or a parameter the method does not take fails before any timing, naming what to write."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "bench_causal_kernels.py")
    spec = importlib.util.spec_from_file_location("bench_causal_kernels", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    specs = script.parse_configs(["local w512", "mine=block_select:window=1024,num_selected=64"])
    assert specs == {"local w512": script.CONFIGS["local w512"],
                     "mine": ("block_select", {"window": 1024, "num_selected": 64})}
    with pytest.raises(SystemExit, match="neither a name of the built-in table"):
        script.parse_configs(["local w4096"])
    with pytest.raises(SystemExit, match="is not param=value"):
        script.parse_configs(["mine=local:window"])
    with pytest.raises(Exception, match="num_selected"):
        script.parse_configs(["mine=local:num_selected=3"])


def test_ruler_frontier_configurations_and_report(tmp_path, monkeypatch):
    """scripts/ruler_frontier.py: every configuration's arguments parse as `hf-sparse-attn ruler` options, every one
    that names where its perplexity / speed-up were measured finds that row in the committed results (a wrong
    parameter or layer count would silently print "not measured"), and the report counts the facts a plan keeps,
    plots the task every plotted row has, and leaves decode variants out of the plots."""
    import importlib.util
    import json

    from hf_sparse_attn.cli import build_parser
    from hf_sparse_attn.eval.store import append_record

    root = os.path.join(os.path.dirname(__file__), "..")
    spec = importlib.util.spec_from_file_location("ruler_frontier", os.path.join(root, "scripts", "ruler_frontier.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.chdir(root)
    parser = build_parser()
    for name, (args, source) in script.CONFIGS.items():
        parsed = parser.parse_args(["ruler", "--model", "smollm2", "--out", str(tmp_path / name), *args])
        assert parsed.command == "ruler"
        if source is not None:
            cell = script.model_cell(name)
            assert cell is not None, name
            assert cell["speedup"] > 0.9 and -5 < cell["ppl_change_pct"] < 50, (name, cell)
    assert script.model_cell("calibrated_1pct")["articles"] == 16  # calibrate's held-out articles

    out = tmp_path / "frontier"
    hits = {"exact": [1] * 9 + [0], "local_w512_30": [0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            "block_select_30_decode_local": [1, 0] + [1] * 8}
    for name, row in hits.items():
        os.makedirs(out / name / "8192")
        for i, hit in enumerate(row):
            append_record(str(out / name / "8192" / "passkey.jsonl"), {"id": f"s{i}", "hits": [bool(hit)]})
    os.makedirs(out / "exact" / "4096")
    append_record(str(out / "exact" / "4096" / "vt.jsonl"), {"id": "s0", "hits": [True]})
    configs, tasks = script.measured(str(out))
    assert configs == ["exact", "local_w512_30", "block_select_30_decode_local"]
    assert tasks == [("vt", 4096), ("passkey", 8192)]
    result = script.report(str(out), configs, tasks)
    local = result["rows"]["local_w512_30"]["cells"]["passkey@8192"]
    assert local["score"] == 10 and local["kept"] == [1, 9] and local["differs_from_exact"]
    assert result["rows"]["block_select_30_decode_local"]["cells"]["passkey@8192"]["kept"] == [8, 9]
    # vt@4096: one sample, 100 [2.5, 100] overlaps 0 [0, 97.5], so it cannot show a loss and stays out of the mean;
    # 9 of 10 pass keys [55, 100] lie above no key of 10 [0, 31]
    assert result["compared_tasks"] == ["passkey@8192"]
    assert result["rows"]["local_w512_30"]["mean_score"] == 10
    assert script.plotted_tasks(result) == ["passkey@8192"]  # the exact row's vt@4096 is not everyone's
    assert script.panel_tasks(result) == ["passkey@8192"]  # nor most plans': no panel of its own
    text = (out / "frontier.md").read_text()
    assert "| local_w512_30 | — | 10 [" in text and "| 10 |" in text and "coloured by its passkey@8192 score" in text
    assert "Mean: over passkey@8192" in text and "left out: vt@4096, where the unpatched model's" in text
    assert (out / "frontier.png").stat().st_size > 0 and (out / "retrieval.png").stat().st_size > 0
    assert json.loads((out / "frontier.json").read_text())["tasks"] == ["vt@4096", "passkey@8192"]

    # a second task every plotted row has: both plotted, the colour their mean, one retrieval panel each; a third
    # that cannot show a loss (the unpatched model answers 1 of 10) and not every plotted row has: not averaged
    for name in ("exact", "local_w512_30"):
        for i in range(10):
            append_record(str(out / name / "8192" / "niah_multikey_1.jsonl"), {"id": f"s{i}", "hits": [name == "exact"]})
            if name == "exact":
                append_record(str(out / name / "8192" / "vt.jsonl"), {"id": f"s{i}", "hits": [i == 0]})
    result = script.report(str(out), configs, [("passkey", 8192), ("niah_multikey_1", 8192), ("vt", 8192)])
    assert result["compared_tasks"] == script.plotted_tasks(result) == ["passkey@8192", "niah_multikey_1@8192"]
    assert result["rows"]["local_w512_30"]["mean_score"] == 5  # (10 + 0) / 2: vt@8192 (the unpatched model's alone) is not counted
    assert result["rows"]["block_select_30_decode_local"]["mean_score"] is None  # no niah_multikey_1
    assert "coloured by its mean of passkey@8192 and niah_multikey_1@8192 score" in (out / "frontier.md").read_text()
    from PIL import Image

    assert Image.open(out / "retrieval.png").size[0] > Image.open(out / "frontier.png").size[0]  # two panels

    # several answers per sample (niah_multivalue): no sample answered fully, so "kept" is 0/0; the answers the
    # unpatched model finds (2 + 1) and those of them a plan also finds (1 + 0; its own third answer of s0 is not one)
    multivalue = {"exact": [[True, True, False, False], [False, False, True, False]],
                  "local_w512_30": [[True, False, True, False], [False, False, False, False]]}
    for name, rows in multivalue.items():
        for i, row in enumerate(rows):
            append_record(str(out / name / "8192" / "niah_multivalue.jsonl"), {"id": f"s{i}", "hits": row})
    result = script.report(str(out), configs, [("passkey", 8192), ("niah_multivalue", 8192)])
    cell = result["rows"]["local_w512_30"]["cells"]["niah_multivalue@8192"]
    assert cell["kept"] == [0, 0] and cell["kept_answers"] == [1, 3] and cell["score"] == 25
    assert "kept_answers" not in result["rows"]["local_w512_30"]["cells"]["passkey@8192"]  # one answer per sample
    assert "kept 0/0; answers kept 1/3" in (out / "frontier.md").read_text()

    # four more plans with the pass key only: niah_multikey_1 is then 2 of 6 plotted rows, yet it can show a loss and
    # two plans besides the unpatched model ran it, so it keeps its panel; vt@8192 (the unpatched model's alone) gets
    # none
    for name in ("local_w1024_30", "local_w256_30", "block_select_30", "local_w512_15"):
        os.makedirs(out / name / "8192")
        for i in range(10):
            append_record(str(out / name / "8192" / "passkey.jsonl"), {"id": f"s{i}", "hits": [i < 5]})
    for i in range(10):
        append_record(str(out / "local_w256_30" / "8192" / "niah_multikey_1.jsonl"), {"id": f"s{i}", "hits": [False]})
    configs = [*configs, "local_w1024_30", "local_w256_30", "block_select_30", "local_w512_15"]
    result = script.report(str(out), configs, [("passkey", 8192), ("niah_multikey_1", 8192), ("vt", 8192)])
    assert len(script.plotted_rows(result)) == 6 and script.plotted_tasks(result) == ["passkey@8192"]
    assert script.panel_tasks(result) == ["passkey@8192", "niah_multikey_1@8192"]
