"""Causal attention kernels on one CPU thread: local, hyper and sparse_hyper (both causal modes) against SDPA.

For every N in --ns, one random problem q, k, v [1, 8, N, 64] fp32 (standard normal, seed 0), causal. Every
configuration and torch SDPA (``is_causal=True``) run alternately on each repeat in the same process (so both
see the same machine load); the table reports medians. Columns:

* time, ratio = SDPA time / time;
* achieved GFLOP/s = 4 D x (query-key pairs the configuration computes, all heads) / time, where the pairs are
  counted from the kernel calls it makes (padding slots of its tiles included; SDPA: N (N + 1) / 2 per head);
* flop-limit ratio = SDPA's causal pairs / the configuration's pairs: the ratio it would reach at SDPA's GFLOP/s;
* relative Frobenius error ||out - out_SDPA||_F / ||out_SDPA||_F on the random inputs, and at --real-tokens on real
  SmolLM2-135M-Instruct q/k/v (one Wikipedia article, layers --real-layers, captured after RoPE by
  ``hf_sparse_attn.eval.bench.kernel_suite.capture_smollm2_qkv``; KV heads expanded, 9 heads).

Counting pairs: single pass = sinks S + window chunks x 64 x (window + 64) + the block tiles actually built
(``single_pass.single_pass_causal_attention(stats=...)``) + N x sample_size; recursive = exact leaves
leaf (leaf + 1) / 2 per leaf + every level's queries x (block + samples) + sinks; local = sinks + window chunks
x 64 x (window + 64).

Configurations: ``--configs`` takes names of the built-in table CONFIGS (the default: all of it) and/or
declarations ``NAME=METHOD:param=value,param=value`` (values parsed as int, float, true/false, else string), so an
experiment config can declare its own grid (eval/experiments/*.toml). A method that is neither local, hyper nor
sparse_hyper gets no pair count (GFLOP/s and flop-limit ratio "-").

Resumable: results.json is rewritten after every cell and cells already there are skipped; it keeps every
configuration's declaration (a name declared again with other parameters is an error). The machine (CPU count, the
affinity of this process, load average at the start and end of each invocation) goes into results.json and
results.md. Writes --out/{results.json, results.md, ratio_vs_n.png}.

    taskset -c 0 .venv/bin/python scripts/bench_causal_kernels.py --out eval/results/kernels_causal \
        [--ns 1024 2048 4096 8192 16384 32768] [--repeats 3] [--configs "local w1024" "mine=local:window=512"]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time

import torch

from hf_sparse_attn.commands.arguments import parse_params
from hf_sparse_attn.eval.bench.kernel_suite import random_qkv, relative_error, smollm2_article_qkv
from hf_sparse_attn.eval.bench.kernel_timing import machine_state
from hf_sparse_attn.eval.store import write_json
from hf_sparse_attn.methods import causal_recursion, get_method, single_pass
from hf_sparse_attn.methods.window import WINDOW_CHUNK
from hf_sparse_attn.methods.common import expand_kv_heads

OUT_DIR = os.path.join("eval", "results", "kernels_causal")

# name -> (method, params). The defaults of each method are spelled out so that the table says what ran.
CONFIGS: dict[str, tuple[str, dict]] = {
    **{f"local w{w}": ("local", dict(window=w, num_sink_tokens=64)) for w in (128, 256, 512, 1024, 2048)},
    **{f"sparse_hyper single w{w} b{b}": ("sparse_hyper", dict(causal_mode="single_pass", window=w, block_size=b))
       for w, b in ((128, 128), (256, 128), (256, 256), (512, 128), (512, 256))},
    **{f"hyper single w{w} b{b} s{s}": ("hyper", dict(causal_mode="single_pass", window=w, block_size=b, sample_size=s))
       for w, b, s in ((256, 128, 128), (256, 256, 256), (512, 256, 256))},
    "sparse_hyper recursive": ("sparse_hyper", dict(causal_mode="recursive", min_seq_len=2048, block_size=256)),
    "hyper recursive": ("hyper", dict(causal_mode="recursive", min_seq_len=2048, block_size=256, sample_size=256)),
}


# The configurations of CONFIGS that are the methods' defaults (hyper.py, sparse_hyper.py, local.py, defaults.py).
DEFAULT_CONFIGS = {"hyper recursive": "the method's default", "sparse_hyper recursive": "the method's default",
                   "local w1024": "the method's default",
                   "hyper single w512 b256 s256": "the defaults with causal_mode='single_pass'",
                   "sparse_hyper single w512 b256": "the defaults with causal_mode='single_pass'"}


def parse_configs(items: list[str]) -> dict[str, tuple[str, dict]]:
    """--configs items -> {name: (method, params)}: a name of CONFIGS, or ``NAME=METHOD:param=value,param=value``."""
    out: dict[str, tuple[str, dict]] = {}
    for item in items:
        if "=" not in item:
            if item not in CONFIGS:
                raise SystemExit(f"--configs: {item!r} is neither a name of the built-in table ({', '.join(CONFIGS)}) "
                                 "nor a declaration NAME=METHOD:param=value,param=value")
            out[item] = CONFIGS[item]
            continue
        name, decl = item.split("=", 1)
        method, _, plist = decl.partition(":")
        pairs = [x.strip() for x in plist.split(",") if x.strip()]
        for pair in pairs:
            if "=" not in pair or not pair.partition("=")[0].strip():
                raise SystemExit(f"--configs {item!r}: parameter {pair!r} is not param=value")
        params = parse_params(pairs, option="--configs")
        if not name.strip() or not method.strip():
            raise SystemExit(f"--configs {item!r}: write NAME=METHOD:param=value,param=value")
        get_method(method.strip(), **params)  # validates the method and its parameters now, not after an hour
        out[name.strip()] = (method.strip(), params)
    return out


def pairs_per_head(method: str, fn, q, k, v, scale: float) -> float | None:
    """Query-key pairs one head computes (the configuration's kernel calls, tile padding included); None when this
    script does not know how to count the method's pairs."""
    if method not in ("local", "hyper", "sparse_hyper"):
        return None
    p = fn.method_params
    N = q.shape[2]
    H = q.shape[1]
    S = min(p.get("num_sink_tokens", 0), N)
    C = min(WINDOW_CHUNK, N)
    nch = -(-N // C)
    sinks = N * S
    if method == "local":
        return sinks + nch * C * (p["window"] + C)
    if p["causal_mode"] == "single_pass":
        stats: dict = {}
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            single_pass.single_pass_causal_attention(
                q, k, v, scale=scale, key_valid=None, generator=gen, lsh_num_projs=p["lsh_num_projs"],
                block_size=p["block_size"], sample_size=p.get("sample_size", 0), window=p["window"],
                num_sink_tokens=S, stats=stats)
        # window and sample pairs are per head; the block tiles are counted over all B * H heads (B = 1)
        return sinks + stats["window_pairs"] + stats["block_pairs"] / H + stats["sample_pairs"]
    m, leaf = causal_recursion.causal_levels(N, p["min_seq_len"])
    leaves = (1 << m) * leaf * (leaf + 1) / 2
    per_level = (leaf << m) / 2 * (p["block_size"] + p.get("sample_size", 0))
    return sinks + leaves + m * per_level


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"cells": {}}


@torch.no_grad()
def random_cell(n: int, specs: dict[str, tuple[str, dict]], repeats: int) -> dict:
    q, k, v = random_qkv(n, batch=1, heads=8, head_dim=64)
    scale = 64 ** -0.5
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ref = sdpa(q, k, v, is_causal=True, scale=scale)
    names = list(specs)
    fns = {name: get_method(specs[name][0], **specs[name][1]) for name in names}
    calls = {name: (lambda f=f: f(q, k, v, causal=True, scale=scale)[0]) for name, f in fns.items()}
    calls["sdpa"] = lambda: sdpa(q, k, v, is_causal=True, scale=scale)
    errors = {name: relative_error(call(), ref) for name, call in calls.items() if name != "sdpa"}  # also the warm-up
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(timed(call))
    sdpa_pairs = n * (n + 1) / 2
    sdpa_time = statistics.median(times["sdpa"])
    cell = {"n": n, "loadavg_1min": round(os.getloadavg()[0], 2), "sdpa": {"time_s": sdpa_time, "times_s": times["sdpa"],
                             "gflops": 4 * 64 * 8 * sdpa_pairs / sdpa_time / 1e9}, "configs": {}}
    for name in names:
        t = statistics.median(times[name])
        pairs = pairs_per_head(specs[name][0], fns[name], q, k, v, scale)
        cell["configs"][name] = {
            "method": specs[name][0], "params": fns[name].method_params, "time_s": t, "times_s": times[name],
            "ratio": sdpa_time / t, "pairs_per_head": pairs,
            "gflops": None if pairs is None else 4 * 64 * 8 * pairs / t / 1e9,
            "flop_limit_ratio": None if pairs is None else sdpa_pairs / pairs, "rel_error_random": errors[name],
            "loadavg_1min": cell["loadavg_1min"]}
    return cell


def real_cell(layer: int, qkv: tuple, specs: dict[str, tuple[str, dict]]) -> dict:
    q, k, v, scale = qkv
    groups = q.shape[1] // k.shape[1]
    k, v = expand_kv_heads(k, groups).contiguous(), expand_kv_heads(v, groups).contiguous()
    q = q.contiguous()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    out = {}
    for name, (method, params) in specs.items():
        got, _ = get_method(method, **params)(q, k, v, causal=True, scale=scale)
        out[name] = relative_error(got, ref)
    return {"layer": layer, "n": q.shape[2], "rel_error": out}


def pareto(points: dict[str, tuple[float, float]]) -> set[str]:
    """Names whose (ratio, error) no other point beats on both (ratio >= and error <=, one strictly)."""
    front = set()
    for name, (r, e) in points.items():
        if not any((r2 >= r and e2 <= e) and (r2 > r or e2 < e) for o, (r2, e2) in points.items() if o != name):
            front.add(name)
    return front


def fmt(x, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def write_report(results: dict, out_dir: str) -> None:
    cells = results["cells"]
    specs = results["configs"]
    random_cells = sorted((c for key, c in cells.items() if key.startswith("random")), key=lambda c: c["n"])
    real = sorted((c for key, c in cells.items() if key.startswith("smollm2")), key=lambda c: c["layer"])
    names = [n for n in specs if any(n in c["configs"] for c in random_cells) or any(n in c["rel_error"] for c in real)]
    method_of = {name: specs[name]["method"] for name in names}
    runs = results.get("runs", [])
    title = results.get("title") or "Causal attention kernels on one CPU thread: local, hyper, sparse_hyper, kmv vs SDPA"
    lines = [f"# {title}", ""]
    if results.get("question"):
        lines += [f"Question: {results['question']}", ""]
    lines += [f"torch {results['torch']}, python {results['python']}, torch.set_num_threads(1), no GPU. "
              f"Script: `scripts/bench_causal_kernels.py` (B=1, H=8, D=64, fp32, causal, random standard-normal q/k/v; "
              f"each configuration alternated with SDPA on every repeat in the same process, median of the repeats).",
              ""]
    config = os.path.join("eval", "experiments", os.path.basename(os.path.normpath(out_dir)) + ".toml")
    if os.path.exists(config):
        lines += [f"Experiment: `{config}` (`hf-sparse-attn bench run {config}` re-makes this directory; run it pinned "
                  "to one core, e.g. `taskset -c 0`).", ""]
    lines += ["Invocations (each resumes the same results.json; machine state at its start and end):", ""]
    if "argv" in results:  # the cells made before the script recorded its invocations
        lines.append(f"- {results.get('date')}: `scripts/bench_causal_kernels.py {' '.join(results.get('argv', []))}`; "
                     "2-core CPU VM, one thread (this version of the script did not record CPU affinity or load)")
    for run in runs:
        m0, m1 = run.get("machine_start", {}), run.get("machine_end", {})
        lines.append(f"- {run['date']}: `{shlex.join(run['argv'])}`; {m0.get('cpu_count')} CPUs, affinity "
                     f"{m0.get('affinity')}, load average (1/5/15 min) {m0.get('loadavg')} at the start, "
                     f"{m1.get('loadavg', '?')} at the end.")
    loads = [x for run in runs for x in (run.get("machine_start", {}).get("loadavg", [0])[0],
                                         run.get("machine_end", {}).get("loadavg", [0])[0])]
    shared = (f"The core was shared with other jobs (1-min load average {min(loads):.1f}-{max(loads):.1f} with this "
              "process pinned to one core; the load column is the value after each cell). " if loads and max(loads) > 1.5
              else "")
    lines += ["", shared + "Ratios are robust to a shared core (SDPA runs between every two calls of a configuration, so both see "
              "the same load); absolute times are not comparable across runs. GFLOP/s = 4 D x the query-key pairs a "
              "configuration computes (tile padding included) / time; flop-limit ratio = SDPA's causal pairs N(N+1)/2 "
              "/ those pairs (the ratio at SDPA's GFLOP/s). Error = relative Frobenius error against SDPA. On random "
              "inputs the rows are nearly uniform, so every sparse pattern has a large error there (local above 1: its "
              "output norm is larger than the near-zero exact output); the real layers are the error that matters.", ""]
    lines += ["| N | SDPA s | SDPA GFLOP/s | load 1m | configuration | time s | ratio | GFLOP/s | flop-limit ratio | error (random) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in random_cells:
        for name in names:
            if name not in c["configs"]:
                continue
            e = c["configs"][name]
            sdpa_t = e.get("sdpa_time_s", c["sdpa"]["time_s"])  # the SDPA time of the run that timed this entry
            sdpa_gflops = 4 * 64 * 8 * c["n"] * (c["n"] + 1) / 2 / sdpa_t / 1e9
            lines.append(f"| {c['n']} | {sdpa_t:.3f} | {sdpa_gflops:.0f} | {fmt(e.get('loadavg_1min'), '.2f')} | "
                         f"{name} | {e['time_s']:.3f} | {e['ratio']:.2f}x | {fmt(e['gflops'], '.0f')} | "
                         f"{fmt(e['flop_limit_ratio'], '.1f', 'x')} | {e['rel_error_random']:.3f} |")
    if real:
        lines += ["", f"## Relative error on real SmolLM2-135M-Instruct q/k/v ({real[0]['n']} tokens of the Wikipedia "
                  f"article \"{results.get('real_title', '?')}\", causal, 9 heads)", "",
                  "| configuration | " + " | ".join(f"layer {c['layer']}" for c in real) + " | mean |",
                  "|---|" + "---|" * (len(real) + 1)]
        for name in names:
            errs = [c["rel_error"].get(name) for c in real]
            if any(e is None for e in errs):
                continue
            lines.append(f"| {name} | " + " | ".join(f"{e:.3f}" for e in errs) + f" | {sum(errs) / len(errs):.3f} |")
    by_n = {c["n"]: c for c in random_cells}
    defaults = {n: DEFAULT_CONFIGS[n] for n in names if n in DEFAULT_CONFIGS and specs[n]["params"] == dict(CONFIGS[n][1])}
    if 8192 in by_n and 32768 in by_n:
        goal = []
        for name in names:
            if method_of[name] not in ("hyper", "sparse_hyper") or name not in by_n[8192]["configs"] \
                    or name not in by_n[32768]["configs"]:
                continue
            r8, r32 = by_n[8192]["configs"][name]["ratio"], by_n[32768]["configs"][name]["ratio"]
            met = "MET" if r8 >= 3.5 and r32 >= 10 else "not met"
            default = f" ({defaults[name]})" if name in defaults else ""
            goal.append(f"- {name}{default}: {r8:.2f}x at 8k, {r32:.2f}x at 32k: {met}.")
        if goal:
            lines += ["", "## Goal: a configuration of hyper or sparse_hyper at >= 10x SDPA at 32k and >= 3.5x at 8k "
                      "(causal)", ""] + goal
    ns = [c["n"] for c in random_cells]
    if len(ns) > 2 and ns[0] < 8192:  # a crossover table only where the grid reaches below 8k
        lines += ["", "## Crossover: the smallest N of this table where each configuration beats SDPA", "",
                  "| configuration | " + " | ".join(str(n) for n in ns) + " | first N with ratio > 1 |",
                  "|---|" + "---|" * (len(ns) + 1)]
        for name in names:
            row = [by_n[n]["configs"].get(name) for n in ns]
            if sum(r is not None for r in row) < 2:
                continue
            first = next((n for n, r in zip(ns, row) if r is not None and r["ratio"] > 1.0), None)
            lines.append(f"| {name} | " + " | ".join("-" if r is None else f"{r['ratio']:.2f}x" for r in row)
                         + f" | {first or 'none'} |")
    mean_err = {name: sum(c["rel_error"][name] for c in real) / len(real) for name in names
                if real and all(name in c["rel_error"] for c in real)}
    if real and 8192 in by_n:
        cfg8 = by_n[8192]["configs"]
        pts = {name: (cfg8[name]["ratio"], mean_err[name]) for name in names if name in mean_err and name in cfg8}
        front = pareto(pts)
        lines += ["", "## Error against speed at 8k (speed on random inputs, mean error over the real layers)", "",
                  "Pareto: no other configuration of this table is both at least as fast and at least as accurate.", "",
                  "| configuration | ratio at 8k | mean real-layer error | Pareto | a local window at least as fast with lower error |",
                  "|---|---|---|---|---|"]
        for name in pts:
            better = [o for o in pts if method_of[o] == "local" and o != name
                      and pts[o][0] >= pts[name][0] and pts[o][1] < pts[name][1]]
            lines.append(f"| {name} | {pts[name][0]:.2f}x | {pts[name][1]:.3f} | {'yes' if name in front else ''} | "
                         f"{', '.join(better) or '-'} |")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {name: plt.cm.tab20(i % 20) for i, name in enumerate(names)}
    for name in names:
        pts_n = [(c["n"], c["configs"][name]["ratio"]) for c in random_cells if name in c["configs"]]
        ax1.plot([p[0] for p in pts_n], [p[1] for p in pts_n], marker="o", label=name, color=colors[name],
                 linestyle="--" if method_of[name] == "local" else "-")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("N (causal)")
    ax1.set_ylabel("speed-up vs SDPA (same run)")
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.legend(fontsize=7)
    ax1.set_title("B=1 H=8 D=64 fp32, one thread")
    cell8k = by_n.get(8192)
    if cell8k is not None and real:
        pts = {name: (cell8k["configs"][name]["ratio"], mean_err[name]) for name in names
               if name in cell8k["configs"] and name in mean_err}
        front = sorted((pts[n] for n in pareto(pts)), key=lambda p: p[0])
        if len(front) > 1:
            ax2.plot([p[0] for p in front], [p[1] for p in front], color="gray", lw=1, ls=":", label="Pareto front")
            ax2.legend(fontsize=7)
        for name, (r, e) in pts.items():
            ax2.scatter(r, e, marker="s" if method_of[name] == "local" else "o", color=colors[name])
            ax2.annotate(name, (r, e), fontsize=7)
        ax2.set_xlabel("speed-up vs SDPA at N=8192 (random inputs)")
        ax2.set_ylabel("mean relative error, real SmolLM2 layers")
        ax2.set_title("error vs speed at 8k (lower right is better)")
    else:
        ax2.set_axis_off()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "ratio_vs_n.png"), dpi=110)
    plt.close(fig)


def merge_specs(results: dict, specs: dict[str, tuple[str, dict]]) -> None:
    """Record the declarations in results["configs"]; a name already there with other parameters is an error."""
    known = results.setdefault("configs", {})
    for name, (method, params) in specs.items():
        entry = {"method": method, "params": dict(params)}
        if name in known and known[name] != entry:
            raise SystemExit(f"configuration {name!r} is already in this results.json as {known[name]}, now declared as "
                             f"{entry}: give it another name or write to another --out")
        known[name] = entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ns", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384, 32768],
                        help="random-input sizes to time (none: only the real-layer errors)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS),
                        help="names of the built-in CONFIGS and/or NAME=METHOD:param=value,param=value")
    parser.add_argument("--skip-at-32k", nargs="*", default=[], help="configurations not run at N=32768 (time-bound)")
    parser.add_argument("--max-n", type=int, default=0, help="only N <= this for this invocation's configurations (0: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--real-tokens", type=int, default=8192)
    parser.add_argument("--real-layers", type=int, nargs="*", default=[3, 10, 20, 28])
    parser.add_argument("--title", default="", help="the heading of results.md")
    parser.add_argument("--question", default="", help="one line under the heading: what this table answers")
    parser.add_argument("--out", default=OUT_DIR)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--shard", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.shard is not None:
        raise SystemExit("bench_causal_kernels.py cannot shard: every configuration is timed against SDPA in one "
                         "process; run it without --shard")
    torch.set_num_threads(1)
    specs = parse_configs(args.configs)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = load(path)
    if "configs" not in results:  # results made before declarations were stored: their names are CONFIGS names
        done = {n for c in results["cells"].values() for n in list(c.get("configs", {})) + list(c.get("rel_error", {}))}
        results["configs"] = {n: {"method": m, "params": dict(p)} for n, (m, p) in CONFIGS.items() if n in done}
    merge_specs(results, specs)
    results.update({"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads()})
    for key in ("title", "question"):
        if getattr(args, key):
            results[key] = getattr(args, key)
    run = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "argv": ["scripts/bench_causal_kernels.py"] + sys.argv[1:], "repeats": args.repeats,
           "machine_start": machine_state()}
    if not args.report_only:
        def record_run() -> None:  # an invocation is listed once it has timed or measured something
            if not results.setdefault("runs", []) or results["runs"][-1] is not run:
                results["runs"].append(run)
        for n in args.ns:
            if args.max_n and n > args.max_n:
                continue
            key = f"random n={n}"
            done = results["cells"].get(key, {}).get("configs", {})
            todo = {c: specs[c] for c in specs if c not in done and not (n >= 32768 and c in args.skip_at_32k)}
            if not todo:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] N={n}: {len(todo)} configurations", flush=True)
            record_run()
            cell = random_cell(n, todo, args.repeats)
            for entry in cell["configs"].values():  # each configuration keeps the SDPA time of its own run
                entry["sdpa_time_s"] = cell["sdpa"]["time_s"]
            if key in results["cells"]:
                results["cells"][key]["configs"].update(cell["configs"])
            else:
                results["cells"][key] = cell
            run["machine_end"] = machine_state()
            write_json(path, results)
            write_report(results, args.out)
        if args.real_layers:
            todo_layers = [l for l in args.real_layers if f"smollm2 layer={l}" not in results["cells"]
                           or set(specs) - set(results["cells"][f"smollm2 layer={l}"]["rel_error"])]
            if todo_layers:
                print(f"[{time.strftime('%H:%M:%S')}] real SmolLM2 q/k/v, layers {todo_layers}", flush=True)
                record_run()
                layers = sorted(set(args.real_layers))
                qkv = smollm2_article_qkv(args.real_tokens, layers)
                results["real_title"] = qkv.get("title")
                for layer in todo_layers:
                    key = f"smollm2 layer={layer}"
                    prev = results["cells"].get(key, {"rel_error": {}})["rel_error"]
                    cell = real_cell(layer, qkv[layer], {c: specs[c] for c in specs if c not in prev})
                    cell["rel_error"] = {**prev, **cell["rel_error"]}
                    results["cells"][key] = cell
                    run["machine_end"] = machine_state()
                    write_json(path, results)
                    write_report(results, args.out)
                    print(f"[{time.strftime('%H:%M:%S')}] layer {layer} done", flush=True)
        run["machine_end"] = machine_state()
        write_json(path, results)
    write_report(results, args.out)
    print(open(os.path.join(args.out, "results.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
