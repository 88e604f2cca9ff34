"""Calibrated plans on real SmolLM2-135M-Instruct at 8k tokens: calibrated on 4 Wikipedia articles, checked on the
16 others, at perplexity budgets of 1%, 3% and 5% (hf_sparse_attn.eval.calibrate, metric "output_error"), against
the best fixed plan of the model benchmark on the same 16 articles.

The 20 articles are those of the model grid: the first 20 articles of the offline Wikipedia corpus with at least
8192 tokens, each cut to its first 8192 tokens (hf_sparse_attn.eval.bench.article_token_sets); the first 4
calibrate, the other 16 are held out (the script checks the titles against the fixed plans' records). One torch
thread. Candidates: four settings from the measured 8k frontier (eval/results/model_bench_causal/frontier.md,
eval/results/kernels_causal/results.md): local w1024, sparse_hyper single pass w512 b128, hyper single pass w256
b128 s128, sparse_hyper recursive (b256).

Work, in this order, each step only when it is not in the cache (OUT/cells.jsonl; a killed run resumes — run the
same command again):
1. search, per budget: the output error of every layer x candidate on the 4 articles (captured q/k/v, computed
   once for all budgets), the time of each call on the first article, then the prefixes of the saving-per-error
   order searched by the measured combined loss on the 4 articles -> OUT/plan_<budget>.json;
2. held-out check, per budget: the exact model and each plan on the 16 held-out articles (perplexity change and
   prefill speed-up; the exact model timed in the same process when the checks run in one invocation);
3. the proxy check: single-layer loss change of every layer with one candidate (layer i: candidate i mod 4) on
   the first calibration article, against that cell's output error (Spearman) -> OUT/proxy.json;
4. the report (also alone: --report-only, which keeps the date and load average of the report it rewrites):
   OUT/results.json, OUT/results.md, OUT/frontier.png.
``--max-minutes`` stops before a step whose estimate (from the measured forward time) would end past it; the
report is written on whatever exists.

    taskset -c 1 .venv/bin/python scripts/calibrate_smollm2.py --out eval/results/calibrate_smollm2
    taskset -c 0 .venv/bin/python scripts/calibrate_smollm2.py --tokens 4096 --calib-articles 1 \\
        --heldout-articles 1 --layers 3,20 --budgets 0.03 --proxy-layers 3 --max-minutes 0 --out /tmp/calibrate_tiny   # path check

Expected run time on one core of the 2-core VM (an exact 8k forward: ~48 s of prefill, ~55 s with the loss head,
~35-50 s with a plan):
- exact model + capture on the 4 calibration articles (8 forwards) + 30 layers x 4 candidates' error and timing
  ~ 13 min;
- each measured prefix 4 forwards ~ 3 min; ~4.4 prefixes for the first budget, ~3 for each later one ~ 32 min;
- held-out: the exact model 16 forwards ~ 15 min, each plan ~ 11-13 min ~ 50 min;
- proxy: one forward per cell, 30 cells ~ 28 min (plus one capture forward).
About 130 min in all. With --max-minutes 45, invocation 1 searches (up to all three budgets), invocation 2 does
the remaining search and the held-out checks that fit, invocation 3 the rest and the proxy cells; each prints
"all measured" or "not finished: run the same command again". When the exact model's held-out timing comes from
an earlier invocation, the exact model is timed again on --retime-articles held-out articles in the same process,
so that every calibrated speed-up is same-run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from hf_sparse_attn.eval import calibrate as cal

CANDIDATES = {
    "local": [{"window": 1024}],
    "sparse_hyper": [{"causal_mode": "single_pass", "window": 512, "block_size": 128}, {}],
    "hyper": [{"causal_mode": "single_pass", "window": 256, "block_size": 128, "sample_size": 128}],
}
FIXED = ["eval/results/model_bench_causal/results.jsonl", "eval/results/model_bench_grid/results.jsonl"]
FORWARD_S = 55.0  # an exact 8k forward on one core with the loss head, until this run measures its own


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--calib-articles", type=int, default=4)
    parser.add_argument("--heldout-articles", type=int, default=16)
    parser.add_argument("--budgets", default="0.03,0.01,0.05", help="comma-separated fractions, searched in order")
    parser.add_argument("--methods", default="local,sparse_hyper,hyper")
    parser.add_argument("--candidates", default=None, metavar="JSON",
                        help="parameter settings per method (default: four settings from the 8k frontier)")
    parser.add_argument("--metric", choices=("loss", "output_error"), default="output_error")
    parser.add_argument("--search", choices=("prefix", "upgrades"), default="prefix",
                        help="output error: prefixes of the best cell per layer (default), or multiple-choice "
                             "upgrades (a layer may trade up to a faster candidate; use with several local windows)")
    parser.add_argument("--layers", default=None, help="comma-separated eligible layers (default all)")
    parser.add_argument("--repeats", type=int, default=1, help="timing repeats per layer call (default 1: every "
                        "layer has the same shapes, so the layers' timings already repeat the measurement)")
    parser.add_argument("--proxy", choices=("rotate", "none"), default="rotate",
                        help="proxy check: every layer with one candidate, rotating through the candidates by layer "
                             "(layer i: candidate i mod count), or none")
    parser.add_argument("--proxy-layers", default=None, help="comma-separated layers of the proxy check (default all)")
    parser.add_argument("--max-minutes", type=float, default=45.0,
                        help="do not start a step whose estimate ends past this many minutes (0: no limit)")
    parser.add_argument("--fixed", action="extend", nargs="+", default=None, metavar="JSONL",
                        help=f"model-benchmark records of the fixed plans (default: {', '.join(FIXED)})")
    parser.add_argument("--retime-articles", type=int, default=4,
                        help="when the exact model's held-out timing comes from an earlier invocation, time it again on "
                             "this many held-out articles for a same-run speed-up (default 4)")
    parser.add_argument("--report-only", action="store_true", help="only write the report from OUT")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="eval/results/calibrate_smollm2")
    args = parser.parse_args(argv)
    try:
        args.budgets = [cal.check_budget(float(b)) for b in args.budgets.split(",") if b.strip()]
    except ValueError as err:
        parser.error(f"--budgets: {err}")
    if not args.budgets:
        parser.error("--budgets is empty: give fractions such as 0.01,0.03,0.05")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        args.candidates = CANDIDATES if args.candidates is None else json.loads(
            open(args.candidates).read() if os.path.exists(args.candidates) else args.candidates)
        args.candidates = {m: v for m, v in args.candidates.items() if m in args.methods}
        args.resolved = cal.resolve_candidates(args.methods, args.candidates)
    except (ValueError, json.JSONDecodeError) as err:
        parser.error(f"--methods/--candidates: {err}")
    for name in ("layers", "proxy_layers"):
        value = getattr(args, name)
        try:
            setattr(args, name, None if value is None else [int(x) for x in value.split(",") if x.strip()])
        except ValueError:
            parser.error(f"--{name.replace('_', '-')} must be comma-separated layer numbers; got {value!r}")
    if args.calib_articles < 1 or args.heldout_articles < 1:
        parser.error("--calib-articles and --heldout-articles must be >= 1")
    args.fixed = args.fixed or FIXED
    return args


def plan_path(out: str, budget: float) -> str:
    return os.path.join(out, f"plan_{budget:g}.json")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if not args.report_only:
        run(args)
    write_report(args)
    return 0


def run(args: argparse.Namespace) -> None:
    from hf_sparse_attn import PatchPlan
    from hf_sparse_attn.eval.data import load_smollm2
    from hf_sparse_attn.eval.bench import article_token_sets, prefill_and_nll

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    articles = article_token_sets(tokenizer, args.tokens, args.calib_articles + args.heldout_articles)
    calib = [ids for _, ids in articles[:args.calib_articles]]
    heldout = [ids for _, ids in articles[args.calib_articles:]]
    with open(os.path.join(args.out, "articles.json"), "w", encoding="utf-8") as f:
        json.dump({"tokens": args.tokens, "calibration": [t for t, _ in articles[:args.calib_articles]],
                   "heldout": [t for t, _ in articles[args.calib_articles:]]}, f, indent=2)
    cache = os.path.join(args.out, "cells.jsonl")
    scale = (args.tokens / 8192) ** 1.5  # forward time grows between N and N^2 with the attention share
    forward_s = FORWARD_S * scale

    def minutes() -> float:
        return (time.perf_counter() - start) / 60

    def fits(forwards: float, what: str) -> bool:
        if not args.max_minutes:
            return True
        end = minutes() + forwards * forward_s / 60
        if end > args.max_minutes:
            print(f"[calibrate_smollm2] stop before {what}: ~{forwards * forward_s / 60:.0f} min would end at "
                  f"{end:.0f} > --max-minutes {args.max_minutes:g}; run the same command again to continue", flush=True)
            return False
        return True

    def calibrate(budget, held):
        return cal.calibrate(model, calib, budget=budget, methods=args.methods, candidates=args.candidates,
                             metric=args.metric, heldout_ids=held, layers=args.layers, cache=cache,
                             repeats=args.repeats, search=args.search, timed_layers=None, refine=0,
                             retrieval_budget=None)  # the search as it was when the committed results were measured

    cells_cached = any(r.get("kind") == "layer" for r in cal.read_jsonl(cache))
    for budget in args.budgets:  # 1. search
        if os.path.exists(plan_path(args.out, budget)):
            continue
        # ~4.4 combined plans per search (a quarter-clamped regula falsi over the prefixes), one forward per
        # calibration article each, fewer for later budgets (prefixes measured before are cache hits); the first
        # search also runs the exact model and the capture forwards and measures the cells (~3.3 forwards' time
        # per calibration article)
        probes = 3.5 if cells_cached else 4.5
        if not fits(len(calib) * (probes + (0 if cells_cached else 3.3)), f"the search at budget {budget:g}"):
            break
        plan = calibrate(budget, None)
        cells_cached = True
        plan.save(plan_path(args.out, budget))
        print(plan.report(), flush=True)
        forward_s = measured_forward_s(cache, args.tokens) or forward_s
    todo = [b for b in args.budgets if os.path.exists(plan_path(args.out, b))
            and not (PatchPlan.load(plan_path(args.out, b)).calibration or {}).get("heldout")]
    exact_done = exact_heldout_record(cache) is not None
    searched_all = all(os.path.exists(plan_path(args.out, b)) for b in args.budgets)
    retimed = None
    checked = {assignment(plan_path(args.out, b)) for b in args.budgets
               if os.path.exists(plan_path(args.out, b)) and b not in todo}
    for budget in todo if searched_all or exact_done else []:  # 2. held-out check
        retime = exact_done and not exact_timed_here(cache)
        same = assignment(plan_path(args.out, budget)) in checked  # the plan of another budget: all cache hits
        if not same and not fits(len(heldout) * (0.85 + (0 if exact_done else 1)) + (args.retime_articles if retime and retimed
                                                                          is None else 0),
                    f"the held-out check at budget {budget:g}"):
            break
        plan = calibrate(budget, heldout)
        exact_done = True
        held = plan.calibration["heldout"]
        if held["exact_run_id"] != held["plan_run_id"] and held["plan_run_id"] == cal.RUN_ID:
            # the exact model was timed on the held-out articles by an earlier process: time it again here on a
            # few of them (every article has the same length, so the exact time per article does not depend on it)
            if retimed is None:
                seconds = [prefill_and_nll(model, ids)[2] for ids in heldout[:args.retime_articles]]
                retimed = {"articles": len(seconds), "prefill_s_per_article": sum(seconds) / len(seconds),
                           "run_id": cal.RUN_ID}
            held["exact_retimed"] = retimed
            held["speedup_same_run"] = retimed["prefill_s_per_article"] / (held["plan_prefill_s"] / held["texts"])
        plan.save(plan_path(args.out, budget))
        checked.add(assignment(plan_path(args.out, budget)))
        print(plan.report(), flush=True)
    if args.proxy == "rotate":  # 3. proxy check
        layers = args.proxy_layers if args.proxy_layers is not None else list(range(model.config.num_hidden_layers))
        cells = [(layer, *args.resolved[layer % len(args.resolved)]) for layer in layers]
        result = cal.proxy_check(model, calib[0], cells, cache=cache,
                                 should_stop=lambda: not fits(1.1, "the next proxy cell"))
        result["text"] = articles[0][0]
        with open(os.path.join(args.out, "proxy.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    done = all(os.path.exists(plan_path(args.out, b)) and (PatchPlan.load(plan_path(args.out, b)).calibration
                                                             or {}).get("heldout") for b in args.budgets)
    if args.proxy == "rotate":
        done = done and result["complete"]
    print("[calibrate_smollm2] " + ("all measured" if done else "not finished: run the same command again"),
          flush=True)
    print(f"[calibrate_smollm2] {minutes():.1f} min", flush=True)


def assignment(path: str) -> str:
    """The layers' methods and parameters of a saved plan, as one string (two budgets may find the same plan)."""
    from hf_sparse_attn import PatchPlan

    plan = PatchPlan.load(path)
    return json.dumps([[layer.layer_idx, layer.method, layer.params] for layer in plan.layers if layer.method],
                      sort_keys=True)


