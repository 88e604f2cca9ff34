"""Goals an experiment states for its report, checked on a summary (:func:`report.summarize`). The goals are data:
the ``[[goal]]`` tables of an experiment config (eval/experiments/<name>.toml), one per goal::

    [[goal]]
    text = "half the layers by weight_norm: perplexity within +5% of exact"
    method = "sparse_hyper"        # the cell: method, layers, select (default weight_norm), seed (default 0),
    layers = 15                    # tokens (default: the largest N of the report)
    metric = "ppl_change_pct"      # with at_most / at_least: MET when the cell's value is within it
    at_most = 5.0

    [[goal]]
    text = "weight_norm beats last and random at 15 layers"
    method = "sparse_hyper"
    layers = 15
    beats = ["last", "random"]     # MET when the cell's perplexity is below each (random: the mean over its seeds)

A goal with neither a bound nor ``beats`` is REPORTED: the cell's numbers, with the Amdahl ceiling of its layer
count. A cell missing from the records is NOT MEASURED; a cell in which the method served no call (every call fell
back to exact attention) measures the exact model, so its goal is NOT APPLICABLE, not met.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

GOAL_KEYS = ("text", "method", "layers", "select", "seed", "tokens", "metric", "at_most", "at_least", "beats")
METRICS = ("ppl_change_pct", "perplexity", "speedup", "median_article_change_pct")


def check_goal_spec(goal: dict) -> None:
    """Raise ValueError naming what is wrong with one ``[[goal]]`` table."""
    unknown = sorted(set(goal) - set(GOAL_KEYS))
    if unknown:
        raise ValueError(f"[[goal]] {goal.get('text', '')!r}: unknown key(s) {unknown}; a goal has {list(GOAL_KEYS)}")
    missing = [k for k in ("text", "method", "layers") if k not in goal]
    if missing:
        raise ValueError(f"[[goal]] {goal.get('text', '')!r}: missing {missing} (a goal names its cell by method and layers)")
    if goal.get("metric", "ppl_change_pct") not in METRICS:
        raise ValueError(f"[[goal]] {goal['text']!r}: metric {goal['metric']!r}; choose from {list(METRICS)}")
    if "beats" in goal and ("at_most" in goal or "at_least" in goal):
        raise ValueError(f"[[goal]] {goal['text']!r}: give either a bound (at_most / at_least) or beats, not both")


def evaluate_goals(summary: dict, goals: Sequence[dict], comparison: Optional[Sequence[dict]] = None) -> list[dict]:
    """Each goal of ``goals`` (the ``[[goal]]`` tables, see the module docstring) checked on ``summary``.

    ``comparison`` (:func:`report.selection_comparison`) adds to a ``beats`` goal on how many articles the cell's
    loss was the lower one. Returns one entry per goal: {"goal", "method", "status" ("MET" / "NOT MET" /
    "NOT MEASURED" / "REPORTED" / "NOT APPLICABLE"), "detail"}."""
    rows = summary["rows"]
    if not rows or not goals:
        return []
    largest = max(r["tokens"] for r in rows)
    out = []
    for goal in goals:
        check_goal_spec(goal)
        tokens = goal.get("tokens", largest)
        select, seed = goal.get("select", "weight_norm"), goal.get("seed", 0)
        at = {(r["method"], r["layers"], r["select"], r["seed"]): r for r in rows if r["tokens"] == tokens}
        cell = at.get((goal["method"], goal["layers"], select, seed))
        entry = {"goal": goal["text"], "method": goal["method"]}
        out.append(entry)
        if cell is None:
            entry.update(status="NOT MEASURED", detail=f"cell {goal['method']}, {tokens} tokens, {goal['layers']} layers, "
                                                       f"{select} not run")
            continue
        if not cell.get("served"):
            entry.update(status="NOT APPLICABLE", detail=_nothing_served(cell))
            continue
        numbers = (f"exact {_fmt(cell['exact_perplexity'], '.3f')} -> {cell['perplexity']:.3f} "
                   f"({_fmt(cell['ppl_change_pct'], '+.1f')}%), speed-up {_fmt(cell['speedup'], '.2f')}x, "
                   f"{cell['articles']} articles, {cell['tokens_scored']} tokens scored")
        if "beats" in goal:
            entry.update(_beats(goal, cell, at, tokens, comparison))
        elif "at_most" in goal or "at_least" in goal:
            metric = goal.get("metric", "ppl_change_pct")
            value = cell.get(metric)
            ok = value is not None and value <= goal.get("at_most", value) and value >= goal.get("at_least", value)
            spec = "+.1f" if metric.endswith("_pct") else ".3f"
            unit = "%" if metric.endswith("_pct") else ""
            bound = " and ".join(f"{name.replace('_', ' ')} {format(goal[name], spec)}{unit}"
                                 for name in ("at_most", "at_least") if name in goal)
            entry.update(status="MET" if ok else "NOT MET",
                         detail=f"{metric} {_fmt(value, spec)}{unit} ({bound}): {numbers}")
        else:
            ceiling = cell.get("amdahl_ceiling")
            entry.update(status="REPORTED",
                         detail=f"speed-up {_fmt(cell['speedup'], '.2f')}x (prefill {_fmt(cell['baseline_prefill_s'], '.1f')} s -> "
                                f"{_fmt(cell['prefill_s_timed'], '.1f')} s over the {cell['articles_timed']} articles timed in that run); "
                                f"Amdahl ceiling at {goal['layers']} layers {_fmt(ceiling, '.2f')}x; perplexity "
                                f"{cell['perplexity']:.3f} ({_fmt(cell['ppl_change_pct'], '+.1f')}%)")
    return out


def _beats(goal: dict, cell: dict, at: dict, tokens: int, comparison: Optional[Sequence[dict]]) -> dict:
    method, layers, select = goal["method"], goal["layers"], goal.get("select", "weight_norm")
    parts, wins, missing = [], [], []
    for other in goal["beats"]:
        others = sorted((r for (m, l, s, _), r in at.items() if m == method and l == layers and s == other),
                        key=lambda r: r["seed"])
        if not others:
            missing.append(other)
            continue
        mean = sum(r["perplexity"] for r in others) / len(others)
        wins.append(cell["perplexity"] < mean)
        if other == "random":
            seeds = ", ".join(f"{r['perplexity']:.3f}" for r in others)
            beaten = sum(cell["perplexity"] < r["perplexity"] for r in others)
            parts.append(f"random mean {mean:.3f} over {len(others)} seeds ({seeds}; {select} beats {beaten}/{len(others)} seeds)")
        else:
            parts.append(f"{other} {mean:.3f} ({_fmt(others[0]['speedup'], '.2f')}x)")
    if missing:
        return {"status": "NOT MEASURED", "detail": f"cells of {missing} at {layers} layers missing"}
    detail = f"{select} {cell['perplexity']:.3f} ({_fmt(cell['speedup'], '.2f')}x) vs " + " vs ".join(parts)
    return {"status": "MET" if all(wins) else "NOT MET",
            "detail": detail + _paired_detail(comparison, method, tokens, layers, select)}


def _nothing_served(row: dict) -> str:
    reasons = "; ".join(f"{reason} ({count} calls)" for reason, count in (row.get("fallbacks") or {}).items())
    return f"the method served no call: every call fell back to exact attention ({reasons or 'no reason recorded'})"


def _paired_detail(comparison: Optional[Sequence[dict]], method: str, tokens: int, layers: int, select: str) -> str:
    group = next((g for g in comparison or () if (g["method"], g["tokens"], g["layers"]) == (method, tokens, layers)), None)
    if group is None or select != "weight_norm":  # the comparison pairs every selection with weight_norm
        return ""
    parts = []
    for other in ("last", "first", "measured", "random"):
        rows = [r for r in group["rows"] if r["select"] == other]
        if rows:
            parts.append(f"{other} on {sum(r['weight_norm_lower_on'] for r in rows)}/{sum(r['articles'] for r in rows)}"
                         + (" article-seed pairs" if other == "random" else " articles"))
    return "; article by article, weight_norm's loss is lower than " + ", ".join(parts) if parts else ""


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)
