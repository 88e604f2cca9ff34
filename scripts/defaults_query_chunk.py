"""Query chunks of the causal recursion (CAUSAL_QUERY_CHUNK_DIVISOR): hyper and sparse_hyper, one CPU thread.

The causal quadrants of the recursion assign each query to the key block its LSH rank falls in
(``sorted_blocks.grouped_sorted_attention`` with ``q_ranks``), so key blocks get uneven query counts; each key
block's queries are cut into chunks of block_size / d queries (d = CAUSAL_QUERY_CHUNK_DIVISOR, default 2 in
hf_sparse_attn/methods/defaults.py), and every chunk gathers its key block (+ hyper's samples) again. Small chunks
waste fewer padded query slots, large chunks gather each key block fewer times. This script times d in --divisors
(default 1 / 2 / 4) for both methods at their defaults (causal_mode recursive, min_seq_len 2048, block_size 256,
64 sinks; hyper 256 samples) on random standard-normal q, k, v [1, 8, N, 64] fp32 (kernel_suite.random_qkv, seed 0),
causal, torch.set_num_threads(1).

One cell = one method at one N. Its first call per divisor is the warm-up; it also counts the chunks (a wrapper
around ``hf_sparse_attn.kernels.sorted_block_attention`` installed for that call only: the timed calls run the
method unchanged) and keeps the output. Then --repeats rounds: each round times every divisor once (and torch SDPA,
``is_causal=True``, for N <= --sdpa-max-n), the order rotated by one each round, so all see the same machine load;
the table gives medians. The divisor is set by ``sorted_blocks.causal_query_chunk_divisor(d)``, a context manager
that rebinds the module global the method reads and restores it on exit. Columns:

* time, speed vs d=2 = time(d=2) / time(d) of the same cell, ratio vs SDPA = SDPA time / time;
* fill = real queries / query slots over all chunks of all levels (a level's chunk count is the largest of its
  groups, so the slots of the shorter groups' missing chunks count as padding: they are computed);
* chunks per key block = chunks / key blocks over all levels (how often each key block is gathered; 1 at best for
  d=1, d at best for d);
* pairs vs d=2 = query-key slots computed by the quadrants (chunks x chunk size x keys per chunk) / those of d=2;
* the output check: max |out(d) - out(d=2)|, torch.allclose(rtol 1e-5, atol 1e-6) and bit equality. Chunking
  does not change which keys a query attends (nor hyper's samples), so only float rounding may differ.

Resumable: results.json is rewritten after every cell; a cell already there with every requested divisor (and SDPA
where asked) is skipped. Writes --out/{results.json, results.md, time_ratio_vs_divisor.png}.

    taskset -c 0 .venv/bin/python scripts/defaults_query_chunk.py --out eval/results/defaults_query_chunk \
        [--ns 8192 32768] [--repeats R] [--divisors 1 2 4] [--sdpa-max-n 8192] [--report-only]

(or `hf-sparse-attn bench run eval/experiments/defaults_query_chunk.toml`, which adds --out.)
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
from typing import Any, Callable, Optional

import torch
from tqdm import tqdm

import hf_sparse_attn.kernels as kernels
from hf_sparse_attn.eval.bench.kernel_suite import random_qkv
from hf_sparse_attn.eval.bench.kernel_timing import machine_state
from hf_sparse_attn.eval.store import write_json
from hf_sparse_attn.methods import causal_recursion, defaults, get_method, sorted_blocks

OUT_DIR = os.path.join("eval", "results", "defaults_query_chunk")
BASELINE = defaults.CAUSAL_QUERY_CHUNK_DIVISOR  # the default every divisor is compared with (2)
BATCH, HEADS, HEAD_DIM = 1, 8, 64
# The methods at their defaults, spelled out so that the table says what ran.
METHODS: dict[str, dict] = {
    "hyper": dict(causal_mode="recursive", min_seq_len=2048, block_size=256, sample_size=256, num_sink_tokens=64),
    "sparse_hyper": dict(causal_mode="recursive", min_seq_len=2048, block_size=256, num_sink_tokens=64),
}
ALLCLOSE = dict(rtol=1e-5, atol=1e-6)
MACHINE = "2-core CPU VM, no GPU"


class ChunkCounter:
    """While installed (``with``), records every call of ``hf_sparse_attn.kernels.sorted_block_attention`` (the
    causal recursion makes one per level, in level order): chunks = q_index rows, chunk = queries per chunk,
    real = query slots holding a real query (not the dump row Rq = q_flat rows), key_slots = keys per chunk."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self._orig: Optional[Callable] = None

    def _wrapped(self, q_flat, k_flat, v_flat, q_index, k_index, bias, *args, **kwargs):
        self.calls.append({"chunks": int(q_index.shape[0]), "chunk": int(q_index.shape[1]),
                           "real": int((q_index < q_flat.shape[0]).sum()), "key_slots": int(k_index.shape[1])})
        return self._orig(q_flat, k_flat, v_flat, q_index, k_index, bias, *args, **kwargs)

    def __enter__(self) -> "ChunkCounter":
        self._orig = kernels.sorted_block_attention
        kernels.sorted_block_attention = self._wrapped
        return self

    def __exit__(self, *exc) -> None:
        kernels.sorted_block_attention = self._orig