def exact_heldout_record(cache: str):
    return next((r for r in cal.read_jsonl(cache) if "|heldout|" in r.get("key", "") and r["key"].endswith("|[]")), None)


def exact_timed_here(cache: str) -> bool:
    record = exact_heldout_record(cache)
    return record is not None and record.get("run_id") == cal.RUN_ID


def measured_forward_s(cache: str, tokens: int):
    """Seconds of one exact forward of ``tokens`` tokens, from the cache's exact records of this process (None if
    none), with 15% for the untimed loss head."""
    rows = [r for r in cal.read_jsonl(cache) if r.get("run_id") == cal.RUN_ID and r.get("key", "").endswith("|[]")
            and r.get("prefill_s") and r.get("tokens")]
    if not rows:
        return None
    return 1.15 * sum(r["prefill_s"] for r in rows) * (tokens - 1) / sum(r["tokens"] for r in rows)


def write_report(args: argparse.Namespace) -> None:
    from hf_sparse_attn import PatchPlan

    titles_path = os.path.join(args.out, "articles.json")
    titles = json.load(open(titles_path)) if os.path.exists(titles_path) else None
    plans = [plan_summary(PatchPlan.load(p)) for p in sorted(glob.glob(os.path.join(args.out, "plan_*.json")))]
    fixed, notes = [], []
    for path in args.fixed:
        if not os.path.exists(path):
            notes.append(f"fixed plans: {path} not found")
            continue
        records = cal.read_jsonl(path)
        if titles:
            seen = {a["title"] for r in records if r.get("kind") == "cell" for a in r.get("per_article", [])}
            lacking = [t for t in titles["calibration"] + titles["heldout"] if t not in seen]
            if lacking:
                notes.append(f"{path}: lacks articles {lacking}: its plans are compared on the others only where "
                             "they have all held-out articles")
            fixed += fixed_plans_on(records, titles["heldout"], source=os.path.dirname(path))
    rows = compare_budgets([p for p in plans if p["budget"] is not None], fixed)
    proxy_path = os.path.join(args.out, "proxy.json")
    proxy = json.load(open(proxy_path)) if os.path.exists(proxy_path) else None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    date = time.strftime("%Y-%m-%d", time.gmtime())
    stored_path = os.path.join(args.out, "results.json")
    if args.report_only and os.path.exists(stored_path):  # a rebuild keeps the date and load of the report it rewrites
        stored = json.load(open(stored_path)).get("meta", {})
        date, load = stored.get("date", date), stored.get("load_avg_1min_at_report", load)
    meta = {"model": "SmolLM2-135M-Instruct (fp32)", "tokens": args.tokens, "articles": titles,
            "metric": args.metric, "search": args.search, "proxy": args.proxy, "methods": args.methods, "candidates": args.candidates, "layers": args.layers,
            "threads": args.threads, "command": "scripts/calibrate_smollm2.py " + " ".join(sys.argv[1:]),
            "machine": "2-core CPU VM, no GPU", "date": date,
            "load_avg_1min_at_report": load, "fixed_sources": args.fixed}
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "budgets": rows, "fixed": fixed, "proxy": proxy, "notes": notes}, f, indent=2)
    text = results_markdown(rows, fixed, proxy, meta, notes)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    if fixed or any(r.get("heldout_speedup") for r in rows):
        frontier_plot(rows, fixed, os.path.join(args.out, "frontier.png"),
                          title=f"SmolLM2 at {args.tokens} tokens, {len((titles or {}).get('heldout', []))} held-out "
                                "articles: fixed plans vs calibrated plans")
    print(text)


