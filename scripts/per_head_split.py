"""Per-head plans on one CPU thread: does running a method on some KV groups of a layer and exact SDPA on the rest
save more (or less) than the approximated heads' share of the layer's saving?

SmolLM2-135M's attention shapes: q [1, 9, N, 64] over k, v [1, 3, N, 64] (GQA, 3 query heads per KV head),
N = --tokens 8192, causal, random standard-normal q/k/v (seed 0), fp32, torch.set_num_threads(1). Calls:

* exact SDPA on all heads: ``scaled_dot_product_attention(q, k, v, is_causal=True)`` with each KV head repeated
  for its query heads (``expand_kv_heads``), as the model's own SDPA layer runs it;
* a method on all heads, through the adapter's call (``hf_sparse_attn.patches.base.LayerRuntime.attend``: KV heads
  expanded, the method's check, its generator), for local w1024 (num_sink_tokens default) and sparse_hyper single
  pass (window 512, block size 128, the other parameters default);
* splits by KV group: the method on the first k query heads (k / 3 KV groups; --method-heads 6 3) through the same
  call, exact SDPA on the other 9 - k, and ``torch.cat`` of the two outputs along the head dimension.

Every repeat times every call once, in the order above (so all see the same machine load); the table gives medians
over the repeats, and next to each split the share-weighted prediction t_method * k / 9 + t_exact * (9 - k) / 9
from the medians of the two all-head calls. One untimed warm-up pass per invocation (--warmup).

Resumable: results.json is rewritten after every repeat, and a run again only adds the repeats still missing (each
repeat keeps its own date and load average). Writes --out/{results.json, results.md, measured_vs_predicted.png}.
Full measurement (the defaults, warm-up + 3 repeats): about 1 minute on one core (exact SDPA ~1.5 s a call at 8192
tokens here when the core is free; on a loaded core it took 4.8 s, and the run takes 2-3 minutes).

    taskset -c 0 .venv/bin/python scripts/per_head_split.py --out eval/results/per_head_split
    .venv/bin/python scripts/per_head_split.py --out eval/results/per_head_split --report-only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from typing import Callable

import torch
from tqdm import tqdm

from hf_sparse_attn.eval.bench.kernel_suite import random_qkv
from hf_sparse_attn.eval.store import write_json
from hf_sparse_attn.methods import get_spec
from hf_sparse_attn.methods.common import expand_kv_heads
from hf_sparse_attn.patches.base import LayerRuntime
from hf_sparse_attn.plan import LayerPlan

OUT_DIR = os.path.join("eval", "results", "per_head_split")
MACHINE = "2-core CPU VM, no GPU"
EXACT = "exact SDPA"
# label -> (method, params): the defaults of the method are filled in by its spec (and stored in results.json)
METHODS: dict[str, tuple[str, dict]] = {
    "local w1024": ("local", {"window": 1024}),
    "sparse_hyper single pass w512 b128": ("sparse_hyper", {"causal_mode": "single_pass", "window": 512,
                                                            "block_size": 128}),
}
SETTING_KEYS = ("tokens", "heads", "kv_heads", "head_dim", "method_heads", "seed")


def predicted_split(t_method: float, t_exact: float, method_heads: int, heads: int) -> float:
    """The share-weighted time of a split: the method on ``method_heads`` of ``heads`` query heads, exact on the
    rest, each at its all-heads time scaled by its share of the heads (time linear in the head count)."""
    if not 0 <= method_heads <= heads:
        raise ValueError(f"method_heads={method_heads} must lie in [0, heads={heads}]")
    return t_method * method_heads / heads + t_exact * (heads - method_heads) / heads


def call_names(method_heads: list[int], heads: int) -> list[str]:
    """The calls of one repeat, in their timing order."""
    names = [f"{EXACT}, {heads} heads"]
    for label in METHODS:
        names.append(f"{label}, {heads} heads")
        names += [f"{label} on {m} heads + exact on {heads - m} + concatenation" for m in method_heads]
    return names


def build_calls(setting: dict) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, dict]]:
    """{call name: a function computing its output [1, heads, N, D]} and the resolved parameters of each method."""
    H, Hkv, N, D = setting["heads"], setting["kv_heads"], setting["tokens"], setting["head_dim"]
    groups = H // Hkv
    q = random_qkv(N, heads=H, head_dim=D, seed=setting["seed"])[0]
    _, k, v = random_qkv(N, heads=Hkv, head_dim=D, seed=setting["seed"])
    scale = D ** -0.5
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def exact(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
        return sdpa(qh, expand_kv_heads(kh, groups), expand_kv_heads(vh, groups), is_causal=True, scale=scale)

    def through_adapter(runtime: LayerRuntime, qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
        out = runtime.attend(qh, kh, vh, scale=scale, causal=True, key_padding_mask=None)
        if out is None:
            raise SystemExit(f"{runtime.method} ran exact attention instead of itself ({runtime.layer_plan.fallbacks}): "
                             f"give --tokens at least its min_seq_len ({runtime.params.get('min_seq_len')})")
        return out

    calls: dict[str, Callable[[], torch.Tensor]] = {f"{EXACT}, {H} heads": lambda: exact(q, k, v)}
    resolved = {}
    for label, (method, params) in METHODS.items():
        full = get_spec(method).resolve_params(params)
        resolved[label] = {"method": method, "params": full}
        runtime = LayerRuntime(0, method, full, 0, LayerPlan(0, 0.0, 0, method, dict(full)))
        calls[f"{label}, {H} heads"] = lambda r=runtime: through_adapter(r, q, k, v)
        for m in setting["method_heads"]:
            g = m // groups  # KV groups the method takes

            def split(r=runtime, m=m, g=g) -> torch.Tensor:
                return torch.cat([through_adapter(r, q[:, :m], k[:, :g], v[:, :g]),
                                  exact(q[:, m:], k[:, g:], v[:, g:])], dim=1)

            calls[f"{label} on {m} heads + exact on {H - m} + concatenation"] = split
    assert list(calls) == call_names(setting["method_heads"], H)
    return calls, resolved


def medians(results: dict) -> dict[str, float]:
    names = call_names(results["setting"]["method_heads"], results["setting"]["heads"])
    return {name: statistics.median(r["times_s"][name] for r in results["repeats"]) for name in names}


def rows(results: dict) -> list[dict]:
    """One row per call: median time, ratio to exact, and for a split its prediction."""
    s = results["setting"]
    H = s["heads"]
    t = medians(results)
    t_exact = t[f"{EXACT}, {H} heads"]
    out = [{"call": f"{EXACT}, {H} heads", "time_s": t_exact, "vs_exact": 1.0, "predicted_s": None}]
    for label in METHODS:
        t_method = t[f"{label}, {H} heads"]
        out.append({"call": f"{label}, {H} heads", "time_s": t_method, "vs_exact": t_exact / t_method,
                    "predicted_s": None})
        for m in s["method_heads"]:
            name = f"{label} on {m} heads + exact on {H - m} + concatenation"
            out.append({"call": name, "time_s": t[name], "vs_exact": t_exact / t[name],
                        "predicted_s": predicted_split(t_method, t_exact, m, H), "method_heads": m})
    return out


def write_report(results: dict, out_dir: str) -> None:
    s = results["setting"]
    reps = results["repeats"]
    loads = [r["loadavg_1min"] for r in reps]
    dates = sorted({r["date"] for r in reps})
    table = rows(results)
    config = os.path.join("eval", "experiments", os.path.basename(os.path.normpath(out_dir)) + ".toml")
    lines = ["# Per-head plans: a method on some KV groups, exact SDPA on the rest", "",
             f"Machine: {results['machine']}. Date: {', '.join(dates)}. torch {results['torch']}, "
             f"{results['threads']} torch thread. 1-min load average at each repeat: "
             f"{', '.join(f'{x:.2f}' for x in loads)}"
             + (" (the core was shared with other jobs)." if max(loads) > 1.5 else "."),
             "Commands: " + "; ".join(f"`{c}`" for c in results["commands"])
             + (f" (experiment `{config}`)." if os.path.exists(config) else "."), "",
             f"Shapes of SmolLM2-135M: q [1, {s['heads']}, {s['tokens']}, {s['head_dim']}] over k, v "
             f"[1, {s['kv_heads']}, {s['tokens']}, {s['head_dim']}], causal, random standard-normal (seed {s['seed']}), "
             f"fp32; medians of {len(reps)} repeats, every call timed once per repeat. The methods run through the "
             "adapter's call (`LayerRuntime.attend`); exact SDPA with the KV heads repeated. Predicted = t_method x k / "
             f"{s['heads']} + t_exact x ({s['heads']} - k) / {s['heads']} from the all-head medians (k = the method's "
             "heads). Parameters: " + "; ".join(f"{label}: {m['method']} {m['params']}"
                                                for label, m in results["methods"].items()) + ".", "",
             "| call | time s | vs exact | predicted s | measured / predicted |", "|---|---|---|---|---|"]
    for r in table:
        pred = "-" if r["predicted_s"] is None else f"{r['predicted_s']:.2f}"
        ratio = "-" if r["predicted_s"] is None else f"{r['time_s'] / r['predicted_s']:.3f}"
        lines.append(f"| {r['call']} | {r['time_s']:.2f} | {r['vs_exact']:.2f}x | {pred} | {ratio} |")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = range(len(table))
    ax.bar([x - 0.2 for x in xs], [r["time_s"] for r in table], 0.4, label="measured (median)", color="C0")
    ax.bar([x + 0.2 for x in xs], [r["predicted_s"] or 0 for r in table], 0.4, label="share-weighted prediction",
           color="C1")
    short = [r["call"].replace(" + concatenation", "").replace("sparse_hyper single pass", "sparse_hyper sp")
             .replace(" + exact on ", "\n+ exact on ") for r in table]
    ax.set_xticks(list(xs), short, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("seconds (one call, one thread)")
    ax.set_ylim(0, 1.25 * max(r["time_s"] for r in table))  # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(f"Per-head splits, {s['heads']} q heads / {s['kv_heads']} KV heads, N={s['tokens']}, causal; "
                 f"{results['machine']}, {dates[-1]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "measured_vs_predicted.png"), dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=9, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=3, help="key/value heads (GQA)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--method-heads", type=int, nargs="+", default=[6, 3],
                        help="query heads the method takes in each split (multiples of heads / kv-heads)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (a run again adds the missing ones)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes over every call per invocation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random q/k/v")
    parser.add_argument("--out", default=OUT_DIR)
    parser.add_argument("--report-only", action="store_true", help="rewrite results.md and the plot from results.json")
    parser.add_argument("--shard", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.shard is not None:
        parser.error("per_head_split.py cannot shard: every call is timed in the same process; run it without --shard")
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    groups = args.heads // args.kv_heads
    bad = [m for m in args.method_heads if m % groups or not 0 < m < args.heads]
    if bad:
        parser.error(f"--method-heads {bad}: each must be a multiple of {groups} (query heads per KV head) strictly "
                     f"between 0 and {args.heads}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    setting = {key: getattr(args, key) for key in SETTING_KEYS}
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f)
        if not args.report_only and results["setting"] != setting:
            raise SystemExit(f"{path} was measured with {results['setting']}; this run asks for {setting}: pass "
                             "another --out, or delete that file")
    elif args.report_only:
        raise SystemExit(f"--report-only: no {path} to report; run without --report-only first")
    else:
        results = {"machine": MACHINE, "setting": setting, "commands": [], "repeats": []}
    todo = 0 if args.report_only else max(0, args.repeats - len(results["repeats"]))
    if todo:
        command = shlex.join(["scripts/per_head_split.py"] + (sys.argv[1:] if argv is None else argv))
        calls, resolved = build_calls(setting)
        if results.get("methods", resolved) != resolved:
            raise SystemExit(f"{path} was measured with other method parameters ({results['methods']}); the script "
                             f"now has {resolved}: pass another --out, or delete that file")
        results.update(torch=torch.__version__, threads=torch.get_num_threads(), methods=resolved)
        results["commands"].append(command)
        with torch.no_grad():
            for _ in tqdm(range(args.warmup), desc="warm-up"):
                for call in calls.values():
                    call()
            for _ in tqdm(range(todo), desc="repeats"):
                rep = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                       "loadavg_1min": round(os.getloadavg()[0], 2), "times_s": {}}
                for name, call in calls.items():
                    start = time.perf_counter()
                    out = call()
                    rep["times_s"][name] = time.perf_counter() - start
                    assert out.shape == (1, args.heads, args.tokens, args.head_dim), (name, out.shape)
                results["repeats"].append(rep)
                write_json(path, results)
    elif not results["repeats"]:
        raise SystemExit(f"{path} has no repeats yet; run without --report-only")
    write_report(results, args.out)
    print(open(os.path.join(args.out, "results.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
