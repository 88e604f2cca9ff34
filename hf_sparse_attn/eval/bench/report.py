"""Summaries of the benchmark's records (perplexity change, speed-up, random-selection groups, selections
compared article by article) and the report: results.json, results.md and the plots."""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any, Optional, Sequence

from ..store import write_json
from .goals import evaluate_goals
from .grid import PAIRED_TIMING, SELECTIONS, decode_setting
from .measure import amdahl_ceiling, perplexity, perplexity_change_interval, ratio_interval
from .results import latest_cells, latest_profiles, read_results

# ---------------------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------------------

def article_change_pct(article: dict, exact_article: dict) -> float:
    """One article's perplexity change against the exact model on the same tokens, in %:
    100 * (exp((nll_sum - exact nll_sum) / tokens) - 1)."""
    return 100.0 * (math.exp((article["nll_sum"] - exact_article["nll_sum"]) / exact_article["tokens"]) - 1.0)


def summarize(records: Sequence[dict], num_layers: int) -> dict:
    """Cells with perplexity change vs the same N's baseline and the Amdahl ceiling of their layer count, plus
    the random-selection mean/min/max per (method, N, layers)."""
    cells = latest_cells(records)
    profiles = latest_profiles(records)
    baseline_articles = {c["tokens"]: {a["title"]: a for a in c.get("per_article", [])} for c in cells.values() if c["layers"] == 0}
    # (run, N) -> the exact prefill time of each article timed in that run: the other side of that run's speed-ups
    run_baseline_s = {(r.get("run_id"), r["tokens"]): {a["title"]: a["prefill_s"] for a in r.get("per_article", [])
                                                      if not a.get("resumed")}
                      for r in records if r.get("kind") in ("cell", "baseline_rerun") and r.get("layers") == 0}
    rows = []
    for c in cells.values():
        row = {k: c.get(k) for k in ("key", "method", "tokens", "layers", "select", "seed", "perplexity", "tokens_scored",
                                      "articles", "prefill_s", "baseline_prefill_s", "speedup", "run_id", "served", "fallbacks",
                                      "load_avg_1min", "params", "timing")}
        timed = [a for a in c.get("per_article", []) if not a.get("resumed")]  # timed in the cell's own run
        row["articles_timed"] = len(timed) if timed else c.get("articles")
        row["prefill_s_timed"] = sum(a["prefill_s"] for a in timed) if timed else c.get("prefill_s")
        exact_articles = baseline_articles.get(c["tokens"], {})
        # the change is taken against the exact model on this cell's own articles (cells may cover different sets
        # when a grid was extended to more articles part of the way)
        titles = [a["title"] for a in c.get("per_article", [])]
        if titles and all(t in exact_articles for t in titles):
            row["exact_perplexity"] = perplexity(sum(exact_articles[t]["nll_sum"] for t in titles),
                                                 sum(exact_articles[t]["tokens"] for t in titles))
            row["ppl_change_pct"] = 100.0 * (c["perplexity"] / row["exact_perplexity"] - 1.0)
        else:
            row["exact_perplexity"] = row["ppl_change_pct"] = None
        changes = sorted(article_change_pct(a, exact_articles[a["title"]])
                         for a in c.get("per_article", []) if a["title"] in exact_articles)
        row["median_article_change_pct"] = statistics.median(changes) if changes else None
        # 95% bootstrap intervals over the articles: the change on all the cell's articles, the speed-up on those
        # timed in its run against that run's exact times (none for the baseline, or with fewer than 2 articles)
        articles = c.get("per_article", [])
        row["ppl_change_ci"] = list(perplexity_change_interval(
            [exact_articles[a["title"]]["nll_sum"] for a in articles], [a["nll_sum"] for a in articles],
            [exact_articles[a["title"]]["tokens"] for a in articles])) \
            if c["layers"] and row["ppl_change_pct"] is not None and len(articles) > 1 else None
        base_s = run_baseline_s.get((c.get("run_id"), c["tokens"]), {})
        row["speedup_ci"] = list(ratio_interval([base_s[a["title"]] for a in timed], [a["prefill_s"] for a in timed])) \
            if c["layers"] and len(timed) > 1 and all(a["title"] in base_s for a in timed) else None
        prof = profiles.get(c["tokens"])
        row["amdahl_ceiling"] = None if prof is None else amdahl_ceiling(prof["sdpa_share"], c["layers"], num_layers)
        rows.append(row)
    rows.sort(key=lambda r: (r["tokens"], r["method"] != "exact", r["method"], r["layers"], r["select"], r["seed"]))
    random_groups: dict[str, dict] = {}
    for r in rows:
        if r["select"] == "random":
            g = random_groups.setdefault(f"{r['method']}|N={r['tokens']}|layers={r['layers']}",
                                         {"method": r["method"], "tokens": r["tokens"], "layers": r["layers"], "perplexities": [], "speedups": []})
            g["perplexities"].append(r["perplexity"])
            if r["speedup"] is not None:
                g["speedups"].append(r["speedup"])
    for g in random_groups.values():
        g["seeds"] = len(g["perplexities"])
        g["mean_perplexity"] = sum(g["perplexities"]) / g["seeds"]
        g["mean_speedup"] = sum(g["speedups"]) / len(g["speedups"]) if g["speedups"] else None
    return {"rows": rows, "profiles": {str(k): v for k, v in profiles.items()}, "random": list(random_groups.values())}


