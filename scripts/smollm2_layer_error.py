"""Per-layer attention error of the fast methods on real SmolLM2-135M-Instruct activations.

Real model (hf_sparse_attn.eval.data.load_smollm2(): LlamaForCausalLM, 30 layers, 9 query heads, 3 KV heads,
d=64, fp32) on one real English Wikipedia article (gensim's test data; the first article of >= 20,000 characters
with at least --tokens tokens, truncated to --tokens tokens). One exact prefill runs under
``hf_sparse_attn.capture_attention(model)``, which records each layer's query [1, 9, N, 64] and key / value
[1, 3, N, 64] after RoPE, exactly as the model attends (causal). For every layer and method we then compute, on
those tensors (KV heads expanded with ``expand_kv_heads``),

    relative Frobenius error = ||out_method - out_exact||_F / ||out_exact||_F     (all heads and positions)

next to the layer's weight norm R (``hf_sparse_attn.rank_layers(model).weight_norms``; "Attention is Naturally Sparse" §5.1 predicts
smaller error for larger R). Every method runs causal, as the model does, with ``min_seq_len`` = --min-seq-len
(default 512: the causal recursion's exact leaves are 512 positions, so at N=4096 every query outside the first
leaf is approximated over 3 halving levels; with the default 2048 only one level would approximate).
Methods: hyper (block 256, 256 samples), sparse_hyper with scale_mode theory and none (block 256), each with
``num_sink_tokens`` in --sinks (default 0 and 64: every query also attends the first S keys exactly, merged via lse,
those keys removed from the sorted blocks and samples), and kmv / poly with their defaults (min_seq_len lowered
likewise) when one layer of them runs within --slow-limit seconds.

Per layer we also record the *sink mass*: the mean over query rows i >= S of the exact softmax mass on keys 0..S-1,
exp(lse_sinks_i - lse_exact_i) (lse_sinks from ``sinks.sink_attention``), which says how much of each row
the sinks carry (the StreamingLLM "attention sink" hypothesis for the error of the sorted blocks).

Resumable: results.json is rewritten after every (layer, method) cell and cells already there are skipped.
Writes eval/results/smollm2_layer_error/{results.json, results.md, error_by_layer.png}; their date is the date of
the measurement (UTC): a run that computes a new cell stamps today, --report-only (or a run with nothing left to
compute) keeps the date stored in results.json.

    .venv/bin/python scripts/smollm2_layer_error.py [--tokens 4096] [--min-seq-len 512] [--sinks 0 64]
    (the committed run: --methods of hyper and sparse_hyper only, kmv / poly kept from the earlier run, see results.md)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from hf_sparse_attn import capture_attention, rank_layers
from hf_sparse_attn.eval.data import load_smollm2, wikipedia_articles
from hf_sparse_attn.eval.store import write_json
from hf_sparse_attn.methods import get_method
from hf_sparse_attn.methods.common import expand_kv_heads
from hf_sparse_attn.methods.sinks import sink_attention

OUT_DIR = os.path.join("eval", "results", "smollm2_layer_error")
MACHINE = "2-core CPU VM, no GPU (shared with other jobs)"


def sink_label(label: str, sinks: int) -> str:
    """Column label of a sorted-LSH method with ``sinks`` sink tokens (the plain label for 0)."""
    return label if sinks == 0 else f"{label} +{sinks} sinks"


def method_configs(min_seq_len: int, sinks: list[int]) -> dict[str, tuple[str, dict]]:
    """label -> (registered method, params); num_sink_tokens always explicit (independent of its default)."""
    sorted_lsh = {
        "hyper": ("hyper", {"min_seq_len": min_seq_len}),
        "sparse_hyper (theory)": ("sparse_hyper", {"min_seq_len": min_seq_len, "scale_mode": "theory"}),
        "sparse_hyper (none)": ("sparse_hyper", {"min_seq_len": min_seq_len, "scale_mode": "none"}),
    }
    configs = {}
    for label, (name, params) in sorted_lsh.items():
        for s in sinks:
            configs[sink_label(label, s)] = (name, {**params, "num_sink_tokens": s})
    configs["kmv"] = ("kmv", {"min_seq_len": min_seq_len})
    configs["poly"] = ("poly", {"min_seq_len": min_seq_len})
    return configs


def sink_mass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, exact_lse: torch.Tensor, sinks: int, scale: float,
              causal: bool) -> float:
    """Mean over rows i >= sinks (all heads) of the exact softmax mass on keys 0..sinks-1: exp(lse_sinks - lse)."""
    _, lse_sinks, _ = sink_attention(q.float(), k.float(), v.float(), num_sink_tokens=sinks, causal=causal, scale=scale,
                                     key_padding_mask=None)
    return torch.exp(lse_sinks - exact_lse)[:, :, sinks:].mean().item()


SLOW_OPTIONAL = ("kmv", "poly")  # skipped when one layer takes longer than --slow-limit


def pick_article(tokenizer, tokens: int) -> tuple[str, torch.Tensor]:
    for title, text in wikipedia_articles(min_chars=20000):
        ids = tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] >= tokens:
            return title, ids[:, :tokens]
    raise RuntimeError(f"no Wikipedia article with >= {tokens} tokens; lower --tokens")


def rel_fro(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def write_report(results: dict) -> None:
    labels = [l for l in results["methods"] if any(l in row["errors"] for row in results["layers"].values())]
    lines = [
        "# Per-layer attention error on real SmolLM2-135M-Instruct activations",
        "",
        f"Machine: {MACHINE}. Date: {results['date']}. Script: `scripts/smollm2_layer_error.py`.",
        f"Input: Wikipedia article \"{results['article']}\", first {results['tokens']} tokens; one exact prefill, each",
        "layer's q/k/v captured after RoPE (`capture_attention`), KV heads expanded; every method run causal on them.",
        f"All methods with min_seq_len={results['min_seq_len']} (the causal recursion's exact leaves; at N={results['tokens']}",
        "the other queries are approximated), otherwise default parameters. Error = ||out - exact||_F / ||exact||_F over all",
        "heads and positions. R = the layer's Q/K weight norm (rank_layers, mean over heads).",
        "",
        "Sink mass S = mean over rows i >= S of the exact softmax mass on the first S keys (all heads).",
        "",
    ]
    rows = sorted(results["layers"].items(), key=lambda kv: int(kv[0]))
    mass_keys = sorted({s for _, row in rows for s in row.get("sink_mass", {})}, key=int)
    lines += [
        "| layer | R | " + "".join(f"sink mass {s} | " for s in mass_keys) + " | ".join(labels) + " |",
        "|---|---|" + "---|" * (len(mass_keys) + len(labels)),
    ]
    for layer, row in rows:
        cells = [f"{row['errors'][l]:.4f}" if l in row["errors"] else "-" for l in labels]
        masses = "".join(f"{row['sink_mass'][s]:.3f} | " if s in row.get("sink_mass", {}) else "- | " for s in mass_keys)
        lines.append(f"| {layer} | {row['R']:.3g} | " + masses + " | ".join(cells) + " |")
    lines += ["", "## Summary", ""]
    for l in labels:
        errs = [row["errors"][l] for _, row in rows if l in row["errors"]]
        rs = [row["R"] for _, row in rows if l in row["errors"]]
        if len(errs) >= 3:
            corr = torch.corrcoef(torch.tensor([rs, errs]))[0, 1].item()
            lines.append(f"- {l}: mean error {sum(errs) / len(errs):.4f}, median {sorted(errs)[len(errs) // 2]:.4f}, "
                         f"max {max(errs):.4f} (layer {rows[errs.index(max(errs))][0]}); Pearson corr(R, error) = {corr:+.2f}; "
                         f"mean time per layer {results['seconds'][l] / len(errs):.2f} s")
    for l, why in results.get("skipped", {}).items():
        lines.append(f"- {l}: skipped ({why})")
    for base, params in results["methods"].items():  # paired effect of the sinks, per method
        s = params["params"].get("num_sink_tokens", 0)
        if s == 0:
            continue
        plain = next((l for l, c in results["methods"].items() if c["method"] == params["method"]
                      and {**c["params"], "num_sink_tokens": s} == params["params"] and c["params"].get("num_sink_tokens", 0) == 0), None)
        pairs = [(row["errors"][plain], row["errors"][base]) for _, row in rows
                 if plain is not None and plain in row["errors"] and base in row["errors"]]
        if pairs:
            better = sum(b < a for a, b in pairs)
            mean_a = sum(a for a, _ in pairs) / len(pairs)
            mean_b = sum(b for _, b in pairs) / len(pairs)
            lines.append(f"- sinks: {plain} -> {base}: mean error {mean_a:.4f} -> {mean_b:.4f} "
                         f"({100 * (mean_b - mean_a) / mean_a:+.0f}%), lower in {better} of {len(pairs)} layers")
    lines.append("")
    lines += results.get("notes", [])
    with open(os.path.join(OUT_DIR, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(results["layers"].items(), key=lambda kv: int(kv[0]))
    layers = [int(k) for k, _ in rows]
    fig, ax = plt.subplots(figsize=(11, 5))
    colors = {"hyper": "C0", "sparse_hyper (theory)": "C1", "sparse_hyper (none)": "C2", "kmv": "C3", "poly": "C4"}
    for i, (label, config) in enumerate(results["methods"].items()):
        pts = [(int(k), r["errors"][label]) for k, r in rows if label in r["errors"]]
        if pts:
            with_sinks = config["params"].get("num_sink_tokens", 0) > 0
            base = label.split(" +")[0]
            ax.plot(*zip(*pts), marker="os^vD"[i % 5], linestyle="--" if with_sinks else "-",
                    color=colors.get(base), alpha=1.0 if with_sinks else 0.6, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("relative Frobenius error vs exact")
    ax.grid(True, which="both", alpha=0.3)
    ax2 = ax.twinx()
    ax2.bar(layers, [r["R"] for _, r in rows], alpha=0.15, color="gray", label="weight norm R")
    ax2.set_ylabel("weight norm R (bars)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"SmolLM2-135M, {results['tokens']} tokens of \"{results['article']}\", causal, min_seq_len={results['min_seq_len']}; "
                 "dashed = with sinks", fontsize=9)
    fig.text(0.01, 0.01, f"{MACHINE}, {results['date']}", fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT_DIR, "error_by_layer.png"), dpi=120)


def main() -> int:
    global OUT_DIR
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--min-seq-len", type=int, default=512)
    parser.add_argument("--slow-limit", type=float, default=60.0, help="skip kmv/poly if one layer takes longer (s)")
    parser.add_argument("--sinks", type=int, nargs="+", default=[0, 64], help="num_sink_tokens values of hyper / sparse_hyper")
    parser.add_argument("--methods", nargs="+", default=None, help="labels to run (default: all of method_configs)")
    parser.add_argument("--redo", action="store_true", help="recompute: the --methods labels only, or everything")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--out", default=OUT_DIR, help="results directory")
    args = parser.parse_args()
    OUT_DIR = args.out
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, "results.json")
    configs = method_configs(args.min_seq_len, args.sinks)
    today = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    results = {"machine": MACHINE, "date": None, "script": "scripts/smollm2_layer_error.py", "tokens": args.tokens,
               "min_seq_len": args.min_seq_len, "methods": {l: {"method": m, "params": p} for l, (m, p) in configs.items()},
               "layers": {}, "seconds": {l: 0.0 for l in configs}, "skipped": {}}
    if os.path.exists(path) and not (args.redo and args.methods is None):
        with open(path) as f:
            old = json.load(f)
        if old.get("tokens") == args.tokens and old.get("min_seq_len") == args.min_seq_len:
            results.update({k: old[k] for k in ("date", "layers", "seconds", "skipped", "article", "notes") if k in old})
            results["methods"].update({l: c for l, c in old.get("methods", {}).items() if l not in results["methods"]})
            results["seconds"] = {**{l: 0.0 for l in configs}, **results["seconds"]}
            if args.redo:  # forget the cells of the labels to recompute
                for label in args.methods:
                    results["seconds"][label] = 0.0
                    results["skipped"].pop(label, None)
                    for row in results["layers"].values():
                        row["errors"].pop(label, None)

    def save() -> None:
        write_json(path, results)

    if not args.report_only:
        torch.manual_seed(0)
        model, tokenizer = load_smollm2()
        ranking = rank_layers(model)
        title, ids = pick_article(tokenizer, args.tokens)
        results["article"] = title
        print(f"article {title!r}: {ids.shape[1]} tokens; prefill with capture ...", flush=True)
        start = time.time()
        with torch.no_grad(), capture_attention(model) as captured:
            model(ids)
        print(f"prefill {time.time() - start:.1f} s", flush=True)
        del model
        todo = [(layer, label) for layer in sorted(captured) for label in configs
                if (args.methods is None or label in args.methods) and label not in results["skipped"] and label not in results["layers"].get(str(layer), {}).get("errors", {})]
        refs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, label in tqdm(todo, desc="layer x method"):
            if label in results["skipped"]:
                continue
            results["date"] = today  # this cell is measured now (or its refusal recorded)
            call = captured[layer][0]
            groups = call.query.shape[1] // call.key.shape[1]
            q, k, v = call.query, expand_kv_heads(call.key, groups), expand_kv_heads(call.value, groups)
            row = results["layers"].setdefault(str(layer), {"R": float(ranking.weight_norms[layer]), "errors": {}})
            with torch.no_grad():
                if layer not in refs:
                    refs = {layer: get_method("exact")(q, k, v, causal=call.causal, scale=call.scale,
                                                       key_padding_mask=call.key_padding_mask)}
                    masses = row.setdefault("sink_mass", {})
                    for s in args.sinks:
                        if s > 0 and str(s) not in masses:
                            masses[str(s)] = sink_mass(q, k, v, refs[layer][1], s, call.scale, call.causal)
                name, params = configs[label]
                fn = get_method(name, **params)
                t0 = time.time()
                try:
                    out, _ = fn(q, k, v, causal=call.causal, scale=call.scale, key_padding_mask=call.key_padding_mask,
                                generator=torch.Generator().manual_seed(layer))
                except ValueError as err:  # a method that refuses these inputs (e.g. poly outside its regime)
                    results["skipped"][label] = f"refused layer {layer}: {err}"
                    save()
                    continue
                elapsed = time.time() - t0
            if name in SLOW_OPTIONAL and elapsed > args.slow_limit:
                results["skipped"][label] = f"one layer took {elapsed:.0f} s > --slow-limit {args.slow_limit:.0f} s"
            row["errors"][label] = rel_fro(out, refs[layer][0])
            results["seconds"][label] = results["seconds"].get(label, 0.0) + elapsed
            save()
    if results["date"] is None:  # nothing stored and nothing measured
        results["date"] = today
    write_report(results)
    plot(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