def chunk_stats(calls: list[dict], n: int, params: dict) -> dict:
    """Fill, chunks per key block and computed pairs of one causal recursion call from its ChunkCounter records.

    Level l of the recursion (causal_recursion.sorted_lsh_attention) has G = B H 2^l groups of half = N' / 2^(l+1)
    queries and keys, nb = ceil(half / min(block_size, half)) key blocks per group; N' = leaf 2^m."""
    m, leaf = causal_recursion.causal_levels(n, params["min_seq_len"])
    if len(calls) != m:
        raise RuntimeError(f"expected {m} sorted-block calls (one per level) at N={n}, counted {len(calls)}")
    levels = []
    for level, c in enumerate(calls):
        groups = (BATCH * HEADS) << level
        half = (leaf << m) >> (level + 1)
        nb = -(-half // min(params["block_size"], half))
        if c["real"] != groups * half:
            raise RuntimeError(f"level {level}: {c['real']} real query slots, expected {groups} x {half}")
        levels.append({"level": level, "groups": groups, "queries": half, "key_blocks": groups * nb, **c,
                       "fill": c["real"] / (c["chunks"] * c["chunk"])})
    slots = sum(x["chunks"] * x["chunk"] for x in levels)
    return {"chunk": levels[0]["chunk"] if levels else None, "fill": sum(x["real"] for x in levels) / slots,
            "chunks_per_key_block": sum(x["chunks"] for x in levels) / sum(x["key_blocks"] for x in levels),
            "pairs": sum(x["chunks"] * x["chunk"] * x["key_slots"] for x in levels), "levels": levels}


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def measure_cell(method: str, n: int, divisors: list[int], repeats: int, with_sdpa: bool, bar: tqdm) -> dict:
    """Time ``method`` at its defaults for every divisor (and SDPA if ``with_sdpa``) on one random problem."""
    params = METHODS[method]
    q, k, v = random_qkv(n, batch=BATCH, heads=HEADS, head_dim=HEAD_DIM)
    scale = HEAD_DIM ** -0.5
    fn = get_method(method, **params)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def call(d: int):
        with sorted_blocks.causal_query_chunk_divisor(d):
            return fn(q, k, v, causal=True, scale=scale)[0]

    calls: dict[str, Callable[[], Any]] = {f"d{d}": (lambda d=d: call(d)) for d in divisors}
    if with_sdpa:
        calls["sdpa"] = lambda: sdpa(q, k, v, is_causal=True, scale=scale)
    load_start = round(os.getloadavg()[0], 2)
    outs, stats = {}, {}
    for d in divisors:  # warm-up, chunk counts and the output of each divisor
        with ChunkCounter() as counter:
            outs[d] = call(d)
        stats[d] = chunk_stats(counter.calls, n, params)
        bar.update(1)
    if with_sdpa:
        calls["sdpa"]()
        bar.update(1)
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]  # rotated order: no divisor always runs first or after SDPA
            times[name].append(timed(calls[name]))
            bar.update(1)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base, ref = med[f"d{BASELINE}"], outs[BASELINE]
    cell: dict = {"method": method, "n": n, "params": dict(fn.method_params), "repeats": repeats,
                  "loadavg_1min_start": load_start, "loadavg_1min_end": round(os.getloadavg()[0], 2),
                  "sdpa": None, "divisors": {}}
    if with_sdpa:
        cell["sdpa"] = {"time_s": med["sdpa"], "times_s": times["sdpa"]}
    for d in divisors:
        t = med[f"d{d}"]
        diff = (outs[d].double() - ref.double()).abs().max().item()
        s = stats[d]
        cell["divisors"][str(d)] = {
            "divisor": d, "chunk": s["chunk"], "time_s": t, "times_s": times[f"d{d}"],
            "spread_rel": (max(times[f"d{d}"]) - min(times[f"d{d}"])) / t, "speed_vs_default": base / t,
            "ratio_vs_sdpa": med["sdpa"] / t if with_sdpa else None, "fill": s["fill"],
            "chunks_per_key_block": s["chunks_per_key_block"], "pairs": s["pairs"],
            "pairs_vs_default": s["pairs"] / stats[BASELINE]["pairs"], "levels": s["levels"],
            "max_abs_diff_vs_default": diff, "allclose_vs_default": bool(torch.allclose(outs[d], ref, **ALLCLOSE)),
            "bit_equal_vs_default": bool(torch.equal(outs[d], ref))}
    return cell