def selection_comparison(records: Sequence[dict]) -> list[dict]:
    """Layer selections compared article by article, at equal work (same method, N and number of layers).

    For every (method, N, layers) with a ``weight_norm`` cell and at least one other selection: each selection's
    per-article perplexity change against the exact model on the same article, and on how many articles
    weight_norm's loss is the lower one. A paired comparison: articles differ from each other far more than
    selections do, so "lower on 7 of 8 articles" says more than two pooled perplexities 1% apart.

    Returns groups ``{"method", "tokens", "layers", "titles": [str], "rows": [{"select", "seed", "perplexity",
    "ppl_change_pct", "article_change_pct": [float per title], "weight_norm_lower_on": int, "articles": int}]}``."""
    cells = [c for c in latest_cells(records).values() if c.get("per_article")]
    exact = {c["tokens"]: {a["title"]: a for a in c["per_article"]} for c in cells if c["layers"] == 0}
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        if c["layers"] > 0:
            groups.setdefault((c["method"], c["tokens"], c["layers"]), []).append(c)
    out = []
    for (method, tokens, layers), members in sorted(groups.items()):
        wn = next((c for c in members if c["select"] == "weight_norm"), None)
        base = exact.get(tokens)
        if wn is None or base is None or len(members) < 2:
            continue
        titles = [a["title"] for a in wn["per_article"] if a["title"] in base]
        wn_nll = {a["title"]: a["nll_sum"] for a in wn["per_article"]}
        rows = []
        for c in sorted(members, key=lambda c: (c["select"] != "weight_norm", c["select"], c["seed"])):
            mine = {a["title"]: a for a in c["per_article"]}
            shared = [t for t in titles if t in mine]
            changes = [article_change_pct(mine[t], base[t]) for t in shared]
            rows.append({"select": c["select"], "seed": c["seed"], "perplexity": c["perplexity"],
                         "ppl_change_pct": 100.0 * (math.exp(sum(mine[t]["nll_sum"] - base[t]["nll_sum"] for t in shared)
                                                             / sum(base[t]["tokens"] for t in shared)) - 1.0),
                         "article_change_pct": changes, "articles": len(shared),
                         "weight_norm_lower_on": sum(wn_nll[t] < mine[t]["nll_sum"] for t in shared)})
        out.append({"method": method, "tokens": tokens, "layers": layers, "titles": titles, "rows": rows})
    return out


SELECTION_ORDER = SELECTIONS  # the older name


def selections_by_layer_count(comparison: Sequence[dict]) -> list[dict]:
    """The :func:`selection_comparison` groups of one (method, N) side by side, where selections were compared at
    two or more layer counts: does a selection's lead hold as more layers are replaced?

    Returns ``[{"method", "tokens", "layers": [int], "cells": {(select, layers): {"ppl_change_pct",
    "weight_norm_lower_on", "articles", "seeds"}}}]``; random is one entry per layer count: the change is the mean
    over its seeds, the paired counts are summed over them (article-seed pairs)."""
    by_method: dict[tuple, list[dict]] = {}
    for g in comparison:
        by_method.setdefault((g["method"], g["tokens"]), []).append(g)
    out = []
    for (method, tokens), groups in sorted(by_method.items()):
        if len(groups) < 2:
            continue
        cells: dict[tuple, dict] = {}
        for g in groups:
            for select in SELECTION_ORDER:
                rows = [r for r in g["rows"] if r["select"] == select]
                if rows:
                    cells[(select, g["layers"])] = {
                        "ppl_change_pct": sum(r["ppl_change_pct"] for r in rows) / len(rows),
                        "weight_norm_lower_on": sum(r["weight_norm_lower_on"] for r in rows),
                        "articles": sum(r["articles"] for r in rows), "seeds": len(rows)}
        out.append({"method": method, "tokens": tokens, "layers": sorted(g["layers"] for g in groups), "cells": cells})
    return out


