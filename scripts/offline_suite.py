"""Offline long-context suite on real SmolLM2-135M-Instruct: unpatched (exact) vs `hyper` vs `sparse_hyper` on a
growing number of replaced layers, chosen by Q/K weight norm (seed 002 §5.1) and by "last".

Resumable and parameterized: every (method, select, layers) run writes its predictions sample by sample under
OUT/runs/<run>/ (rerun the same command to continue after a crash or a --budget-minutes stop); the aggregate
(table.md, results.json, score_vs_layers.png, results.md) is rebuilt from whatever runs exist.

    .venv/bin/python scripts/offline_suite.py --contexts 2,4 --samples 2 --budget-minutes 30   # reduced grid
    .venv/bin/python scripts/offline_suite.py --contexts 2,4,8 --samples 5                      # full grid
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

MACHINE = "2-core CPU VM, no GPU (shared with other jobs)"
DATE = "2026-11-22"


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
                   help="method parameters (default min_seq_len=512: leaf size of the causal recursion, so that "
                        "2k-4k prompts are approximated at all; the method default 4096 would run them exact)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-minutes", type=float, default=None, help="start no new run after this much wall time")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild table/plot/JSON from OUT/runs")
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
    from hf_sparse_attn.eval.longbench.cli import parse_params
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

    aggregate(args, suite, model.config.num_hidden_layers)
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


def _records(run_dir: str) -> dict[str, dict]:
    from hf_sparse_attn.eval.longbench.predict import merged_records, task_prediction_files

    return {r["_id"]: r for paths in task_prediction_files(run_dir).values() for r in merged_records(paths)}


def _sample_seconds(run_dir: str) -> dict[str, list[float]]:
    from hf_sparse_attn.eval.longbench.predict import merged_records, task_prediction_files

    return {task: [r["seconds"] for r in merged_records(paths) if "seconds" in r]
            for task, paths in task_prediction_files(run_dir).items()}


def aggregate(args, suite, num_layers: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _load_runs(args.out)
    if not runs:
        return
    tasks = sorted({t for r in runs.values() for t in r["result"]},
                   key=lambda t: (int(t.rsplit("_", 1)[1][:-1]), t))
    contexts = sorted({int(t.rsplit("_", 1)[1][:-1]) for t in tasks})
    expected = {name: len(samples) for name, samples in suite.items()}

    def complete(run) -> bool:
        return all(len(run["seconds"].get(t, [])) >= n for t, n in expected.items())

    def avg(run, k=None):
        values = [v for t, v in run["result"].items() if k is None or t.endswith(f"_{k}k")]
        return round(sum(values) / len(values), 2) if values else None

    baseline_records = next((r["records"] for r in runs.values() if r["meta"]["layers"] == 0), {})

    def contains_answer(run) -> float:  # share of samples whose prediction contains a gold answer verbatim
        recs = list(run["records"].values())
        return round(100 * sum(any(a in r["pred"] for a in r["answers"]) for r in recs) / max(1, len(recs)), 1)

    def same_as_exact(run) -> float:  # share of samples whose prediction equals the unpatched model's
        common = [i for i in run["records"] if i in baseline_records]
        same = sum(run["records"][i]["pred"] == baseline_records[i]["pred"] for i in common)
        return round(100 * same / max(1, len(common)), 1)

    lines = [f"| run | method | select | replaced layers | " + " | ".join(tasks) + " | "
             + " | ".join(f"avg {k}k" for k in contexts) + " | average | contains answer % | same as exact % | complete |",
             "|---" * (8 + len(tasks) + len(contexts)) + "|"]
    table = []
    order = sorted(runs, key=lambda n: (runs[n]["meta"]["layers"], runs[n]["meta"]["select"], runs[n]["meta"]["method"]))
    for name in order:
        run, meta = runs[name], runs[name]["meta"]
        row = {"run": name, "method": meta["method"], "select": meta["select"], "layers": meta["layers"],
               "scores": run["result"], "average": avg(run), "complete": complete(run),
               "contains_answer_pct": contains_answer(run), "same_as_exact_pct": same_as_exact(run),
               "samples": len(run["records"]), "patched_layers": meta.get("patched_layers"),
               "fallbacks": meta.get("fallbacks"),
               **{f"avg_{k}k": avg(run, k) for k in contexts}}
        table.append(row)
        lines.append(f"| {name} | {meta['method'] if meta['layers'] else 'exact (unpatched)'} | {meta['select']} | "
                     f"{meta['layers']} | " + " | ".join(f"{run['result'].get(t, float('nan')):.2f}" for t in tasks)
                     + " | " + " | ".join(f"{row[f'avg_{k}k']:.2f}" for k in contexts)
                     + f" | {row['average']:.2f} | {row['contains_answer_pct']} | {row['same_as_exact_pct']}"
                     + f" | {'yes' if row['complete'] else 'partial'} |")
    table_md = "\n".join(lines)

    # seconds per sample by context size and method family (for the full-grid estimate)
    per_context: dict[str, dict[int, list[float]]] = {}
    for run in runs.values():
        family = "exact" if run["meta"]["layers"] == 0 else run["meta"]["method"]
        for task, secs in run["seconds"].items():
            k = int(task.rsplit("_", 1)[1][:-1])
            per_context.setdefault(family, {}).setdefault(k, []).extend(secs)
    timing = {f: {k: round(statistics.mean(v), 2) for k, v in sorted(d.items())} for f, d in per_context.items()}

    panels = contexts + [None] if len(contexts) > 1 else contexts
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    baseline = next((r for r in table if r["layers"] == 0), None)
    for ax, k in zip(axes[0], panels):
        key = "average" if k is None else f"avg_{k}k"
        for method in args.methods.split(","):
            for select, style in zip(args.selects.split(","), ("-o", "--s", ":^")):
                pts = sorted((r["layers"], r[key]) for r in table  # all layers replaced: one run for every select
                             if r["method"] == method and r["layers"] > 0
                             and (r["select"] == select or r["layers"] >= num_layers))
                if baseline is not None:
                    pts = [(0, baseline[key])] + pts
                if len(pts) > 1:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{method} ({select})")
        ax.set_title(f"offline suite, {'all contexts' if k is None else f'{k}k context'}")
        ax.set_xlabel("replaced layers (of 30)")
        ax.set_ylabel("score (0-100)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M-Instruct, {args.samples} sample(s)/task, seed {args.seed}\n{MACHINE}, {DATE}", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "score_vs_layers.png"), dpi=110)
    plt.close(fig)

    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"machine": MACHINE, "date": DATE, "script": "scripts/offline_suite.py", "argv": sys.argv[1:],
                   "contexts_k": contexts, "samples_per_task": args.samples, "params": parse_params_safe(args.param),
                   "seconds_per_sample": timing, "rows": table}, f, indent=2)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(f"# Offline suite, SmolLM2-135M-Instruct ({MACHINE}, {DATE})\n\n"
                f"Produced by `scripts/offline_suite.py` (commands below); method params "
                f"{parse_params_safe(args.param)}; {args.samples} sample(s) per task, seed {args.seed}. Scores are "
                "LongBench metrics x 100 (needle: qa_f1, retrieval: retrieval, count: count). 'contains answer': "
                "the gold answer appears verbatim in the prediction; 'same as exact': the prediction equals the "
                "unpatched model's.\n\n")
        f.write(table_md + "\n")
        log = os.path.join(args.out, "commands.log")
        if os.path.exists(log):
            f.write("\nCommands that produced these runs (rerun the same command to resume or extend):\n\n```\n"
                    + open(log).read() + "```\n")
    return None


def parse_params_safe(items):
    from hf_sparse_attn.eval.longbench.cli import parse_params

    return parse_params(items)


if __name__ == "__main__":
    sys.exit(main())