# ---------------------------------------------------------------------------------------------------------
# Calibrated plans against fixed plans (method x selection x layer count), from the model benchmark's records
# ---------------------------------------------------------------------------------------------------------

def fixed_plans_on(records: Iterable[dict], titles: Sequence[str], source: str = "") -> list[dict[str, Any]]:
    """Each fixed plan of a model-benchmark record file (eval/results/model_bench*/results.jsonl), scored on the
    articles ``titles`` only.

    Perplexity change: ``exp((sum nll_plan - sum nll_exact) / tokens) - 1`` over those articles (the exact model's
    per-article losses from the file's exact records; exact attention is deterministic, so any run's serve).
    Prefill speed-up: sum of exact seconds / sum of plan seconds over those articles, each article paired with the
    exact model timed on it in the same run (the benchmark times its exact baseline in every run on the articles
    that run times). Plans that lack one of the articles are skipped. Returns rows {source, key, label, method,
    causal_mode, select, layers, seed, params, articles, articles_timed, heldout_change, heldout_speedup}."""
    records = list(records)
    wanted = list(titles)
    exact_nll: dict[str, tuple[float, int]] = {}
    exact_s: dict[tuple[str, str], float] = {}
    latest: dict[str, dict] = {}
    for record in records:
        if record.get("kind") not in ("cell", "baseline_rerun"):
            continue
        if record.get("method") == "exact":
            for a in record.get("per_article", []):
                exact_nll.setdefault(a["title"], (a["nll_sum"], a["tokens"]))
                if not a.get("resumed"):
                    exact_s[(a.get("run_id", record.get("run_id")), a["title"])] = a["prefill_s"]
        elif record["kind"] == "cell":
            latest[record["key"]] = record
    rows = []
    for key, record in latest.items():
        per = {a["title"]: a for a in record.get("per_article", [])}
        if any(t not in per or t not in exact_nll for t in wanted) or not wanted:
            continue
        nll = sum(per[t]["nll_sum"] for t in wanted)
        base = sum(exact_nll[t][0] for t in wanted)
        tokens = sum(exact_nll[t][1] for t in wanted)
        pairs = [(exact_s[(per[t].get("run_id", record.get("run_id")), t)], per[t]["prefill_s"]) for t in wanted
                 if (per[t].get("run_id", record.get("run_id")), t) in exact_s]
        params = record.get("params", {})
        mode = params.get("causal_mode", "recursive") if record["method"] in ("hyper", "sparse_hyper") else ""
        variant = mode.replace("_", " ") if mode else (f"w{params['window']}" if record["method"] == "local"
                                                       and "window" in params else "")
        label = f"{record['method']}{' ' + variant if variant else ''}, {record['select']}" \
                f"{'' if record['select'] != 'random' else ' seed ' + str(record.get('seed'))}, {record['layers']} layers"
        rows.append({"source": source, "key": key, "label": label, "method": record["method"], "causal_mode": mode,
                     "variant": variant,
                     "select": record["select"], "layers": record["layers"], "seed": record.get("seed"),
                     "params": params, "articles": len(wanted), "articles_timed": len(pairs),
                     "heldout_change": cal._change(nll, base, tokens),
                     "heldout_speedup": sum(e for e, _ in pairs) / sum(p for _, p in pairs) if pairs else None})
    return sorted(rows, key=lambda r: (r["heldout_change"], r["key"]))


