"""Calibrated plans on real SmolLM2-135M-Instruct at 8k tokens: calibrated on 4 Wikipedia articles, checked on 16
others, at perplexity budgets of 1%, 3% and 5% (hf_sparse_attn.eval.calibrate, metric "loss").

The 20 articles are those of the model grid: the first 20 articles of the offline Wikipedia corpus with at least
8192 tokens, each cut to its first 8192 tokens (hf_sparse_attn.eval.model_bench.article_token_sets); the first 4
calibrate, the other 16 are held out. One torch thread. Every measurement goes to one JSONL cache
(OUT/cells.jsonl): the three budgets share every single-layer cell, and a killed run resumes where it stopped —
run the same command again. Each budget writes OUT/plan_<budget>.json; the summary goes to OUT/results.json and
OUT/results.md (held-out perplexity change and prefill speed-up, the exact model timed on the same held-out
articles; on a resumed run the two timings may come from different runs: see each plan's calibration record).

    taskset -c 1 .venv/bin/python scripts/calibrate_smollm2.py                     # writes eval/results/calibrate_smollm2/
    taskset -c 0 .venv/bin/python scripts/calibrate_smollm2.py --tokens 4096 --calib-articles 1 \\
        --heldout-articles 1 --layers 3,20 --out /tmp/calibrate_tiny              # a path check (~25 min on a shared core)

Expected run time at the defaults on one core of the 2-core VM (one 8k prefill ~10.5 s): 30 layers
x 9 candidates = 270 single-layer loss cells on 4 articles (~45 s each; only cells whose method is faster than exact
are measured) up to ~3.4 h, capture, error and timing (~40 s per layer) ~20 min, combined checks and the 16
held-out articles (exact + 3 plans, ~12 min) — about 4 h.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--calib-articles", type=int, default=4)
    parser.add_argument("--heldout-articles", type=int, default=16)
    parser.add_argument("--budgets", default="0.01,0.03,0.05")
    parser.add_argument("--methods", default="hyper,sparse_hyper,local")
    parser.add_argument("--metric", choices=("loss", "output_error"), default="loss")
    parser.add_argument("--layers", default=None, help="comma-separated eligible layers (default all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="eval/results/calibrate_smollm2")
    args = parser.parse_args(argv)

    from hf_sparse_attn import calibrate
    from hf_sparse_attn.eval.data import load_smollm2
    from hf_sparse_attn.eval.model_bench import article_token_sets

    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    model, tokenizer = load_smollm2()
    articles = article_token_sets(tokenizer, args.tokens, args.calib_articles + args.heldout_articles)
    calib = [ids for _, ids in articles[:args.calib_articles]]
    heldout = [ids for _, ids in articles[args.calib_articles:]]
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        start = time.perf_counter()
        plan = calibrate(model, calib, budget=budget, methods=methods, metric=args.metric, heldout_ids=heldout,
                         layers=layers, cache=os.path.join(args.out, "cells.jsonl"))
        print(plan.report(), flush=True)
        plan.save(os.path.join(args.out, f"plan_{budget:g}.json"))
        info, held = plan.calibration, plan.calibration["heldout"]
        rows.append({"budget": budget, "patched_layers": plan.patched_layers,
                     "choices": {r["layer"]: r["choice"] for r in info["layers"] if r["choice"]},
                     "calibration_change": info["calibration_change"], "heldout_change": held["change"],
                     "heldout_speedup": held["speedup"], "exact_prefill_s": held["exact_prefill_s"],
                     "plan_prefill_s": held["plan_prefill_s"], "proxy_spearman": info["proxy_spearman"],
                     "backoff_steps": len(info["steps"]), "seconds_this_run": time.perf_counter() - start})
    meta = {"model": "SmolLM2-135M-Instruct (fp32)", "tokens": args.tokens,
            "calibration_articles": [t for t, _ in articles[:args.calib_articles]],
            "heldout_articles": [t for t, _ in articles[args.calib_articles:]], "metric": args.metric,
            "methods": methods, "layers": layers, "threads": args.threads, "argv": sys.argv[1:],
            "machine": "2-core CPU VM, no GPU", "date": time.strftime("%Y-%m-%d", time.gmtime())}
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "budgets": rows}, f, indent=2)
    lines = [f"# Calibrated plans, SmolLM2 at {args.tokens} tokens", "",
             f"Script: `scripts/calibrate_smollm2.py {' '.join(sys.argv[1:])}`; machine: {meta['machine']}; "
             f"date {meta['date']}; {args.threads} thread(s). Calibrated on {len(calib)} article(s), held out "
             f"{len(heldout)}; metric {args.metric}; methods {', '.join(methods)}.", "",
             "| budget | layers patched | calibration change | held-out change | held-out prefill speed-up | "
             "proxy Spearman (error vs loss) | back-off steps |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        rho = r["proxy_spearman"].get("rho")
        lines.append(f"| {100 * r['budget']:.0f}% | {len(r['patched_layers'])} | {100 * r['calibration_change']:+.2f}% | "
                     f"{100 * r['heldout_change']:+.2f}% | {r['heldout_speedup']:.2f}x | "
                     f"{'-' if rho is None else f'{rho:+.2f}'} | {r['backoff_steps']} |")
    lines += ["", "Goal: held-out change within the budget plus 1 point at every budget: "
              + ", ".join(f"{100 * r['budget']:.0f}%: {'met' if r['heldout_change'] <= r['budget'] + 0.01 else 'NOT met'}"
                          for r in rows)]
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
