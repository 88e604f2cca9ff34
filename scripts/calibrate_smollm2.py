"""Calibrated plans on real SmolLM2-135M-Instruct at 8k tokens: calibrated on 4 Wikipedia articles, checked on the
16 others, at perplexity budgets of 1%, 3% and 5% (hf_sparse_attn.eval.calibrate, metric "output_error"), against
the best fixed plan of the model benchmark on the same 16 articles.

The 20 articles are those of the model grid: the first 20 articles of the offline Wikipedia corpus with at least
8192 tokens, each cut to its first 8192 tokens (hf_sparse_attn.eval.model_bench.article_token_sets); the first 4
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
4. the report (also alone: --report-only): OUT/results.json, OUT/results.md, OUT/frontier.png.
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
    from hf_sparse_attn.eval.model_bench import article_token_sets, prefill_and_nll

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
                             repeats=args.repeats, search=args.search)

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
    plans = [cal.plan_summary(PatchPlan.load(p)) for p in sorted(glob.glob(os.path.join(args.out, "plan_*.json")))]
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
            fixed += cal.fixed_plans_on(records, titles["heldout"], source=os.path.dirname(path))
    rows = cal.compare_budgets([p for p in plans if p["budget"] is not None], fixed)
    proxy_path = os.path.join(args.out, "proxy.json")
    proxy = json.load(open(proxy_path)) if os.path.exists(proxy_path) else None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    meta = {"model": "SmolLM2-135M-Instruct (fp32)", "tokens": args.tokens, "articles": titles,
            "metric": args.metric, "search": args.search, "proxy": args.proxy, "methods": args.methods, "candidates": args.candidates, "layers": args.layers,
            "threads": args.threads, "command": "scripts/calibrate_smollm2.py " + " ".join(sys.argv[1:]),
            "machine": "2-core CPU VM, no GPU", "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "load_avg_1min_at_report": load, "fixed_sources": args.fixed}
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "budgets": rows, "fixed": fixed, "proxy": proxy, "notes": notes}, f, indent=2)
    text = cal.results_markdown(rows, fixed, proxy, meta, notes)
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    if fixed or any(r.get("heldout_speedup") for r in rows):
        cal.frontier_plot(rows, fixed, os.path.join(args.out, "frontier.png"),
                          title=f"SmolLM2 at {args.tokens} tokens, {len((titles or {}).get('heldout', []))} held-out "
                                "articles: fixed plans vs calibrated plans")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
