"""Offline long-context suite on real SmolLM2-135M-Instruct: unpatched (exact) vs `hyper` vs `sparse_hyper` on a
growing number of replaced layers, chosen by Q/K weight norm ("Attention is Naturally Sparse" §5.1) and by "last".

Resumable and parameterized: every (method, select, layers) run writes its predictions sample by sample under
OUT/runs/<run>/ (rerun the same command to continue after a crash or a --budget-minutes stop); the aggregate
(results.md, results.json, score_vs_layers.png) is rebuilt from whatever runs exist.

    hf-sparse-attn bench run eval/experiments/offline_suite.toml                 # the committed grid
    hf-sparse-attn bench run eval/experiments/offline_suite.toml --report-only   # rebuild the aggregate
    python scripts/offline_suite.py --contexts 2,4 --samples 2 --budget-minutes 30 --out DIR  # another grid

The committed grid (eval/experiments/offline_suite.toml; commands.log lists every call), one torch thread: the
unpatched model on every kind at 2k (2 samples per task), 4k and 8k (1 sample), then the needle kinds for every
patched configuration with ``--param causal_min_seq_len=1024``, context by context.

The aggregate's date is the date of the measurement (UTC): an invocation that predicts a new sample stamps today;
--aggregate-only, or a rerun with nothing left to predict, keeps the date stored in OUT/results.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import textwrap
import time


import torch

MACHINE = ("2-core CPU VM (AMD EPYC, AVX2), no GPU; 1 torch thread pinned to one core while the other core ran "
           "a model benchmark")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="eval/results/offline_suite")
    p.add_argument("--contexts", default="2,4", help="context sizes in K tokens (x1024)")
    p.add_argument("--samples", type=int, default=2, help="samples per task (kind x context)")
    p.add_argument("--kinds", default="retrieval_en,retrieval_zh,count,needle_start,needle_middle,needle_end")
    p.add_argument("--methods", default="hyper,sparse_hyper")
    p.add_argument("--layers", default="0,30,15,8,23",
                   help="numbers of replaced layers, run in this order (0 = unpatched model)")
    p.add_argument("--selects", default="weight_norm,last")
    p.add_argument("--param", action="append", default=["min_seq_len=512"], metavar="NAME=VALUE",
                   help="method parameters, repeatable (default min_seq_len=512: leaf size of the causal recursion; "
                        "add causal_min_seq_len=1024 so that 2k-4k prompts are approximated at all: the methods' "
                        "defaults run causal calls shorter than 8192 tokens exact)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-minutes", type=float, default=None, help="start no new run after this much wall time")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--aggregate-only", "--report-only", action="store_true", help="only rebuild table/plot/JSON from OUT/runs")
    return p.parse_args(argv)


def run_configs(args, num_layers: int) -> list[tuple[str, str, int]]:
    """(method, select, layers) in the order of --layers (put the most informative counts first: a partial grid is
    then still useful). 0 is the unpatched baseline; replacing all layers is the same run for every select."""
    configs = []
    for n in [int(x) for x in args.layers.split(",")]:
        if n == 0:
            configs.append(("exact", "none", 0))
            continue
        selects = args.selects.split(",")[:1] if n >= num_layers else args.selects.split(",")
        for select in selects:
            for method in args.methods.split(","):
                configs.append((method, select, n))
    return configs


def run_name(method: str, select: str, layers: int) -> str:
    return "exact-L0" if layers == 0 else f"{method}-{select}-L{layers}"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from hf_sparse_attn import patch_model, unpatch_model
    from hf_sparse_attn.eval.data import load_smollm2
    from hf_sparse_attn.commands.longbench import parse_params
    from hf_sparse_attn.eval.longbench.offline import build_offline_suite, write_suite
    from hf_sparse_attn.eval.longbench.predict import predict_tasks
    from hf_sparse_attn.eval.longbench.score import score_directory
    from hf_sparse_attn.eval.longbench.tasks import offline_task

    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    if args.aggregate_only:
        from transformers import AutoConfig

        from hf_sparse_attn.eval.data import smollm2_path
        from hf_sparse_attn.eval.longbench.data import read_jsonl_lines

        data_dir = os.path.join(args.out, "data")
        suite = {}
        for name in sorted(os.listdir(data_dir)):
            with open(os.path.join(data_dir, name), encoding="utf-8") as f:
                suite[name[: -len(".jsonl")]] = read_jsonl_lines(f, name)
        aggregate(args, suite, AutoConfig.from_pretrained(smollm2_path()).num_hidden_layers)
        return 0
    with open(os.path.join(args.out, "commands.log"), "a") as f:  # what produced the runs (aggregate lists it)
        f.write(f"{time.strftime('%Y-%m-%d %H:%M')} .venv/bin/python scripts/offline_suite.py {' '.join(sys.argv[1:])}\n")
    model, tokenizer = load_smollm2()
    measured = False  # whether this invocation predicted a new sample (the aggregate's date)
    contexts = [int(c) for c in args.contexts.split(",")]
    suite = build_offline_suite(tokenizer, contexts, num_samples=args.samples, seed=args.seed,
                                kinds=args.kinds.split(","))
    write_suite(suite, os.path.join(args.out, "data"))
    task_samples = {name: (offline_task(name), samples) for name, samples in suite.items()}
    params = parse_params(args.param)
    max_length = model.config.max_position_embeddings - 32

    for method, select, layers in run_configs(args, model.config.num_hidden_layers):
        if args.budget_minutes is not None and time.perf_counter() - started > 60 * args.budget_minutes:
            print(f"budget of {args.budget_minutes} min reached; rerun to continue", flush=True)
            break
        out_dir = os.path.join(args.out, "runs", run_name(method, select, layers))
        plan = None
        if layers > 0:
            plan = patch_model(model, method=method, layers=layers, select=select, seed=args.seed, **params)
        try:
            counts = predict_tasks(model, tokenizer, task_samples, out_dir, max_length, seed=args.seed)
            measured = measured or counts.get("predicted", 0) > 0
        finally:
            if plan is not None:
                unpatch_model(model)
        result = score_directory(out_dir)
        meta = {"method": method, "select": select, "layers": layers, "params": params if layers else {},
                "patched_layers": plan.patched_layers if plan is not None else [],
                "fallbacks": plan.fallback_counts() if plan is not None else {}, "counts": counts}
        with open(os.path.join(out_dir, "run.json"), "w") as f:
            json.dump(meta, f, indent=2)
        print(run_name(method, select, layers), json.dumps(result), flush=True)

    aggregate(args, suite, model.config.num_hidden_layers, measured=measured)
    return 0


# ---------------------------------------------------------------------------------------------------- aggregate
def _load_runs(out: str) -> dict[str, dict]:
    runs = {}
    root = os.path.join(out, "runs")
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        result_path, meta_path = os.path.join(root, name, "result.json"), os.path.join(root, name, "run.json")
        if os.path.exists(result_path) and os.path.exists(meta_path):
            runs[name] = {"result": json.load(open(result_path)), "meta": json.load(open(meta_path)),
                          "seconds": _sample_seconds(os.path.join(root, name)),
                          "records": _records(os.path.join(root, name))}
    return runs


def _records(run_dir: str) -> dict[str, dict[str, dict]]:
    """task -> {sample id -> prediction record} of one run."""
    from hf_sparse_attn.eval.longbench.predict import merged_records, task_prediction_files

    return {task: {r["_id"]: r for r in merged_records(paths)} for task, paths in task_prediction_files(run_dir).items()}


def _sample_seconds(run_dir: str) -> dict[str, list[float]]:
    from hf_sparse_attn.eval.longbench.predict import merged_records, task_prediction_files

    return {task: [r["seconds"] for r in merged_records(paths) if "seconds" in r]
            for task, paths in task_prediction_files(run_dir).items()}


def _context(task: str) -> int:
    return int(task.rsplit("_", 1)[1][:-1])


def _kind(task: str) -> str:
    return task.rsplit("_", 1)[0]


def measurement_date(out: str, measured: bool) -> str:
    """Today (UTC) when this invocation measured something new, else the date stored in OUT/results.json (today if
    there is none)."""
    path = os.path.join(out, "results.json")
    if not measured and os.path.exists(path):
        with open(path) as f:
            stored = json.load(f).get("date")
        if stored:
            return stored
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


def aggregate(args, suite, num_layers: int, measured: bool = False) -> None:
    """Rebuild results.md, results.json and score_vs_layers.png from every run under OUT/runs.

    The comparison (table and plot) is over the tasks the patched runs were asked for (the needle tasks in the
    committed run); the unpatched model's scores on the other kinds are a table of their own. Per context: mean
    score (LongBench metric x 100), 'found' = share of samples whose prediction contains a gold answer verbatim
    (qa_f1 also penalizes the words around a correct answer), 'same' = share of predictions identical to the
    unpatched model's. A run is complete when it predicted every sample of its tasks (patched runs: the compared tasks; the unpatched
    run: every task of the suite)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _load_runs(args.out)
    if not runs:
        return
    date = measurement_date(args.out, measured)
    expected = {name: len(samples) for name, samples in suite.items()}
    baseline = next((r for r in runs.values() if r["meta"]["layers"] == 0), None)
    patched = [r for r in runs.values() if r["meta"]["layers"] > 0]
    compared = sorted({t for r in patched for t in r["result"]} or (baseline["result"] if baseline else {}),
                      key=lambda t: (_context(t), t))
    contexts = sorted({_context(t) for t in compared})

    def stats(run, k) -> dict:
        tasks = [t for t in compared if _context(t) == k and t in run["result"]]
        recs = [(t, i, r) for t in tasks for i, r in run["records"].get(t, {}).items()]
        if not recs:
            return {"score": None, "found_pct": None, "same_pct": None, "samples": 0}
        base = baseline["records"] if baseline else {}
        common = [(t, i, r) for t, i, r in recs if i in base.get(t, {})]
        return {"score": round(statistics.mean(run["result"][t] for t in tasks), 2),
                "found_pct": round(100.0 * statistics.mean(any(a in r["pred"] for a in r["answers"]) for _, _, r in recs), 1),
                "same_pct": round(100.0 * statistics.mean(r["pred"] == base[t][i]["pred"] for t, i, r in common), 1)
                if common else None,
                "samples": len(recs)}

    def fmt(v, suffix=""):
        return "-" if v is None else f"{v:.1f}{suffix}" if isinstance(v, float) else f"{v}{suffix}"

    table = []
    order = sorted(runs, key=lambda n: (runs[n]["meta"]["layers"], runs[n]["meta"]["select"], runs[n]["meta"]["method"]))
    for name in order:
        run, meta = runs[name], runs[name]["meta"]
        needed = compared if meta["layers"] > 0 else list(expected)  # patched: the compared tasks; exact: every task
        complete = all(len(run["seconds"].get(t, [])) >= expected.get(t, 0) for t in needed)
        table.append({"run": name, "method": meta["method"], "select": meta["select"], "layers": meta["layers"],
                      "params": meta.get("params"), "patched_layers": meta.get("patched_layers"),
                      "fallbacks": meta.get("fallbacks"), "complete": complete, "scores": run["result"],
                      "by_context": {f"{k}k": stats(run, k) for k in contexts}})
    header = ("| method | select | replaced layers | "
              + " | ".join(f"{k}k score | {k}k found % | {k}k same as exact %" for k in contexts) + " | complete |")
    lines = [header, "|---" * (4 + 3 * len(contexts)) + "|"]
    for row in table:
        cells = []
        for k in contexts:
            s = row["by_context"][f"{k}k"]
            cells += [fmt(s["score"]), fmt(s["found_pct"]), fmt(s["same_pct"])]
        lines.append(f"| {row['method'] if row['layers'] else 'exact (unpatched)'} | {row['select']} | {row['layers']} | "
                     + " | ".join(cells) + f" | {'yes' if row['complete'] else 'partial'} |")
    other = sorted((t for t in (baseline["result"] if baseline else {}) if t not in compared), key=lambda t: (_context(t), t))
    other_md = ""
    if other:
        other_md = ("\nThe unpatched model on the other kinds of the suite (the patched runs were not asked for these: "
                    "a score the unpatched 135M model cannot earn says nothing about the methods):\n\n| task | samples | score |\n|---|---|---|\n"
                    + "\n".join(f"| {t} | {len(baseline['records'].get(t, {}))} | {baseline['result'][t]:.2f} |" for t in other) + "\n")

    per_context: dict[str, dict[int, list[float]]] = {}
    for run in runs.values():
        family = "exact" if run["meta"]["layers"] == 0 else run["meta"]["method"]
        for task, secs in run["seconds"].items():
            per_context.setdefault(family, {}).setdefault(_context(task), []).extend(secs)
    timing = {f: {k: round(statistics.mean(v), 2) for k, v in sorted(d.items()) if v} for f, d in per_context.items()}

    methods = sorted({r["method"] for r in table if r["layers"] > 0})
    selects = sorted({r["select"] for r in table if r["layers"] > 0}, key=lambda s: (s != "weight_norm", s))
    colors = {m: c for m, c in zip(methods, ("tab:blue", "tab:orange", "tab:green", "tab:red"))}
    fig, axes = plt.subplots(2, len(contexts), figsize=(4.6 * len(contexts), 7), squeeze=False)
    base_row = next((r for r in table if r["layers"] == 0), None)
    for col, k in enumerate(contexts):
        for row_i, (metric, label) in enumerate((("score", "score (qa_f1 x 100)"), ("found_pct", "gold answer found (%)"))):
            ax = axes[row_i][col]
            for method in methods:
                for select, style in zip(selects, ("-o", "--s", ":^")):
                    pts = sorted((r["layers"], r["by_context"][f"{k}k"][metric]) for r in table
                                 if r["method"] == method and r["layers"] > 0
                                 and (r["select"] == select or r["layers"] >= num_layers)
                                 and r["by_context"][f"{k}k"][metric] is not None)
                    if base_row is not None and base_row["by_context"][f"{k}k"][metric] is not None:
                        pts = [(0, base_row["by_context"][f"{k}k"][metric])] + pts
                    if len(pts) > 1:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colors[method],
                                label=f"{method} ({select})", alpha=0.85)
            n = base_row["by_context"][f"{k}k"]["samples"] if base_row else 0
            ax.set_title(f"{k}k context ({n} samples)", fontsize=9)
            ax.set_xlabel("replaced layers (of 30)")
            ax.set_ylabel(label)
            ax.set_ylim(-3, 103)
            ax.set_xticks([0, 8, 15, 23, 30])
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Offline suite (needle QA), SmolLM2-135M-Instruct, exact vs patched, seed {args.seed}\n"
                 + textwrap.fill(f"{MACHINE}, {date}", 60 * len(contexts)), fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "score_vs_layers.png"), dpi=110)
    plt.close(fig)

    params = next((r["params"] for r in table if r["layers"] > 0), None)
    samples = {t: n for t, n in sorted(expected.items())}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"machine": MACHINE, "date": date, "script": "scripts/offline_suite.py", "contexts_k": contexts,
                   "compared_tasks": compared, "samples_per_task": samples, "params": params,
                   "seconds_per_sample": timing, "rows": table}, f, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"# Offline suite, SmolLM2-135M-Instruct ({MACHINE}, {date})\n\n"
                f"Produced by `scripts/offline_suite.py` (commands below). Method parameters of the patched runs: "
                f"{params}. Compared tasks: {', '.join(compared)}; samples per task: "
                + ", ".join(f"{t} {n}" for t, n in samples.items() if t in compared) + f"; seed {args.seed}. "
                "Score = LongBench metric x 100 (needle: qa_f1); found = the gold answer appears verbatim in the "
                "prediction; same as exact = the prediction equals the unpatched model's. Mean seconds per sample "
                f"(prefill + greedy decoding, 1 thread): {timing}.\n\n![score vs layers](score_vs_layers.png)\n\n")
        f.write("\n".join(lines) + "\n" + other_md)
        log = os.path.join(args.out, "commands.log")
        if os.path.exists(log):
            f.write("\nCommands that produced these runs (rerun the same command to resume or extend):\n\n```\n"
                    + open(log).read() + "```\n")
    return None


def parse_params_safe(items):
    from hf_sparse_attn.commands.longbench import parse_params

    return parse_params(items)


if __name__ == "__main__":
    sys.exit(main())
