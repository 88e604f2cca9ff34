"""Decode steps under torch.compile: real SmolLM2-135M, one thread, a ``StaticCache`` after a long prompt.

transformers' fast generation path compiles the single-token step against a ``StaticCache`` (fixed shapes: one graph
for every step). There the unpatched model's attention reads every slot of the preallocated cache each step, masked
or not. A patched model hands each call against the cache to one operator that runs the layer's decode method at run
time (hf_sparse_attn/patches/compiled_cache.py). Kinds (--kinds):

* ``unpatched``: the model as loaded;
* ``recommended``: a copy patched with ``recommended(model)`` (block_select prefill on every layer; exact decode on
  the layers of largest Q/K weight norm, sinks + window on the others);
* ``local_decode``: a copy with the same prefill and sinks + window decode on every layer;
* ``quest_split``: ``recommended(model)`` with ``quest`` (token budget 4096) instead of exact decode on its exact
  layers: the decode plan of ruler_decode_16k's ``block_select_w1024_s64_30_decode_quest_b4096_split_20`` row. Its
  page index is kept for the StaticCache by the layer's runtime (hf_sparse_attn/patches/static_index.py).

Per context length (tokens of one real Wikipedia article) each kind prefills its own StaticCache (eager, untimed),
compiles its model (``torch.compile(model, backend=--backend)``; the first call's seconds are reported as the compile
time, one more warm-up step follows), then --steps rounds are timed: in each round every kind takes one compiled step
and one eager step on its cache (the previous argmax as input, the 2-D mask of ones grown by one, as generate() does),
so every side sees the same load. Reported: median ms per token, speed-ups against the unpatched model in the same
mode with 95% bootstrap intervals over rounds, and the patched layers' served / fallback counts (the compiled steps
ran the decode methods).

Writes --out/{results.json, results.md}.

    taskset -c 1 .venv/bin/python scripts/bench_compiled_decode.py --out eval/results/decode_compiled_smollm2
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time

import torch

from hf_sparse_attn.eval.script_report import command_line, write_report

KINDS = ("unpatched", "recommended", "local_decode", "quest_split")
# quest's budget on recommended(model)'s exact-decode layers (eval/results/ruler_decode_16k: its pass keys at 16k)
QUEST_SPLIT_TOKEN_BUDGET = 4096
MODES = ("compiled", "eager")
WARMUP_STEPS = 2  # the compiling call and one more


def patched_copy(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """The model of ``kind`` (a patched deep copy, or ``model`` itself for ``unpatched``)."""
    from hf_sparse_attn import patch_model, recommended
    from hf_sparse_attn.recommend import LOCAL_DECODE, RECOMMENDED_PREFILL

    if kind == "unpatched":
        return model
    copied = copy.deepcopy(model)
    if kind == "recommended":
        patch_model(copied, **recommended(copied))
    elif kind == "quest_split":
        patch_model(copied, **{**recommended(copied), "decode_method": "quest",
                               "decode_params": {"token_budget": QUEST_SPLIT_TOKEN_BUDGET}})
    else:
        patch_model(copied, **RECOMMENDED_PREFILL, layers="all", **LOCAL_DECODE)
    return copied


@torch.no_grad()
def time_context(models: dict[str, torch.nn.Module], ids: torch.Tensor, steps: int, backend: str) -> dict:
    from transformers import StaticCache

    from hf_sparse_attn.patches.decode_cache import cache_keyword

    n = ids.shape[1]
    state = {}
    for kind, model in models.items():
        cache = StaticCache(config=model.config, max_cache_len=n + WARMUP_STEPS + 2 * steps + 1)
        name = cache_keyword(model)
        start = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, cache_position=torch.arange(n),
                       **{name: cache}).logits
        state[kind] = {"cache": cache, "name": name, "token": logits[:, -1:].argmax(-1), "position": n,
                       "prefill_s": time.perf_counter() - start, "compiled": torch.compile(model, backend=backend),
                       "ms": {mode: [] for mode in MODES}}
        del logits

    def step(kind: str, mode: str) -> float:
        s = state[kind]
        forward = s["compiled"] if mode == "compiled" else models[kind]
        mask = torch.ones(1, s["position"] + 1, dtype=torch.long)
        start = time.perf_counter()
        out = forward(input_ids=s["token"], attention_mask=mask, use_cache=True,
                      cache_position=torch.tensor([s["position"]]), **{s["name"]: s["cache"]})
        s["token"] = out.logits[:, -1:].argmax(-1)
        elapsed = time.perf_counter() - start
        s["position"] += 1
        return elapsed

    for kind in models:
        state[kind]["compile_s"] = step(kind, "compiled")
        for _ in range(WARMUP_STEPS - 1):
            step(kind, "compiled")
    from hf_sparse_attn import current_plan

    for plan_model in models.values():
        plan = current_plan(plan_model)
        if plan is not None:
            plan.reset_counts()  # counts of the timed steps only
    for _ in range(steps):
        for mode in MODES:
            for kind in models:
                state[kind]["ms"][mode].append(1e3 * step(kind, mode))
    return {kind: {"prefill_s": s["prefill_s"], "compile_s": s["compile_s"], "step_ms": s["ms"],
                   "median_ms": {mode: statistics.median(s["ms"][mode]) for mode in MODES}}
            for kind, s in state.items()}


def plan_counts(model: torch.nn.Module) -> dict | None:
    """Served / fallback counts of the timed steps, summed over the patched layers (None: unpatched)."""
    from hf_sparse_attn import current_plan

    plan = current_plan(model)
    if plan is None:
        return None
    fallbacks: dict[str, int] = {}
    for layer in plan.layers:
        for reason, count in layer.decode_fallbacks.items():
            fallbacks[reason] = fallbacks.get(reason, 0) + count
    return {"decode_served": sum(layer.decode_served for layer in plan.layers), "decode_fallbacks": fallbacks,
            "layers_by_decode_method": {m: sum(layer.decode_method == m for layer in plan.layers)
                                        for m in sorted({layer.decode_method for layer in plan.layers})}}


def markdown(result: dict) -> str:
    from hf_sparse_attn.eval.bench.measure import ratio_interval

    lines = ["# Decode steps under torch.compile: SmolLM2-135M, StaticCache, one thread", "",
             f"Machine: {result['machine']}; torch {result['torch']}, transformers {result['transformers']}, 1 thread, "
             f"torch.compile backend `{result['backend']}`. Date: {result['date']}. Load average (1 min) before / "
             f"after: {result['load_before']:.1f} / {result['load_after']:.1f}.", f"Command: `{result['command']}`", "",
             f"Prompt: the first tokens of the Wikipedia article '{result['article']}', prefilled by each kind into its "
             f"own StaticCache (untimed). {result['steps']} rounds per context; in each round every kind takes one "
             "compiled and one eager single-token greedy step. Median ms per token; speed-up = the unpatched model's "
             "median in the same mode / the kind's, in brackets a 95% bootstrap interval over rounds (ratio of sums); "
             "'compiled vs best unpatched': the unpatched model's faster mode (its median) against the kind's "
             "compiled step, the comparison a user choosing between them makes.",
             "", "| context | kind | compiled ms | eager ms | compiled speed-up | eager speed-up | compiled vs eager "
             "| compiled vs best unpatched | compile s | decode served / fallbacks (timed steps) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n in result["contexts"]:
        row = result["by_context"][str(n)]
        best = min(MODES, key=lambda m: row["unpatched"]["median_ms"][m])
        for kind in result["kinds"]:
            r = row[kind]
            counts = r.get("counts")
            served = "-" if counts is None else (f"{counts['decode_served']} / {sum(counts['decode_fallbacks'].values())} "
                                                 f"({', '.join(f'{k}: {v}' for k, v in counts['layers_by_decode_method'].items())} layers)")
            speed = {m: "1.00x" if kind == "unpatched" else
                     f"{r['speedup'][m]:.2f}x [{r['speedup_ci'][m][0]:.2f}, {r['speedup_ci'][m][1]:.2f}]" for m in MODES}
            lo, hi = ratio_interval(row["unpatched"]["step_ms"][best], r["step_ms"]["compiled"])
            versus_best = (f"{row['unpatched']['median_ms'][best] / r['median_ms']['compiled']:.2f}x [{lo:.2f}, {hi:.2f}] "
                           f"(unpatched {best})")
            lines.append(f"| {n} | {kind} | {r['median_ms']['compiled']:.1f} | {r['median_ms']['eager']:.1f} | "
                         f"{speed['compiled']} | {speed['eager']} | {r['median_ms']['eager'] / r['median_ms']['compiled']:.2f}x | "
                         f"{versus_best} | {r['compile_s']:.0f} | {served} |")
    lines += ["", "Quality is not measured here (the tokens of a compiled step equal the eager step's, "
              "tests/test_compile.py); the retrieval of these decode plans: eval/results/ruler_frontier_smollm2 "
              "(block_select_30_decode_split_20 is `recommended`'s decode, block_select_30_decode_local is "
              "`local_decode`) and eval/results/ruler_decode_16k (block_select_w1024_s64_30_decode_quest_b4096_split_20 "
              "is `quest_split`'s).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--contexts", nargs="+", type=int, default=[8000], help="prompt lengths in tokens")
    parser.add_argument("--steps", type=int, default=16, help="timed rounds per context")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--report-only", action="store_true", help="rewrite results.md from results.json")
    args = parser.parse_args(argv)
    if args.report_only:
        write_report(args.out, markdown)
        return 0
    if "unpatched" not in args.kinds:
        parser.error("--kinds must include unpatched (the baseline of every speed-up)")
    torch.set_num_threads(1)
    import transformers

    from hf_sparse_attn.eval.bench.measure import ratio_interval
    from hf_sparse_attn.eval.data import first_article_of, load_smollm2

    model, tokenizer = load_smollm2()
    longest = max(args.contexts)
    title, ids = first_article_of(tokenizer, longest)
    load_before = os.getloadavg()[0]
    models = {kind: patched_copy(model, kind) for kind in args.kinds}
    by_context = {}
    for n in args.contexts:
        torch._dynamo.reset()
        row = time_context(models, ids[:, :n].contiguous(), args.steps, args.backend)
        base = row["unpatched"]["step_ms"]
        for kind in args.kinds:
            row[kind]["counts"] = plan_counts(models[kind])
            if kind != "unpatched":
                row[kind]["speedup"] = {m: row["unpatched"]["median_ms"][m] / row[kind]["median_ms"][m] for m in MODES}
                row[kind]["speedup_ci"] = {m: ratio_interval(base[m], row[kind]["step_ms"][m]) for m in MODES}
        by_context[str(n)] = row
        print(f"context {n}: " + ", ".join(f"{k} {row[k]['median_ms']['compiled']:.1f} / {row[k]['median_ms']['eager']:.1f} ms"
                                           for k in args.kinds), file=sys.stderr)
    result = {"machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU; one torch thread pinned to one core",
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(), "backend": args.backend,
              "command": command_line(),
              "article": title, "contexts": args.contexts, "steps": args.steps, "kinds": args.kinds,
              "load_before": load_before, "load_after": os.getloadavg()[0], "by_context": by_context}
    write_report(args.out, markdown, result)
    print(f"wrote {args.out}/results.json and results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
