"""The goals issue 7 set for the model benchmark, checked on a summary (:func:`report.summarize`): what the
report's "Goals" section states."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from .measure import amdahl_ceiling


def evaluate_goals(summary: dict, num_layers: int, tokens: Optional[int] = None,
                   comparison: Optional[Sequence[dict]] = None) -> list[dict]:
    """The three goals of issue 7 at ``tokens`` (default: the largest N measured), per patched method.

    1. weight_norm with half the layers replaced keeps perplexity within +5% of exact;
    2. weight_norm beats ``last`` and random (mean over seeds, and each seed) on perplexity at the same layer count
       (the same method and count give about the same speed-up: both are reported);
    3. speed-up with all layers replaced, next to the Amdahl ceiling from the profiled attention share.
    ``comparison`` (:func:`selection_comparison`) adds to goal 2 on how many articles weight_norm's loss was lower.
    Each entry: {"goal", "method", "status" ("MET" / "NOT MET" / "NOT MEASURED" / "REPORTED" / "NOT APPLICABLE"),
    "detail"}. A cell in which the method served no call (every call fell back to exact attention, e.g. outside its
    regime) measures the exact model: its goals are NOT APPLICABLE, not met.
    """
    rows = summary["rows"]
    if not rows:
        return []
    tokens = tokens or max(r["tokens"] for r in rows)
    half = num_layers // 2
    at = {(r["method"], r["layers"], r["select"], r["seed"]): r for r in rows if r["tokens"] == tokens}
    base = next((r for r in rows if r["tokens"] == tokens and r["layers"] == 0), None)
    prof = summary["profiles"].get(str(tokens))
    methods = sorted({r["method"] for r in rows if r["tokens"] == tokens and r["layers"] > 0})
    goals = []
    for method in methods:
        wn = at.get((method, half, "weight_norm", 0))
        g1 = {"goal": f"{tokens} tokens, {half}/{num_layers} layers by weight_norm: perplexity within +5% of exact", "method": method}
        if wn is None or base is None:
            g1.update(status="NOT MEASURED", detail="cell not run")
        elif not wn.get("served"):
            g1.update(status="NOT APPLICABLE", detail=_nothing_served(wn))
        else:
            g1.update(status="MET" if wn["ppl_change_pct"] <= 5.0 else "NOT MET",
                      detail=f"exact {wn['exact_perplexity']:.3f} -> {wn['perplexity']:.3f} ({wn['ppl_change_pct']:+.1f}%), "
                             f"speed-up {_fmt(wn['speedup'], '.2f')}x, {wn['articles']} articles, {wn['tokens_scored']} tokens scored")
        goals.append(g1)

        g2 = {"goal": f"weight_norm beats last and random at {half} layers ({tokens} tokens)", "method": method}
        last = at.get((method, half, "last", 0))
        randoms = [r for (m, l, s, _), r in at.items() if m == method and l == half and s == "random"]
        if wn is None or last is None or not randoms:
            g2.update(status="NOT MEASURED", detail="weight_norm, last or random cells missing")
        else:
            mean_random = sum(r["perplexity"] for r in randoms) / len(randoms)
            beats_last = wn["perplexity"] < last["perplexity"]
            beats_mean = wn["perplexity"] < mean_random
            seeds_beaten = sum(wn["perplexity"] < r["perplexity"] for r in randoms)
            seed_ppls = ", ".join(f"{r['perplexity']:.3f}" for r in sorted(randoms, key=lambda r: r["seed"]))
            others = [f"{s} {at[(method, half, s, 0)]['perplexity']:.3f} ({_fmt(at[(method, half, s, 0)]['speedup'], '.2f')}x)"
                      for s in ("first", "measured") if (method, half, s, 0) in at]
            g2.update(status="MET" if beats_last and beats_mean else "NOT MET",
                      detail=f"weight_norm {wn['perplexity']:.3f} ({_fmt(wn['speedup'], '.2f')}x) vs last {last['perplexity']:.3f} "
                             f"({_fmt(last['speedup'], '.2f')}x) vs random mean {mean_random:.3f} over {len(randoms)} seeds "
                             f"({seed_ppls}; "
                             f"weight_norm beats {seeds_beaten}/{len(randoms)} seeds)"
                             + (f"; also {', '.join(others)}" if others else "")
                             + _paired_detail(comparison, method, tokens, half))
        goals.append(g2)

        full = at.get((method, num_layers, "weight_norm", 0))
        g3 = {"goal": f"prefill speed-up at {tokens} tokens with all {num_layers} layers replaced, vs the Amdahl ceiling", "method": method}
        if full is None or prof is None:
            g3.update(status="NOT MEASURED", detail="cell or profile missing")
        elif not full.get("served"):
            g3.update(status="NOT APPLICABLE", detail=_nothing_served(full))
        else:
            ceiling = amdahl_ceiling(prof["sdpa_share"], num_layers, num_layers)
            g3.update(status="REPORTED",
                      detail=f"speed-up {_fmt(full['speedup'], '.2f')}x (prefill {full['baseline_prefill_s']:.1f} s -> {full['prefill_s_timed']:.1f} s "
                             f"over the {full['articles_timed']} articles timed in that run); SDPA is {100 * prof['sdpa_share']:.0f}% of the exact prefill "
                             f"(attention modules with projections {100 * prof['attention_module_share']:.0f}%), so the ceiling "
                             f"is {ceiling:.2f}x; perplexity {full['perplexity']:.3f} ({full['ppl_change_pct']:+.1f}%)")
        goals.append(g3)
    return goals


def _nothing_served(row: dict) -> str:
    reasons = "; ".join(f"{reason} ({count} calls)" for reason, count in (row.get("fallbacks") or {}).items())
    return f"the method served no call: every call fell back to exact attention ({reasons or 'no reason recorded'})"


def _paired_detail(comparison: Optional[Sequence[dict]], method: str, tokens: int, layers: int) -> str:
    group = next((g for g in comparison or () if (g["method"], g["tokens"], g["layers"]) == (method, tokens, layers)), None)
    if group is None:
        return ""
    parts = []
    for select in ("last", "first", "measured", "random"):
        rows = [r for r in group["rows"] if r["select"] == select]
        if rows:
            parts.append(f"{select} on {sum(r['weight_norm_lower_on'] for r in rows)}/{sum(r['articles'] for r in rows)}"
                         + (" article-seed pairs" if select == "random" else " articles"))
    return "; article by article, weight_norm's loss is lower than " + ", ".join(parts) if parts else ""




def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)
