"""Decode-step attention over a KV cache on one CPU thread: the decode methods against grouped SDPA.

SmolLM2-135M's shapes: 9 query heads, 3 KV heads, head dim 64, B = 1, one query row, fp32, caches of --ns positions
(random standard-normal q, k, v; seed 0). In one process, alternating on every repeat (so that all see the same
machine load), medians of --repeats calls of:

* ``sdpa grouped`` (the baseline of every ratio): ``scaled_dot_product_attention`` on q reshaped to
  [B, Hkv, g, D] against the cache, no KV expansion;
* ``transformers enable_gqa``: ``scaled_dot_product_attention(..., enable_gqa=True)``, what transformers 5.25's sdpa
  path runs for an unmasked decode step; ``transformers repeat_kv``: KV heads expanded first, its path with a mask;
* ``exact`` / ``local`` / ``lsh`` decode methods (hf_sparse_attn/methods/decode.py) and ``quest``
  (decode_pages.py), ``lsh`` and ``quest`` with their index prebuilt.

Times: wall clock (perf_counter) and this thread's CPU time (thread_time). The VM's 2 cores are shared with other
sessions, so wall times carry time slices of other processes; the CPU-time ratios are the primary figures, both
are in the tables. Cache upkeep per decode step (appending one position): ``torch.cat`` of K and V (what
DynamicCache does), :class:`KVBuffer` append (capacity doubling; amortised over --append-steps steps) and the
:class:`DecodeIndex` append (hashing, with its periodic re-sorts amortised) and the :class:`PageIndex` append (quest's page
bounds), plus the ``lsh`` index build of the prefill.

Errors: relative Frobenius error of the output against ``exact`` over all query heads, (a) on the random inputs
(16 query vectors), (b) on real SmolLM2-135M-Instruct q/k/v (one 8192-token Wikipedia article, layers
--real-layers, captured after RoPE by ``capture_smollm2_qkv``): the last --real-steps positions are decoded one by
one, the cache holding every earlier key, the ``lsh`` / ``quest`` index built from the prefix and appended step by
step as a decoder would. Also the softmax mass of the keys each method computes exactly (sinks + window [+ LSH blocks]).

Writes --out/{results.json, results.md, ratio_vs_n.png}.

    taskset -c 1 .venv/bin/python scripts/bench_decode_kernels.py --out eval/results/kernels_decode
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

import torch

from hf_sparse_attn.eval.bench.kernel_suite import relative_error, smollm2_article_qkv
from hf_sparse_attn.eval.bench.kernel_timing import machine_state
from hf_sparse_attn.eval.store import write_json
from hf_sparse_attn.methods.common import expand_kv_heads
from hf_sparse_attn.methods.decode import get_decode_method, get_decode_spec
from hf_sparse_attn.methods.decode_index import DecodeIndex
from hf_sparse_attn.methods.decode_pages import PageIndex
from hf_sparse_attn.methods.kv_buffer import KVBuffer, kv_bytes

HQ, HKV, D = 9, 3, 64
G = HQ // HKV
SCALE = D ** -0.5

# name -> (decode method, params)
CONFIGS: dict[str, tuple[str, dict]] = {
    "exact": ("exact", {}),
    "local w1024": ("local", dict(window=1024, num_sink_tokens=64)),
    "local w256": ("local", dict(window=256, num_sink_tokens=64)),
    "lsh w1024 b256 s256": ("lsh", dict(window=1024, block_size=256, sample_size=256)),
    "lsh w512 b256 s256": ("lsh", dict(window=512, block_size=256, sample_size=256)),
    "lsh w256 b128 s128": ("lsh", dict(window=256, block_size=128, sample_size=128)),
    "lsh w256 b64 s64": ("lsh", dict(window=256, block_size=64, sample_size=64)),
    "quest b2048": ("quest", dict(token_budget=2048)),  # the default: pages of 32, window 256, 64 sinks
    "quest b1024": ("quest", dict(token_budget=1024)),
    "quest p16 b1024": ("quest", dict(page_size=16, token_budget=1024)),
}

# Real-layer error only (not timed): the sample budget, block size, bits and tables around the lsh default.
REAL_SWEEP: dict[str, tuple[str, dict]] = {
    "lsh w1024 b256 s0": ("lsh", dict(window=1024, block_size=256, sample_size=0)),
    "lsh w1024 b256 s64": ("lsh", dict(window=1024, block_size=256, sample_size=64)),
    "lsh w1024 b256 s1024": ("lsh", dict(window=1024, block_size=256, sample_size=1024)),
    "lsh w1024 b512 s256": ("lsh", dict(window=1024, block_size=512, sample_size=256)),
    "lsh w1024 b256 s256 p8": ("lsh", dict(window=1024, block_size=256, sample_size=256, lsh_num_projs=8)),
    "lsh w1024 b128 t2 s256": ("lsh", dict(window=1024, block_size=128, sample_size=256, lsh_num_tables=2)),
}


def sdpa_grouped(q, k, v):
    B, Hq, nq, d = q.shape
    return torch.nn.functional.scaled_dot_product_attention(q.reshape(B, k.shape[1], -1, d), k, v, scale=SCALE)


def sdpa_gqa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=SCALE, enable_gqa=True)


def sdpa_repeat_kv(q, k, v):
    g = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(q, expand_kv_heads(k, g), expand_kv_heads(v, g), scale=SCALE)


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - w, time.thread_time() - c


def make_index(name: str, k: torch.Tensor, kv_len: int):
    method, params = CONFIGS[name]
    return get_decode_spec(method).build_index(k, kv_len, **params)


@torch.no_grad()
def random_cell(n: int, repeats: int, names: list[str], append_steps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, HQ, 1, D, generator=g)
    k = torch.randn(1, HKV, n, D, generator=g)
    v = torch.randn(1, HKV, n, D, generator=g)
    calls = {"sdpa grouped": lambda: sdpa_grouped(q, k, v), "transformers enable_gqa": lambda: sdpa_gqa(q, k, v),
             "transformers repeat_kv": lambda: sdpa_repeat_kv(q, k, v)}
    indexes = {}
    for name in names:
        method, params = CONFIGS[name]
        fn = get_decode_method(method, **params)
        indexes[name] = make_index(name, k, n)
        calls[name] = (lambda fn=fn, ix=indexes[name]: fn(q, k, v, scale=SCALE, kv_len=n, index=ix)[0])
    for call in calls.values():  # warm-up
        call()
    times = {name: ([], []) for name in calls}
    for r in range(repeats):
        for name, call in calls.items():
            if name == "transformers repeat_kv" and r >= max(3, repeats // 5):
                continue  # 20-170 ms a call: fewer repeats
            w, c = timed(call)
            times[name][0].append(w)
            times[name][1].append(c)
    base_w = statistics.median(times["sdpa grouped"][0])
    base_c = statistics.median(times["sdpa grouped"][1])
    rows = {}
    for name, (ws, cs) in times.items():
        mw, mc = statistics.median(ws), statistics.median(cs)
        rows[name] = {"wall_ms": mw * 1e3, "cpu_ms": mc * 1e3, "ratio_wall": base_w / mw, "ratio_cpu": base_c / mc,
                      "repeats": len(ws)}
    # errors on 16 random query vectors
    qs = torch.randn(1, HQ, 16, D, generator=g)
    ref = torch.cat([get_decode_method("exact")(qs[:, :, i:i + 1], k, v, scale=SCALE, kv_len=n)[0] for i in range(16)], 2)
    for name in names:
        method, params = CONFIGS[name]
        fn = get_decode_method(method, **params)
        got = torch.cat([fn(qs[:, :, i:i + 1], k, v, scale=SCALE, kv_len=n, index=indexes[name])[0] for i in range(16)], 2)
        rows[name]["rel_error_random"] = relative_error(got, ref)
        if indexes[name] is not None:
            rows[name]["index_bytes"] = indexes[name].nbytes()
            rows[name]["index_fraction_of_cache"] = indexes[name].nbytes() / kv_bytes(k, v, n)
    return {"n": n, "loadavg": [round(x, 2) for x in os.getloadavg()], "configs": rows,
            "upkeep": upkeep(k, v, append_steps)}


@torch.no_grad()
def upkeep(k: torch.Tensor, v: torch.Tensor, steps: int) -> dict:
    """Per-step cost of adding one position: torch.cat (DynamicCache), KVBuffer, DecodeIndex; and the index build."""
    g = torch.Generator().manual_seed(1)
    new_k = torch.randn(1, HKV, steps, D, generator=g)
    new_v = torch.randn(1, HKV, steps, D, generator=g)
    cat_w, cat_c = [], []
    for t in range(min(steps, 64)):
        w, c = timed(lambda: (torch.cat([k, new_k[:, :, t:t + 1]], 2), torch.cat([v, new_v[:, :, t:t + 1]], 2)))
        cat_w.append(w)
        cat_c.append(c)
    buf = KVBuffer(k, v)  # capacity = n: the first append doubles it (one reallocation within the steps)
    w0, c0 = time.perf_counter(), time.thread_time()
    for t in range(steps):
        buf.append(new_k[:, :, t:t + 1], new_v[:, :, t:t + 1])
    buf_w, buf_c = (time.perf_counter() - w0) / steps, (time.thread_time() - c0) / steps
    b_w, b_c = timed(lambda: DecodeIndex.build(k, lsh_num_projs=10))
    index = DecodeIndex.build(k, lsh_num_projs=10, resort_every=512)
    w0, c0 = time.perf_counter(), time.thread_time()
    for t in range(steps):
        index.append(new_k[:, :, t:t + 1])
    ix_w, ix_c = (time.perf_counter() - w0) / steps, (time.thread_time() - c0) / steps
    pages = PageIndex.build(k)
    w0, c0 = time.perf_counter(), time.thread_time()
    for t in range(steps):
        pages.append(new_k[:, :, t:t + 1])
    pg_w, pg_c = (time.perf_counter() - w0) / steps, (time.thread_time() - c0) / steps
    return {"page_index_append_ms": {"wall": pg_w * 1e3, "cpu": pg_c * 1e3},
            "steps": steps, "cat_ms": {"wall": statistics.median(cat_w) * 1e3, "cpu": statistics.median(cat_c) * 1e3},
            "kv_buffer_ms": {"wall": buf_w * 1e3, "cpu": buf_c * 1e3, "reallocations": buf.reallocations},
            "index_append_ms": {"wall": ix_w * 1e3, "cpu": ix_c * 1e3, "sorts": index.sorts - 1},
            "index_build_ms": {"wall": b_w * 1e3, "cpu": b_c * 1e3}}


def exact_mass(q, k, kv_len, positions_per_row) -> float:
    """Mean over query heads of the softmax mass on the given key positions. q [1, Hq, 1, D], k [1, Hkv, L, D];
    positions_per_row [Hq] list of int64 tensors."""
    ke = expand_kv_heads(k[:, :, :kv_len], G)
    p = torch.softmax((q @ ke.transpose(-1, -2)).float() * SCALE, dim=-1)[0, :, 0]  # [Hq, kv_len]
    return float(torch.stack([p[h, positions_per_row[h]].sum() for h in range(q.shape[1])]).mean())


@torch.no_grad()
def real_cell(layer: int, qkv: tuple, names: list[str], steps: int) -> dict:
    q, k, v, scale = qkv
    assert abs(scale - SCALE) < 1e-9
    n = q.shape[2]
    first = n - steps
    errors: dict[str, list[float]] = {name: [] for name in names}
    masses: dict[str, list[float]] = {name: [] for name in names}
    fns = {name: get_decode_method(CONFIGS[name][0], **CONFIGS[name][1]) for name in names}
    indexes = {name: make_index(name, k, first) for name in names}
    for p in range(first, n):
        kv_len = p + 1
        qp = q[:, :, p:p + 1]
        ref, _ = fns["exact"](qp, k, v, scale=SCALE, kv_len=kv_len) if "exact" in fns else \
            get_decode_method("exact")(qp, k, v, scale=SCALE, kv_len=kv_len)
        for name in names:
            method, params = CONFIGS[name]
            if indexes[name] is not None:
                indexes[name].append(k[:, :, p:p + 1])
            stats: dict = {}
            kwargs = {"stats": stats} if method == "lsh" else {}
            got, _ = fns[name](qp, k, v, scale=SCALE, kv_len=kv_len, index=indexes[name], **kwargs)
            errors[name].append(relative_error(got, ref))
            if method in ("local", "lsh"):
                S = params["num_sink_tokens"] if "num_sink_tokens" in params else 64
                if method == "local":
                    start = max(S, kv_len - params["window"])
                else:
                    start = stats.get("exact_start", S) if stats.get("mode") == "lsh" else S
                base = torch.cat([torch.arange(min(S, kv_len)), torch.arange(max(start, S), kv_len)])
                rows = []
                for h in range(HQ):
                    extra = torch.empty(0, dtype=torch.long)
                    if stats.get("mode") == "lsh":
                        kvh, r = h // G, h % G
                        extra = stats["block_positions"][0, kvh, r][stats["block_allowed"][0, kvh, r]]
                    rows.append(torch.cat([base, extra]))
                masses[name].append(exact_mass(qp, k, kv_len, rows))
    return {"layer": layer, "n": n, "steps": steps,
            "rel_error": {name: statistics.mean(e) for name, e in errors.items()},
            "exact_mass": {name: statistics.mean(m) for name, m in masses.items() if m}}


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def write_report(results: dict, out_dir: str) -> None:
    lines = ["# Decode-step attention kernels (one CPU thread, SmolLM2 shapes)", "",
             f"Question: {results['question']}", "",
             f"- date: {results['date']}", f"- command: `{results['command']}`",
             f"- machine at start: {json.dumps(results['machine_start'])}",
             f"- machine at end: {json.dumps(results['machine_end'])}",
             f"- torch {results['torch']}; shapes: B=1, 9 query heads, 3 KV heads, D=64, one query row, fp32",
             "- ratio = time of `sdpa grouped` (q reshaped to [B, Hkv, g, D], no KV expansion) / time; CPU = this "
             "thread's CPU time (thread_time), the primary figure on this shared VM; wall = perf_counter",
             "- random error: relative Frobenius error against `exact` over 16 random query vectors (random keys: "
             "near-uniform attention, the hardest case for every sparse method)", ""]
    names = list(results["cells"][0]["configs"]) if results["cells"] else []
    lines.append("## Speed per decode step (one layer)")
    lines.append("")
    lines.append("| config | " + " | ".join(f"{c['n']} CPU ms (ratio) | wall ms (ratio)" for c in results["cells"]) + " |")
    lines.append("|---|" + "---|---|" * len(results["cells"]))
    for name in names:
        cells = []
        for c in results["cells"]:
            r = c["configs"][name]
            cells.append(f"{r['cpu_ms']:.3f} ({r['ratio_cpu']:.2f}x) | {r['wall_ms']:.3f} ({r['ratio_wall']:.2f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Error on random inputs and index memory", "",
              "| config | " + " | ".join(f"{c['n']} error" for c in results["cells"]) + " | index / KV cache bytes |",
              "|---|" + "---|" * len(results["cells"]) + "---|"]
    for name in names:
        if "rel_error_random" not in results["cells"][0]["configs"][name]:
            continue
        errs = " | ".join(fmt(c["configs"][name]["rel_error_random"]) for c in results["cells"])
        frac = results["cells"][-1]["configs"][name].get("index_fraction_of_cache")
        lines.append(f"| {name} | {errs} | {'-' if frac is None else f'{100 * frac:.2f}%'} |")
    lines += ["", "## Cache upkeep per decode step (one layer, K and V of 3 KV heads)", "",
              "| cache | torch.cat (DynamicCache) CPU / wall ms | KVBuffer append CPU / wall ms (reallocations) | "
              "DecodeIndex append CPU / wall ms (re-sorts) | index build CPU / wall ms | PageIndex append CPU / wall ms |",
              "|---|---|---|---|---|---|"]
    for c in results["cells"]:
        u = c["upkeep"]
        lines.append(f"| {c['n']} | {u['cat_ms']['cpu']:.3f} / {u['cat_ms']['wall']:.3f} | "
                     f"{u['kv_buffer_ms']['cpu']:.4f} / {u['kv_buffer_ms']['wall']:.4f} ({u['kv_buffer_ms']['reallocations']}) | "
                     f"{u['index_append_ms']['cpu']:.4f} / {u['index_append_ms']['wall']:.4f} ({u['index_append_ms']['sorts']}) | "
                     f"{u['index_build_ms']['cpu']:.1f} / {u['index_build_ms']['wall']:.1f} | "
                     + ("- |" if "page_index_append_ms" not in u else
                        f"{u['page_index_append_ms']['cpu']:.4f} / {u['page_index_append_ms']['wall']:.4f} |"))
    if results.get("real"):
        real = results["real"]
        lines += ["", f"## Real SmolLM2-135M layers ({real[0]['n']}-token article, last {real[0]['steps']} positions "
                  "decoded one by one, the lsh / quest index appended per step)", "",
                  "Mean relative error against exact; in brackets the mean softmax mass of the keys computed exactly "
                  "(sinks + window, + the LSH blocks for lsh). Rows below the timed configurations: the real-layer sweep "
                  "(--real-sweep; t = hash tables, p = bits per table; default 10 bits, 1 table).", "",
                  "| config | " + " | ".join(f"layer {r['layer']}" for r in real) + " | mean |",
                  "|---|" + "---|" * (len(real) + 1)]
        for name in real[0]["rel_error"]:
            cells = []
            for r in real:
                m = r["exact_mass"].get(name)
                cells.append(f"{r['rel_error'][name]:.3f}" + ("" if m is None else f" ({m:.2f})"))
            mean = statistics.mean(r["rel_error"][name] for r in real)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.3f} |")
    lines += ["", "![ratio vs cache length](ratio_vs_n.png)", ""]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        ns = [c["n"] for c in results["cells"]]
        for name in names:
            ax.plot(ns, [c["configs"][name]["ratio_cpu"] for c in results["cells"]], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(10.0, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("cached positions")
        ax.set_ylabel("speed-up over grouped SDPA (CPU time)")
        ax.set_title("decode step, one layer, 9/3 heads, D 64, one thread")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "ratio_vs_n.png"), dpi=110)
    except ImportError:
        pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join("eval", "results", "kernels_decode"))
    ap.add_argument("--ns", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--append-steps", type=int, default=1024)
    ap.add_argument("--real-tokens", type=int, default=8192)
    ap.add_argument("--real-layers", type=int, nargs="*", default=[3, 10, 20, 28])
    ap.add_argument("--real-steps", type=int, default=32)
    ap.add_argument("--real-sweep", nargs="*", default=list(REAL_SWEEP),
                    help="configurations of REAL_SWEEP whose real-layer error is measured too (not timed)")
    ap.add_argument("--report-only", action="store_true", help="rewrite results.md and the plot from results.json")
    args = ap.parse_args()
    if args.report_only:
        with open(os.path.join(args.out, "results.json"), encoding="utf-8") as f:
            write_report(json.load(f), args.out)
        return 0
    unknown = [c for c in args.configs if c not in CONFIGS] + [c for c in args.real_sweep if c not in REAL_SWEEP]
    if unknown:
        raise SystemExit(f"--configs / --real-sweep: unknown {unknown}; known: {list(CONFIGS)} / {list(REAL_SWEEP)}")
    CONFIGS.update(REAL_SWEEP)
    if "exact" not in args.configs:
        args.configs = ["exact"] + args.configs
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    results = {"question": "How fast (ratio to grouped SDPA) and how accurate (random and real SmolLM2 keys) are the "
                           "decode methods exact / local / lsh / quest on one CPU thread at 4k-32k cached positions, and what "
                           "do cache and index upkeep cost per step?",
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(shlex.quote(a) for a in ["python"] + sys.argv), "torch": torch.__version__,
               "machine_start": machine_state(), "configs": {n: CONFIGS[n] for n in args.configs + args.real_sweep}, "cells": []}
    for n in args.ns:
        print(f"n={n}", flush=True)
        results["cells"].append(random_cell(n, args.repeats, args.configs, args.append_steps))
        write_json(os.path.join(args.out, "results.json"), results)
    if args.real_layers:
        captured = smollm2_article_qkv(args.real_tokens, args.real_layers)
        results["real_title"] = captured.get("title")
        results["real"] = []
        for layer in args.real_layers:
            print(f"real layer {layer}", flush=True)
            results["real"].append(real_cell(layer, captured[layer], args.configs + args.real_sweep, args.real_steps))
            write_json(os.path.join(args.out, "results.json"), results)
    results["machine_end"] = machine_state()
    write_json(os.path.join(args.out, "results.json"), results)
    write_report(results, args.out)
    print(open(os.path.join(args.out, "results.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