def load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"cells": {}, "runs": []}


def cell_done(cell: Optional[dict], divisors: list[int], with_sdpa: bool) -> bool:
    return (cell is not None and all(str(d) in cell["divisors"] for d in divisors)
            and (cell["sdpa"] is not None or not with_sdpa))


def write_report(results: dict, out_dir: str) -> None:
    cells = sorted(results["cells"].values(), key=lambda c: (c["method"], c["n"]))
    runs = results.get("runs", [])
    lines = ["# Query chunks of the causal recursion (CAUSAL_QUERY_CHUNK_DIVISOR), hyper and sparse_hyper, one CPU thread",
             "", "Question: in the causal quadrants of the recursion, each key block's queries are cut into chunks of "
             "block_size / d; which d (1 / 2 / 4) is fastest, and what fill of the chunks and how many gathers of each "
             "key block does each d give?", "",
             f"Machine: {MACHINE}. torch {results.get('torch')}, python {results.get('python')}, "
             "torch.set_num_threads(1). Script: `scripts/defaults_query_chunk.py` (B=1, H=8, D=64, fp32, causal, random "
             "standard-normal q/k/v, seed 0; both methods at their defaults: causal_mode recursive, min_seq_len 2048, "
             "block_size 256, 64 sinks, hyper 256 samples). Every divisor (and SDPA where timed) runs once per repeat in "
             "the same process, the order rotated each repeat; medians of the repeats. The divisor is set with "
             "`sorted_blocks.causal_query_chunk_divisor(d)` (restored after each call).", ""]
    config = os.path.join("eval", "experiments", os.path.basename(os.path.normpath(out_dir)) + ".toml")
    if os.path.exists(config):
        lines += [f"Experiment: `{config}` (`hf-sparse-attn bench run {config}` re-makes this directory; run it pinned "
                  "to one core, e.g. `taskset -c 0`).", ""]
    lines += ["Invocations (each resumes the same results.json; machine state at its start and end):", ""]
    for run in runs:
        m0, m1 = run.get("machine_start", {}), run.get("machine_end", {})
        lines.append(f"- {run['date']}: `{shlex.join(run['argv'])}`; {m0.get('cpu_count')} CPUs, affinity "
                     f"{m0.get('affinity')}, load average (1/5/15 min) {m0.get('loadavg')} at the start, "
                     f"{m1.get('loadavg', '?')} at the end.")
    loads = [x for c in cells for x in (c["loadavg_1min_start"], c["loadavg_1min_end"])]
    if loads and max(loads) > 1.5:
        lines += ["", f"The core was shared with other jobs: 1-min load average {min(loads):.1f}-{max(loads):.1f} during "
                  "the cells (this process pinned to one core of two). Speeds vs d=2 are robust to that (the divisors "
                  "alternate within each repeat); absolute times are not comparable across runs."]
    lines += ["", "Fill = real queries / query slots over all chunks of all levels (padding slots are computed). Chunks "
              "per key block = how many times each key block is gathered (at best d). Pairs vs d=2 = query-key slots "
              "the quadrants compute / those of d=2. Output check against d=2: max |difference|, torch.allclose "
              f"(rtol {ALLCLOSE['rtol']}, atol {ALLCLOSE['atol']}), bit-equal. Spread = (max - min) / median of the "
              "repeats.", "",
              "| method | N | d | chunk | time s | spread | speed vs d=2 | ratio vs SDPA | fill | chunks per key block | "
              "pairs vs d=2 | max abs diff vs d=2 | allclose | bit-equal | load 1m |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        for key in sorted(c["divisors"], key=int):
            e = c["divisors"][key]
            vs_sdpa = "-" if e["ratio_vs_sdpa"] is None else f"{e['ratio_vs_sdpa']:.2f}x"
            lines.append(f"| {c['method']} | {c['n']} | {e['divisor']} | {e['chunk']} | {e['time_s']:.3f} | "
                         f"{100 * e['spread_rel']:.0f}% | {e['speed_vs_default']:.3f}x | {vs_sdpa} | {e['fill']:.3f} | "
                         f"{e['chunks_per_key_block']:.2f} | {e['pairs_vs_default']:.3f} | "
                         f"{e['max_abs_diff_vs_default']:.1e} | {'yes' if e['allclose_vs_default'] else 'NO'} | "
                         f"{'yes' if e['bit_equal_vs_default'] else 'no'} | {c['loadavg_1min_end']:.2f} |")
    sdpa_cells = [c for c in cells if c["sdpa"] is not None]
    if sdpa_cells:
        lines += ["", "SDPA (causal) in the same cells: " + "; ".join(
            f"{c['method']} N={c['n']}: {c['sdpa']['time_s']:.3f} s" for c in sdpa_cells) + "."]
    if cells:
        lines += ["", "## Fastest divisor per method and N", ""]
        for c in cells:
            ents = c["divisors"]
            best = max(ents.values(), key=lambda e: e["speed_vs_default"])
            noise = 100 * ents[str(BASELINE)]["spread_rel"]
            lines.append(f"- {c['method']} N={c['n']}: d={best['divisor']} ({best['speed_vs_default']:.3f}x the speed "
                         f"of d={BASELINE}; d={BASELINE}'s repeats spread {noise:.0f}%); "
                         + ", ".join(f"d={e['divisor']} {e['speed_vs_default']:.3f}x" for e in
                                     sorted(ents.values(), key=lambda e: e["divisor"])) + ".")
        bad = [f"{c['method']} N={c['n']} d={e['divisor']}" for c in cells for e in c["divisors"].values()
               if not e["allclose_vs_default"]]
        lines += ["", "Outputs: " + ("every divisor's output is allclose to d=2's." if not bad
                                     else f"NOT allclose to d=2: {', '.join(bad)}.")]
    lines += ["", "![time / time at d=2 against the divisor](time_ratio_vs_divisor.png)"]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if not cells:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for c in cells:
        ents = sorted(c["divisors"].values(), key=lambda e: e["divisor"])
        ds = [e["divisor"] for e in ents]
        style = dict(marker="o", linestyle="-" if c["method"] == "hyper" else "--", label=f"{c['method']} N={c['n']}")
        ax1.plot(ds, [1.0 / e["speed_vs_default"] for e in ents], **style)
        ax2.plot(ds, [e["fill"] for e in ents], **style)
    all_ds = sorted({e["divisor"] for c in cells for e in c["divisors"].values()})
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_ds, [str(d) for d in all_ds])
        ax.minorticks_off()
        ax.set_xlabel("divisor d (chunks of block_size / d queries)")
        ax.legend(fontsize=8)
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set_ylabel(f"time / time at d={BASELINE} (same cell; lower is faster)")
    ax1.set_title("causal recursion, B=1 H=8 D=64 fp32, one thread")
    ax2.set_ylabel("fill of the query chunks")
    ax2.set_title("real queries / query slots")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "time_ratio_vs_divisor.png"), dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[8192, 32768], help="sequence lengths (causal)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--divisors", type=int, nargs="+", default=[1, 2, 4],
                        help=f"CAUSAL_QUERY_CHUNK_DIVISOR values to time (d={BASELINE}, the default, is always added)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per cell (default: 3 below N=32768, 2 from it)")
    parser.add_argument("--sdpa-max-n", type=int, default=8192,
                        help="time torch SDPA in the cells with N <= this (at 32k SDPA takes 12-40 s a call on the VM; "
                             "give 32768 to time it there too)")
    parser.add_argument("--out", default=OUT_DIR)
    parser.add_argument("--report-only", action="store_true", help="rebuild results.md and the plot from results.json")
    parser.add_argument("--shard", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.shard is not None:
        raise SystemExit("defaults_query_chunk.py cannot shard: the divisors of a cell are timed against each other in "
                         "one process; run it without --shard")
    if any(d < 1 for d in args.divisors) or (args.repeats is not None and args.repeats < 1):
        raise SystemExit("--divisors must be >= 1 and --repeats >= 1")
    divisors = sorted(set(args.divisors) | {BASELINE})
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = load(path)
    results.update({"torch": torch.__version__, "python": platform.python_version(), "machine": MACHINE})
    if not args.report_only:
        run = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "argv": ["scripts/defaults_query_chunk.py"] + sys.argv[1:], "machine_start": machine_state()}
        todo = []
        for n in args.ns:
            repeats = args.repeats or (2 if n >= 32768 else 3)
            with_sdpa = n <= args.sdpa_max_n
            for method in args.methods:
                if not cell_done(results["cells"].get(f"{method} n={n}"), divisors, with_sdpa):
                    todo.append((method, n, repeats, with_sdpa))
        total = sum((r + 1) * (len(divisors) + s) for _, _, r, s in todo)
        with tqdm(total=total, desc="calls", unit="call") as bar:
            for method, n, repeats, with_sdpa in todo:
                bar.set_postfix_str(f"{method} N={n}")
                if not results["runs"] or results["runs"][-1] is not run:  # listed once it has timed a cell
                    results["runs"].append(run)
                results["cells"][f"{method} n={n}"] = measure_cell(method, n, divisors, repeats, with_sdpa, bar)
                run["machine_end"] = machine_state()
                write_json(path, results)
                write_report(results, args.out)
    write_report(results, args.out)
    print(open(os.path.join(args.out, "results.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