def decode_label(record: dict) -> str:
    """How a decode table names what a record's patched layers ran on the decode steps: the decode method and its
    parameters that differ from the method's defaults ("local window=512"), "-" for the model's own attention; when
    the layers ran more than one decode method (``other_layers`` with its own), how many ran each
    ("exact (exact on 10 layers, local on 20)")."""
    name = record.get("decode_method")
    if name is None:
        return "-"
    params = record.get("decode_params") or {}
    try:
        from ...methods.decode import get_decode_spec

        defaults = get_decode_spec(name).resolve_params({})
    except ValueError:  # a method registered by the process that measured it
        defaults = {}
    changed = ", ".join(f"{k}={v}" for k, v in params.items() if k not in defaults or defaults[k] != v)
    label = f"{name} {changed}" if changed else name
    split = record.get("layer_decode") or {}
    if len(split) > 1:
        label += " (" + ", ".join(f"{method} on {n}" for method, n in sorted(split.items())) + " layers)"
    return label


def decode_lines(records: Sequence[dict]) -> tuple[list[dict], list[str]]:
    """The ``"kind": "decode"`` records (``bench model --decode-tokens``, the latest per cell and setting) and the
    report section on them: ms per generated token and tokens/s of the exact model and of each cell, the speed-up
    with its bootstrap interval over articles, and the cache kinds. When some record's patched layers ran a decode
    method (``bench model --decode-method``: records that name their decode setting), the table also names it, the
    calls it served and the cell's first step, and the parameters of each method are listed below it."""
    latest: dict[tuple, dict] = {}
    for r in records:
        if r.get("kind") == "decode":
            latest[(r["key"], r["decode_tokens"], r["cache"], r["baseline_cache"], decode_setting(r))] = r
    rows = sorted(latest.values(), key=lambda r: (r["tokens"], r["layers"] > 0, r["method"], r["layers"], r["select"],
                                                  r["seed"], decode_label(r)))
    if not rows:
        return [], []
    # records that name their decode setting (bench model --decode-method) get its columns; a directory of older
    # records alone keeps the report it had
    with_decode = any("decode_method" in r for r in rows)
    alternation = ("The exact model and the cell alternate step by step, each from its own untimed prefill (one shared "
                   "prefill when both are the unpatched model); the cell's model is patched for its prefill and each of "
                   "its steps and unpatched after, outside the timed step (records made before the decode method was "
                   "recorded alternated whole decodes, article by article)." if with_decode else
                   "The exact model and the cell alternate article by article (step by step when both are the unpatched "
                   "model, from one shared prefill).")
    lines = ["", "## Decode: time per generated token after the prompt", "",
             "Each article is prefilled (untimed) and then decoded greedily one token per step; ms/token = median over "
             "the steps, averaged over the articles; speed-up = sum of the exact model's medians / sum of the cell's, "
             f"with a 95% bootstrap interval over articles. {alternation} 'same tokens' = leading generated "
             "tokens equal to the exact model's, summed over articles; 'continuation ppl' = the perplexity of the "
             "cell's generated tokens over that of the exact model's own greedy tokens, both scored by the exact "
             "model ('-': a record made before it was measured)."
             + (" 'decode' = what the cell's patched layers ran on the steps against the cache ('-': the model's own "
                "attention; the exact baseline row is the unpatched model; parameters other than the method's "
                "defaults follow its name); 'decode served' = the calls against the "
                "cache the decode method served, with the calls that fell back to the model's attention and why; "
                "'cell 1st step ms' = the cell's first timed step, averaged over the articles (a decode method that "
                "builds an index of the cached keys builds it there); 'decode ppl (true text)' = the perplexity of "
                "the prompt's last tokens (as many as the steps), each predicted by a single-token step through the "
                "cell's decode path after its cache is cropped back, over the same through the exact model's "
                "('-': not measured; the decode steps served include these)." if with_decode else ""), ""]
    if with_decode:
        lines += ["| N | method | layers | select | seed | decode | steps | exact: cache | exact ms/token | cell: cache | "
                  "cell ms/token | cell 1st step ms | tokens/s exact / cell | speed-up | same tokens | continuation ppl | "
                  "decode ppl (true text) | decode served | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    else:
        lines += ["| N | method | layers | select | seed | steps | exact: cache | exact ms/token | cell: cache | cell ms/token | "
                  "tokens/s exact / cell | speed-up | same tokens | continuation ppl | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["speedup_ci"]
        same = sum(a["same_tokens"] for a in r["per_article"])
        total = sum(len(a["cell_tokens"]) for a in r["per_article"])
        load = "/".join(f"{x:.1f}" for x in r["load_avg_1min"])
        ppl = "-" if r.get("continuation_ppl_change_pct") is None else f"{r['continuation_ppl_change_pct']:+.1f}%"
        forced = "-" if r.get("forced_ppl_change_pct") is None else f"{r['forced_ppl_change_pct']:+.2f}%"
        if with_decode:
            first = sum(a["cell_step_ms"][0] for a in r["per_article"]) / len(r["per_article"])
            falls = "; ".join(f"{reason}: {n}" for reason, n in sorted((r.get("fallbacks") or {}).items()))
            served = "-" if r["layers"] == 0 else f"{r.get('decode_served', 0)}" + (f" (fallback {falls})" if falls else "")
            lines.append(f"| {r['tokens']} | {r['method']} | {r['layers']} | {r['select']} | {r['seed']} | "
                         f"{decode_label(r)} | {r['decode_tokens']} | {r['baseline_cache']} | "
                         f"{r['baseline_median_ms']:.1f} | {r['cache']} | {r['cell_median_ms']:.1f} | {first:.1f} | "
                         f"{r['baseline_tokens_per_s']:.2f} / {r['cell_tokens_per_s']:.2f} | {r['speedup']:.3f}x [{lo:.3f}, {hi:.3f}] | "
                         f"{same}/{total} | {ppl} | {forced} | {served} | {load} |")
        else:
            lines.append(f"| {r['tokens']} | {r['method']} | {r['layers']} | {r['select']} | {r['seed']} | {r['decode_tokens']} | "
                         f"{r['baseline_cache']} | {r['baseline_median_ms']:.1f} | {r['cache']} | {r['cell_median_ms']:.1f} | "
                         f"{r['baseline_tokens_per_s']:.2f} / {r['cell_tokens_per_s']:.2f} | {r['speedup']:.3f}x [{lo:.3f}, {hi:.3f}] | "
                         f"{same}/{total} | {ppl} | {load} |")
    params = {decode_label(r): r["decode_params"] for r in rows if r.get("decode_method") is not None}
    if params:
        lines += ["", "Decode parameters (all of them): " + "; ".join(
            f"{label}: " + (", ".join(f"{k}={v}" for k, v in p.items()) or "none") for label, p in sorted(params.items())) + "."]
    return rows, lines


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _timing_sentence(paired: Sequence[bool]) -> str:
    """How the rows' prefills were timed (``paired``: per row, timed article by article in turn with the exact
    model), or in two halves."""
    if all(paired):
        return ("Timing: the exact model and every cell were timed article by article in turn (an article exact, then "
                "with each cell), so a drift of the machine during the run reaches both sides of a speed-up.")
    halves = ("every article exact, then every article with each cell (a drift of the machine between the halves "
              "moves a speed-up more than its interval over articles shows)")
    if not any(paired):
        return f"Timing: {halves}."
    return (f"Timing: the speed-ups marked † were timed article by article in turn with the exact model; the others "
            f"{halves}.")


def model_report_markdown(summary: dict, goals: Sequence[dict], *, header_lines: Sequence[str],
                          comparison: Sequence[dict] = (), comparison_plots: Optional[dict] = None) -> str:
    """results.md: header, goals, profile table, the article-by-article selection comparison, every cell,
    random-selection groups."""
    lines = list(header_lines)
    if goals:
        lines += ["", "## Goals (from the experiment config)", ""]
        for g in goals:
            lines.append(f"- **{g['status']}** — {g['goal']}. {g['detail']}.")
    lines += ["", "## Attention's share of the exact prefill (torch.profiler, one article, one run)", "",
              "| N | profiled prefill s | SDPA share | attention-module share | Amdahl ceiling, all layers |", "|---|---|---|---|---|"]
    for n, p in sorted(summary["profiles"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {n} | {p['wall_s']:.2f} | {100 * p['sdpa_share']:.1f}% | {100 * p['attention_module_share']:.1f}% | "
                     f"{1 / (1 - p['sdpa_share']):.2f}x |")
    for overview in selections_by_layer_count(comparison):
        selects = [s for s in SELECTION_ORDER if any(k[0] == s for k in overview["cells"])]
        lines += ["", f"## Layer selections at every layer count compared: {overview['method']}, {overview['tokens']} tokens", "",
                  "Perplexity change against the exact model on the same articles (random: mean over its seeds) and, in "
                  "brackets, on how many articles (random: article-seed pairs) weight_norm's loss is the lower one. Equal "
                  "layer count = equal work: the speed-ups of a row differ only by timing noise (see 'Every cell'). With every "
                  "layer replaced all selections patch the same layers (ties count as not lower); a random cell differs "
                  "there only by its seed, which also seeds hashing: that spread is the method's own seed noise.", ""]
        plot = (comparison_plots or {}).get((overview["method"], overview["tokens"], "layers"))
        if plot:
            lines += [f"![{plot}]({plot})", ""]
        lines += ["| layers | " + " | ".join(selects) + " |", "|---" * (len(selects) + 1) + "|"]
        for layers in overview["layers"]:
            entries = []
            for select in selects:
                c = overview["cells"].get((select, layers))
                entries.append("-" if c is None else f"{c['ppl_change_pct']:+.1f}%" + (
                    "" if select == "weight_norm" else f" ({c['weight_norm_lower_on']}/{c['articles']})"))
            lines.append(f"| {layers} | " + " | ".join(entries) + " |")
    for g in comparison:
        lines += ["", f"## Layer selections article by article: {g['method']}, {g['layers']} layers, {g['tokens']} tokens", "",
                  f"Change = perplexity against the exact model on the same article; 'weight_norm lower on' = articles where "
                  f"weight_norm's loss is below this selection's (of {len(g['titles'])}).", ""]
        plot = (comparison_plots or {}).get((g["method"], g["tokens"], g["layers"]))
        if plot:
            lines += [f"![{plot}]({plot})", ""]
        lines += ["| select | seed | perplexity | change | per-article change, min / median / max | weight_norm lower on |",
                  "|---|---|---|---|---|---|"]
        for r in g["rows"]:
            ch = sorted(r["article_change_pct"])
            med = statistics.median(ch)
            lines.append(f"| {r['select']} | {r['seed']} | {r['perplexity']:.3f} | {r['ppl_change_pct']:+.1f}% | "
                         f"{ch[0]:+.1f}% / {med:+.1f}% / {ch[-1]:+.1f}% | "
                         + ("-" if r["select"] == "weight_norm" else f"{r['weight_norm_lower_on']}/{r['articles']}") + " |")
    paired = [r.get("timing") == PAIRED_TIMING for r in summary["rows"]]
    mixed = any(paired) and not all(paired)  # only then do the paired rows need a mark
    lines += ["", "## Every cell", "",
              "Perplexity = exp(mean natural-log loss) over the identical token set of each N; speed-up = this run's exact "
              "prefill time / the cell's (sums over the articles timed in the cell's run: 'prefill s' is that sum); in brackets, 95% "
              "bootstrap intervals over the articles (resampled with replacement, 10,000 draws); median article change = the median over the articles of each "
              "article's own perplexity change; ceiling = Amdahl bound for that many layers; load = 1-minute "
              "load average of the machine before/after the cell (2 cores: above ~2 other jobs competed). 'articles' = scored "
              "(timed in the run of the speed-up): a cell extended to more articles in a later run is timed on the new ones; "
              "its change is against the exact model on its own articles. "
              + _timing_sentence(paired), "",
              "| N | method | layers | select | seed | perplexity | change | median article change | articles (timed) | tokens scored | prefill s | speed-up | ceiling | served | fallbacks | load |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def mark(r: dict) -> str:
        return " †" if mixed and r.get("timing") == PAIRED_TIMING else ""

    def change(r: dict) -> str:
        ci = r.get("ppl_change_ci")
        return f"{_fmt(r['ppl_change_pct'], '+.1f')}%" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")

    def speedup(r: dict) -> str:
        ci = r.get("speedup_ci")
        return f"{_fmt(r['speedup'], '.2f')}x" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "") + mark(r)

    for r in summary["rows"]:
        falls = "; ".join(f"{k}: {v}" for k, v in sorted((r.get("fallbacks") or {}).items())) or "-"
        lines.append(f"| {r['tokens']} | {r['method']} | {r['layers']} | {r['select']} | {r['seed']} | {r['perplexity']:.3f} | "
                     f"{change(r)} | {_fmt(r.get('median_article_change_pct'), '+.1f')}% | {r.get('articles')} ({r['articles_timed']}) | {r['tokens_scored']} | {r['prefill_s_timed']:.1f} | {speedup(r)} | "
                     f"{_fmt(r['amdahl_ceiling'], '.2f')}x | {r.get('served', 0)} | {falls} | "
                     f"{'-' if not r.get('load_avg_1min') else '/'.join(f'{x:.1f}' for x in r['load_avg_1min'])} |")
    params_seen: dict[str, set] = {}
    for r in summary["rows"]:
        if r.get("params"):
            params_seen.setdefault(r["method"], set()).add(json.dumps(r["params"], sort_keys=True))
    if params_seen:
        lines += ["", "Method parameters as run (from the plan of each cell; the method code is that of the run's date): "
                  + "; ".join(f"{m}: {' / '.join(sorted(v))}" for m, v in sorted(params_seen.items()))]
    if summary["random"]:
        lines += ["", "## Random selection (mean over seeds)", "", "| N | method | layers | seeds | mean perplexity | min | max | mean speed-up |",
                  "|---|---|---|---|---|---|---|---|"]
        for g in summary["random"]:
            lines.append(f"| {g['tokens']} | {g['method']} | {g['layers']} | {g['seeds']} | {g['mean_perplexity']:.3f} | "
                         f"{min(g['perplexities']):.3f} | {max(g['perplexities']):.3f} | {_fmt(g['mean_speedup'], '.2f')}x |")
    return "\n".join(lines) + "\n"


def write_model_results(out_dir: str, num_layers: int, *, header_lines: Sequence[str], extra: Optional[dict] = None,
                        goals: Sequence[dict] = ()) -> dict:
    """From the results files of ``out_dir`` (results.jsonl and the shards', :func:`.store.read_results`) write
    results.json, results.md and the plots: one ppl-vs-speed-up PNG per N, one per-article heatmap per selection
    comparison, one change-vs-layers curve per (method, N) compared at two or more layer counts. ``goals``: the
    ``[[goal]]`` tables of the experiment config (:mod:`.goals`), checked and stated in the report."""
    from ..plots import (
        plot_perplexity_vs_speedup,
        plot_selection_articles,
        plot_selections_vs_layers,
    )

    records = read_results(out_dir)
    summary = summarize(records, num_layers)
    comparison = selection_comparison(records)
    checked = evaluate_goals(summary, goals, comparison=comparison)
    comparison_plots = {}
    for g in comparison:
        name = f"selections_by_article_{g['method']}_{g['layers']}layers_{g['tokens']}.png"
        plot_selection_articles(g, os.path.join(out_dir, name))
        comparison_plots[(g["method"], g["tokens"], g["layers"])] = name
    overviews = selections_by_layer_count(comparison)
    for overview in overviews:
        name = f"selections_vs_layers_{overview['method']}_{overview['tokens']}.png"
        plot_selections_vs_layers(overview, os.path.join(out_dir, name))
        comparison_plots[(overview["method"], overview["tokens"], "layers")] = name
    plots = []
    for n in sorted({r["tokens"] for r in summary["rows"]}):
        if any(r["tokens"] == n and r["layers"] > 0 for r in summary["rows"]):
            plots.append(os.path.basename(plot_perplexity_vs_speedup(
                summary["rows"], n, os.path.join(out_dir, f"ppl_vs_speedup_{n}.png"))))
    runs = [r for r in records if r.get("kind") == "run"]
    result = {**(extra or {}), "runs": runs, "goals": checked, "plots": plots + list(comparison_plots.values()),
              "selection_comparison": comparison,
              "selections_by_layer_count": [{**o, "cells": [{"select": s, "layers": l, **c} for (s, l), c in o["cells"].items()]}
                                            for o in overviews], **summary}
    result["decode"], decode_md = decode_lines(records)
    write_json(os.path.join(out_dir, "results.json"), result)  # per-process temporary file: shards may write at once
    md = model_report_markdown(summary, checked, header_lines=list(header_lines) + ([""] + [f"![{p}]({p})" for p in plots] if plots else []),
                               comparison=comparison, comparison_plots=comparison_plots)
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(md + ("\n".join(decode_md) + "\n" if decode_md else ""))
    return result