def best_fixed_plan(fixed: Sequence[dict], change: float) -> Optional[dict]:
    """The fastest fixed plan (largest ``heldout_speedup``) whose held-out perplexity change is no worse than
    ``change``; None when every fixed plan is worse (then only the exact model, 1.00x, is no worse)."""
    fit = [f for f in fixed if f["heldout_speedup"] is not None and f["heldout_change"] <= change + 1e-12]
    return max(fit, key=lambda f: (f["heldout_speedup"], -f["heldout_change"])) if fit else None


GOAL_MARGIN = 0.01  # held-out change within budget + 1 point
GOAL_SPEEDUP = 1.10  # at the 3% budget: at least 10% faster than the best fixed plan no worse in held-out perplexity


def compare_budgets(plans: Sequence[dict], fixed: Sequence[dict]) -> list[dict[str, Any]]:
    """One row per calibrated plan ({budget, heldout_change, heldout_speedup, ...}, the plan's calibration record
    flattened): the best fixed plan no worse in held-out perplexity and the two goals (None: not decidable, e.g.
    no held-out check yet). The speed-up goal is checked at the 3% budget only."""
    rows = []
    for plan in sorted(plans, key=lambda p: p["budget"]):
        row = dict(plan)
        change, speedup = plan.get("heldout_change"), plan.get("heldout_speedup")
        best = None if change is None else best_fixed_plan(fixed, change)
        row["best_fixed"] = best
        fixed_speedup = 1.0 if best is None else best["heldout_speedup"]
        row["best_fixed_speedup"] = None if change is None else fixed_speedup
        row["vs_fixed"] = None if speedup is None or change is None else speedup / fixed_speedup
        row["goal_quality"] = None if change is None else change <= plan["budget"] + GOAL_MARGIN
        row["goal_speed"] = None if abs(plan["budget"] - 0.03) > 1e-9 or row["vs_fixed"] is None \
            else row["vs_fixed"] >= GOAL_SPEEDUP
        rows.append(row)
    return rows


