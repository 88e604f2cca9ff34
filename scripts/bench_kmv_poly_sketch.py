"""Speed and error of kmv (Indyk et al.), poly (Alman & Song) and feature_sketch (Deng, Mahadevan & Song) against
torch SDPA measured in the same run, on random inputs.

    .venv/bin/python scripts/bench_kmv_poly_sketch.py [--threads 1] [--repeats 2] [--out eval/results/kernels_kmv_poly_sketch]

Writes results.json after every configuration (a rerun skips the configurations already there: delete the file to
start over), then results.md and the plots. Inputs (B=1, H=8):
  kmv            D=64, q, k, v ~ N(0, 1), scale 1/sqrt(D)                     N in 1k, 2k, 4k, 8k
  poly           D=8,  q, k ~ U[-1, 1], v ~ N(0, 1), scale 1/sqrt(D), eps 0.01 N in 1k, 2k, 4k, 8k
                 (Theorem 3.7's bounded-entry regime: scores within +-2.83; D=64 would need r > 4096 features)
  feature_sketch D=4096, q, k ~ N(0, 1) / sqrt(D) * 4, v ~ N(0, 1)              N in 8, 16, 32 (its regime d >> n)
each causal and bidirectional. Error: ||out - exact||_F / ||exact||_F and rms(out - exact) / rms(v), exact = SDPA's
output. Time: best of --repeats runs after one warm-up run. The report's date is the date of the measurement (UTC):
a run that measures a configuration stamps today; --report-only, or a run with nothing left to measure, keeps the
machine, date and settings stored in results.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from hf_sparse_attn.eval.store import write_json
from hf_sparse_attn.methods import get_method
from hf_sparse_attn.methods import poly as poly_module

MACHINE = "2-core CPU VM, no GPU"

# kmv as these rows measured it: the paper's reference engine (exact causal leaf 1024, no regime check); the
# practical blocks engine is in eval/results/kernels_causal/. Kept out of the cell keys so the committed rows resume.
PINNED = {"kmv": dict(engine="reference", causal_block=1024, max_head_tail=0)}

CONFIGS = []
for n in (1024, 2048, 4096, 8192):
    for causal in (False, True):
        CONFIGS.append(dict(method="kmv", params=dict(min_seq_len=0), N=n, D=64, causal=causal, inputs="normal"))
        CONFIGS.append(dict(method="poly", params=dict(min_seq_len=0, eps=0.01), N=n, D=8, causal=causal, inputs="bounded"))
for n in (8, 16, 32):
    for causal in (False, True):
        for mode in ("leverage", "deterministic"):
            CONFIGS.append(dict(method="feature_sketch", params=dict(mode=mode, eps=0.5), N=n, D=4096, causal=causal,
                                inputs="wide"))


def make_inputs(cfg: dict, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (1, 8, cfg["N"], cfg["D"])
    if cfg["inputs"] == "bounded":
        q, k = (torch.rand(shape, generator=g) * 2 - 1 for _ in range(2))
    elif cfg["inputs"] == "wide":
        q, k = (torch.randn(shape, generator=g) * 4 / math.sqrt(cfg["D"]) for _ in range(2))
    else:
        q, k = (torch.randn(shape, generator=g) for _ in range(2))
    v = torch.randn(shape, generator=g)
    return q, k, v


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def key(cfg: dict) -> str:
    return json.dumps({k: cfg[k] for k in ("method", "params", "N", "D", "causal")}, sort_keys=True)


def run_one(cfg: dict, repeats: int) -> dict:
    q, k, v = make_inputs(cfg)
    scale = cfg["D"] ** -0.5
    method = get_method(cfg["method"], **{**PINNED.get(cfg["method"], {}), **cfg["params"]})
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=cfg["causal"], scale=scale)
    row = dict(cfg, scale=scale)
    if cfg["method"] == "poly":
        info = poly_module.poly_regime(q, k, scale, cfg["params"]["eps"], 4096)
        row.update(poly_degree=info["degree"], poly_features=info["num_features"], poly_score_bound=info["score_bound"],
                   poly_in_regime=info["in_regime"])
    t_sdpa = best_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=cfg["causal"], scale=scale), repeats)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    t_method = best_time(lambda: method(q, k, v, causal=cfg["causal"], scale=scale, generator=gen()), repeats)
    out, lse = method(q, k, v, causal=cfg["causal"], scale=scale, generator=gen())
    err = out.float() - ref
    row.update(
        sdpa_s=t_sdpa, method_s=t_method, speedup_vs_sdpa=t_sdpa / t_method,
        rel_error=float(err.norm() / ref.norm()),
        error_over_rms_v=float(err.pow(2).mean().sqrt() / v.pow(2).mean().sqrt()),
        max_abs_error=float(err.abs().max()), nan=bool(torch.isnan(out).any()),
    )
    return row


def write_markdown(rows: list[dict], meta: dict, path: str) -> None:
    lines = [
        "# kmv, poly and feature_sketch vs torch SDPA (same run)", "",
        f"Machine: {meta['machine']}; torch {meta['torch']}; {meta['threads']} torch thread(s); date {meta['date']}.",
        f"Produced by `scripts/bench_kmv_poly_sketch.py` (inputs in its docstring). B=1, H=8, fp32, best of {meta['repeats']}.",
        "speedup = SDPA time / method time (above 1: the method is faster).", "",
        "| method | params | N | D | causal | SDPA s | method s | speedup | rel. error | err / rms(v) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items() if k != "min_seq_len")
        if r["method"] == "poly":
            params += f" (g={r['poly_degree']}, r={r['poly_features']})"
        lines.append(f"| {r['method']} | {params} | {r['N']} | {r['D']} | {r['causal']} | {r['sdpa_s']:.4f} | "
                     f"{r['method_s']:.4f} | {r['speedup_vs_sdpa']:.2f}x | {r['rel_error']:.3g} | {r['error_over_rms_v']:.3g} |")
    lines += ["", "## Reading", "",
              "- kmv causal at N <= causal_block (1024) is exact attention by construction (the recursion's base case).",
              "- kmv on these near-uniform random inputs finds no heavy keys; the LSH cannot prune, so the dense"
              " verification pass alone costs about one exact attention (docs/methods/kmv_poly_feature_sketch.md).",
              "- poly at D=8 needs degree 6 (r=3003 features) for eps=0.01 on scores within +-2.2; r > N at N=1024.",
              "- feature_sketch: the sketch costs more than the O(n^2 d) attention it would save at these sizes.", ""]
    for name in ("kmv", "poly", "feature_sketch"):
        sub = [r for r in rows if r["method"] == name]
        if not sub:
            continue
        slower = [f"N={r['N']}{' causal' if r['causal'] else ''}{' ' + r['params'].get('mode', '') if name == 'feature_sketch' else ''}"
                  for r in sub if r["speedup_vs_sdpa"] < 1]
        lines.append(f"- **{name}**: fastest {max(r['speedup_vs_sdpa'] for r in sub):.2f}x vs SDPA; "
                     f"slower than SDPA at: {', '.join(slower) if slower else 'none'}.")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(rows: list[dict], meta: dict, out_dir: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, marker in (("kmv", "o"), ("poly", "s")):
        for causal, style in ((False, "-"), (True, "--")):
            sub = sorted((r for r in rows if r["method"] == name and r["causal"] == causal), key=lambda r: r["N"])
            if not sub:
                continue
            label = f"{name} {'causal' if causal else 'bidirectional'}"
            axes[0].plot([r["N"] for r in sub], [r["speedup_vs_sdpa"] for r in sub], style, marker=marker, label=label)
            axes[1].plot([r["N"] for r in sub], [r["error_over_rms_v"] for r in sub], style, marker=marker, label=label)
    axes[0].axhline(1.0, color="gray", lw=0.8)
    for ax, ylabel in zip(axes, ("SDPA time / method time", "rms(out - exact) / rms(v)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(f"kmv (D=64) and poly (D=8) vs torch SDPA, B=1 H=8 fp32 — {meta['machine']}, {meta['date']}")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "speed_error_kmv_poly.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("leverage", "deterministic"):
        for causal, style in ((False, "-"), (True, "--")):
            sub = sorted((r for r in rows if r["method"] == "feature_sketch" and r["params"]["mode"] == mode
                          and r["causal"] == causal), key=lambda r: r["N"])
            if sub:
                ax.plot([r["N"] for r in sub], [r["speedup_vs_sdpa"] for r in sub], style, marker="o",
                        label=f"{mode} {'causal' if causal else 'bidirectional'}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N (D = 4096)")
    ax.set_ylabel("SDPA time / method time")
    ax.set_title(f"feature_sketch vs SDPA — {meta['machine']}, {meta['date']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "speed_feature_sketch.png"), dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="eval/results/kernels_kmv_poly_sketch")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for SDPA and the methods alike")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", default="", help="comma-separated method names to run (default: all)")
    parser.add_argument("--report-only", action="store_true", help="rewrite results.md and the plots from results.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = dict(machine=MACHINE, date=now.strftime("%Y-%m-%d"), torch=torch.__version__, threads=args.threads,
                repeats=args.repeats, python=platform.python_version(), script="scripts/bench_kmv_poly_sketch.py",
                run_at=now.isoformat(timespec="seconds"))
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        rows = stored["rows"]
    done = {key(r) for r in rows}
    only = set(filter(None, args.only.split(",")))
    todo = [] if args.report_only else [c for c in CONFIGS if key(c) not in done and (not only or c["method"] in only)]
    if not todo and rows:  # nothing measured now: the report keeps the stored run's machine, date and settings
        meta = stored["meta"]
    for cfg in tqdm(todo, desc="kmv, poly, feature_sketch"):
        rows.append(run_one(cfg, args.repeats))
        write_json(path, {"meta": meta, "rows": rows})
    order = {key(c): i for i, c in enumerate(CONFIGS)}
    rows.sort(key=lambda r: order.get(key(r), 1 << 30))
    write_markdown(rows, meta, os.path.join(args.out, "results.md"))
    plot(rows, meta, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