def plan_summary(plan: "cal.PatchPlan") -> dict[str, Any]:
    """The numbers of a saved calibrated plan that the comparison needs (held-out ones None before the check)."""
    info = plan.calibration or {}
    held = info.get("heldout") or {}
    choices = {str(r["layer"]): r["choice"] for r in info.get("layers", []) if r.get("choice")}
    return {"budget": info.get("budget"), "metric": info.get("metric"), "patched_layers": len(plan.patched_layers),
            "choices": choices, "calibration_change": info.get("calibration_change"),
            "search_steps": len(info.get("steps", [])), "heldout_change": held.get("change"),
            "heldout_speedup": held.get("speedup_same_run", held.get("speedup")), "heldout_articles": held.get("texts"),
            "exact_prefill_s": held.get("exact_prefill_s"), "plan_prefill_s": held.get("plan_prefill_s"),
            "exact_retimed": held.get("exact_retimed"),
            "same_run": (held.get("exact_run_id") == held.get("plan_run_id") or "speedup_same_run" in held)
            if held else None}


def frontier_plot(rows: Sequence[dict], fixed: Sequence[dict], path: Union[str, os.PathLike], title: str = "") -> None:
    """Perplexity change (held-out, %) against prefill speed-up: fixed plans by method, calibrated plans by budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = {"local": "s", "sparse_hyper": "o", "hyper": "^"}
    for method in sorted({f["method"] for f in fixed}):
        for variant in sorted({f["variant"] for f in fixed if f["method"] == method}):
            pts = [f for f in fixed if f["method"] == method and f["variant"] == variant and f["heldout_speedup"]]
            ax.scatter([f["heldout_speedup"] for f in pts], [100 * f["heldout_change"] for f in pts],
                       marker=markers.get(method, "x"), alpha=0.6,
                       label=f"fixed: {method}{' ' + variant if variant else ''}")
    done = [r for r in rows if r.get("heldout_speedup") is not None]
    ax.plot([r["heldout_speedup"] for r in done], [100 * r["heldout_change"] for r in done], "k*-", markersize=14,
            label="calibrated plans")
    for r in done:
        ax.annotate(f"budget {100 * r['budget']:g}%", (r["heldout_speedup"], 100 * r["heldout_change"]),
                    textcoords="offset points", xytext=(6, -12))
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("prefill speed-up over the exact model of the same run")
    ax.set_ylabel("held-out perplexity change (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def layer_ranges(layers: Sequence[int]) -> str:
    """Sorted layer numbers as ranges: [0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive layers
    for layer in layers:
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def results_markdown(rows: Sequence[dict], fixed: Sequence[dict], proxy: Optional[dict], meta: dict,
                     notes: Sequence[str] = ()) -> str:
    """results.md of the SmolLM2 calibration: per budget the calibrated plan, its held-out change and speed-up,
    the best fixed plan no worse in held-out perplexity, the goals; the proxy's rank correlation; the fixed plans."""
    pct = lambda x: "-" if x is None else f"{100 * x:+.2f}%"  # noqa: E731
    spd = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
    yes = lambda x: "not decided yet" if x is None else ("met" if x else "NOT met")  # noqa: E731
    arts = meta.get("articles") or {}
    fixed_dirs = sorted({f["source"] for f in fixed}) or ["none"]
    lines = [f"# Calibrated plans vs fixed plans, {meta.get('model', 'the model')} at {meta.get('tokens')} tokens", "",
             f"Command: `{meta.get('command')}`. Machine: {meta.get('machine')}; {meta.get('threads')} torch thread(s); "
             f"date {meta.get('date')}; 1-min load average when this report was written: "
             f"{meta.get('load_avg_1min_at_report')}. Metric {meta.get('metric')}; search {meta.get('search', 'prefix')}; candidates "
             f"{json.dumps(meta.get('candidates'))}.", "",
             f"Calibration articles: {', '.join(arts.get('calibration', [])) or '-'}. Held-out articles "
             f"({len(arts.get('heldout', []))}): {', '.join(arts.get('heldout', [])) or '-'}.", "",
             "Speed-ups are prefill time of the exact model / prefill time of the plan on the held-out articles, each "
             "against the exact model timed in its own run: the calibrated plans were timed in this run, the fixed plans "
             f"in the model benchmark's runs ({', '.join(fixed_dirs)}) on the same machine. Compare speed-ups, not seconds. The fixed plans' numbers are recomputed from their per-article "
             "records on the held-out articles only.", "",
             "| budget | layers patched | calibration change | held-out change | held-out speed-up | exact + plan timed "
             "in one run | best fixed plan no worse (held-out change, speed-up) | calibrated / fixed speed-up | "
             "within budget + 1 point | 3%: >= 1.10x the fixed plan |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        best = r.get("best_fixed")
        best_text = "-" if r.get("heldout_change") is None else (
            "none (only the exact model, 1.00x)" if best is None else
            f"{best['label']} ({pct(best['heldout_change'])}, {spd(best['heldout_speedup'])})")
        lines.append(f"| {100 * r['budget']:g}% | {r.get('patched_layers')} | {pct(r.get('calibration_change'))} | "
                     f"{pct(r.get('heldout_change'))} | {spd(r.get('heldout_speedup'))} | "
                     f"{'-' if r.get('same_run') is None else ('yes' if r['same_run'] else 'no')} | {best_text} | "
                     f"{spd(r.get('vs_fixed'))} | {yes(r.get('goal_quality'))} | "
                     f"{'-' if abs(r['budget'] - 0.03) > 1e-9 else yes(r.get('goal_speed'))} |")
    if not rows:
        lines.append("| (no calibrated plan yet) | | | | | | | | | |")
    lines += ["", "Per budget, the layers and their choice (exact elsewhere):", ""]
    for r in rows:
        by_choice: dict[str, list[int]] = {}
        for layer, choice in r.get("choices", {}).items():
            by_choice.setdefault(choice, []).append(int(layer))
        lines.append(f"- {100 * r['budget']:g}%: " + ("; ".join(
            f"{choice}: {layer_ranges(sorted(layers))}" for choice, layers in sorted(
                by_choice.items(), key=lambda kv: min(kv[1]))) or "all exact"))
    lines += ["", "## How well the proxy predicts the loss", ""]
    if proxy and proxy.get("cells"):
        sp = proxy.get("spearman") or {}
        n_all = len(proxy["cells"])
        rho, p_value = sp.get("rho"), sp.get("p_value")
        lines.append(f"Output error of a layer's attention (captured q/k/v) against the perplexity change with only "
                     f"that layer replaced, on one calibration article ({proxy.get('text', '-')}): Spearman rho "
                     f"{'-' if rho is None else f'{rho:+.2f}'} over {sp.get('n', 0)} of {n_all} cells"
                     f"{'' if proxy.get('complete') else ' (incomplete: run the command again to measure the rest)'}"
                     f"{'' if p_value is None else f', p={p_value:.2g}'}.")
        by_method: dict[str, list[dict]] = {}
        for c in proxy["cells"]:
            if c.get("error") is not None and c.get("loss_change") is not None:
                by_method.setdefault(c["label"], []).append(c)
        for label, cs in sorted(by_method.items()):
            one = cal.spearman([c["error"] for c in cs], [c["loss_change"] for c in cs])
            one_rho = one.get("rho")
            lines.append(f"- {label}: rho {'-' if one_rho is None else f'{one_rho:+.2f}'} over {one['n']} layers")
    elif meta.get("proxy") == "none":
        lines.append("Not part of this experiment (--proxy none).")
    else:
        lines.append("Not measured yet (step 3 of the script).")
    lines += ["", "## Fixed plans on the held-out articles", "",
              "| source | plan | held-out change | speed-up | articles (timed) |", "|---|---|---|---|---|"]
    for f in fixed:
        lines.append(f"| {f['source']} | {f['label']} | {pct(f['heldout_change'])} | {spd(f['heldout_speedup'])} | "
                     f"{f['articles']} ({f['articles_timed']}) |")
    if notes:
        lines += [""] + [f"Note: {n}" for n in notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
