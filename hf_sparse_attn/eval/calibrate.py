"""calibrate: the fastest plan that stays within a quality budget, found on the user's own model and text.

    from hf_sparse_attn import calibrate
    plan = calibrate(model, calibration_ids, budget=0.03, tokenizer=tokenizer, max_minutes=10)
    print(plan.report()); plan.save("plan.json")     # re-apply: patch_model(model, plan="plan.json")

The search (docs/calibrate.md has the whole story); an estimate of its run time is printed first (:func:`estimate_run`;
``max_minutes`` is a budget):

1. **Cells.** For every eligible layer and every candidate (a method with one parameter setting, see
   ``DEFAULT_CANDIDATES``; ``candidates=`` alone limits the methods to those it names):
   - the output error (the cheap proxy): the relative Frobenius error ``||out - exact|| / ||exact||`` of the layer's
     attention output, the method run on the q/k/v the exact model gave that layer (``capture_attention``);
   - saving: seconds of that layer's attention call, exact SDPA minus the method, measured on this machine on the
     captured q/k/v of the first calibration text, on ``timed_layers`` layers (the others take their medians);
   - ``metric="loss"`` only (slow, opt in): the single-layer perplexity change, one forward per cell.
   A candidate that would not serve the call (its ``min_seq_len``, its own check) is recorded as not served and
   never chosen.
2. **Search** (default ``metric="output_error"``): cells by saving per error, the best cell of each layer; the
   longest prefix whose *measured* combined loss holds the budget (:func:`greedy_plan`), then ``refine`` rounds
   where the choice is close: a cell that broke the budget on its own is skipped and the rest searched
   (:func:`prefix_search`). ``metric="loss"``: the prefix whose single-layer losses sum within the budget, backed off
   on the measured combined loss.
3. **Retrieval** (``retrieval_budget`` points, default 5; ``tokenizer`` required): the exact model and the plan on a
   small RULER pass-key / needle probe set (:class:`RulerProbe`); a plan that loses more falls back along its own
   order to the longest plan that passes (:func:`retrieval_fallback`).
4. **Held-out.** With ``heldout_ids``, the plan's perplexity change and prefill speed-up on that text are measured
   and reported next to the budget. A plan with no layer says why (:func:`why_no_layer`).

Also here: :func:`proxy_check` (output error against single-layer loss on a subset of cells). The SmolLM2
experiment's comparison with fixed plans, its goals, report and plot live with the experiment
(scripts/calibrate_smollm2.py).

Every measurement is one record of a JSONL cache (``cache=path``; appended crash-safe, one line per record), keyed
by the model's Q/K hash, the data fingerprint, the layer, the candidate and the seed: a killed calibration resumes
where it stopped, and a second budget on the same data re-measures only its own combined plans.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import time
import uuid
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..methods.common import expand_kv_heads
from ..methods.registry import get_spec, list_methods
from ..patches import LayerRuntime, capture_attention, find_adapter
from ..patching import current_plan, patch_model, unpatch_model
from ..plan import LayerPlan, PatchPlan, library_versions, model_fingerprint, now_iso
from ..selection import rank_layers
from .bench import append_jsonl, prefill_and_nll, read_jsonl
from .sparsity import spearman

METRICS = ("loss", "output_error")
SEARCHES = ("prefix", "upgrades")  # output error: prefixes of one cell per layer, or multiple-choice upgrades
RUN_ID = uuid.uuid4().hex[:12]  # this process: every cache record says which run measured (and timed) it

# A few parameter settings per method, from the causal kernel benchmark's frontier at 8k
# (eval/results/kernels_causal/results.md): the method's defaults (for hyper / sparse_hyper the causal recursion)
# and the single pass at windows 256-512; local at windows 256-1024. Parameters not named keep the method's
# defaults, min_seq_len included (shorter calls fall back to exact attention and such a cell is "not served").
DEFAULT_CANDIDATES: dict[str, list[dict[str, Any]]] = {
    "local": [{"window": 256}, {"window": 512}, {"window": 1024}],
    "sparse_hyper": [{}, {"causal_mode": "single_pass", "window": 256, "block_size": 128},
                     {"causal_mode": "single_pass", "window": 512, "block_size": 256}],
    "hyper": [{}, {"causal_mode": "single_pass", "window": 256, "block_size": 256, "sample_size": 256},
              {"causal_mode": "single_pass", "window": 512, "block_size": 256, "sample_size": 256}],
}
CandidatesArg = Union[None, dict[str, Sequence[dict[str, Any]]]]


@dataclasses.dataclass
class Cell:
    """One layer with one candidate, measured alone.

    cost: the calibration metric (loss: perplexity change as a fraction; output_error: relative error), None when not
    measured. error: relative output error (always measured). method_s / exact_s: seconds of the layer's attention
    call with the method / exact SDPA. served: whether the method computes this call (False: it falls back)."""

    layer: int
    method: str
    params: dict[str, Any]
    served: bool
    error: Optional[float] = None
    loss_change: Optional[float] = None
    cost: Optional[float] = None
    method_s: Optional[float] = None
    exact_s: Optional[float] = None

    @property
    def key(self) -> str:
        return candidate_key(self.method, self.params)

    @property
    def saving(self) -> float:
        if not self.served or self.method_s is None or self.exact_s is None:
            return 0.0
        return self.exact_s - self.method_s

    @property
    def ratio(self) -> float:
        """Saving per cost; infinite for a cost <= 0 (the order then goes by saving)."""
        if self.cost is None:
            return -math.inf
        return math.inf if self.cost <= 0 else self.saving / self.cost


def candidate_key(method: str, params: dict[str, Any]) -> str:
    return f"{method}{json.dumps(params, sort_keys=True)}"


def candidate_label(method: str, params: dict[str, Any]) -> str:
    """Short name of a candidate: the method and the parameters that differ from its defaults."""
    defaults = get_spec(method).resolve_params({})
    changed = [f"{k}={v}" for k, v in params.items() if defaults.get(k) != v]
    return f"{method}({', '.join(changed)})" if changed else method


def resolve_candidates(methods: Sequence[str], candidates: CandidatesArg) -> list[tuple[str, dict[str, Any]]]:
    """(method, resolved params) for every candidate: ``candidates[method]`` where given, else the defaults.
    Unknown methods and parameters are errors that name the valid ones."""
    if isinstance(methods, str):
        methods = [methods]
    if not methods:
        raise ValueError(f"methods is empty: name at least one of {', '.join(m for m in list_methods() if m != 'exact')}")
    known = list_methods()
    for method in methods:
        if not isinstance(method, str) or method not in known or method == "exact":
            raise ValueError(f"unknown method {method!r} for calibrate; methods are: "
                             f"{', '.join(m for m in known if m != 'exact')}")
    if candidates is not None:
        if not isinstance(candidates, dict):
            raise ValueError("candidates must be a dict: method name -> list of parameter dicts")
        extra = sorted(set(candidates) - set(methods))
        if extra:
            raise ValueError(f"candidates name method(s) {extra} that are not in methods={list(methods)}")
    resolved, seen = [], set()
    for method in methods:
        settings = (candidates or {}).get(method, DEFAULT_CANDIDATES.get(method, [{}]))
        if not settings:
            raise ValueError(f"candidates[{method!r}] is empty: give at least one parameter dict (or {{}} for the defaults)")
        for params in settings:
            if not isinstance(params, dict):
                raise ValueError(f"candidates[{method!r}] must be a list of parameter dicts; got {params!r:.60}")
            full = get_spec(method).resolve_params(params)
            if candidate_key(method, full) not in seen:
                seen.add(candidate_key(method, full))
                resolved.append((method, full))
    return resolved


def data_fingerprint(texts: Sequence[torch.Tensor]) -> str:
    """sha256 of the token ids (int64, with each text's shape): which calibration text a plan was found on."""
    digest = hashlib.sha256()
    for ids in texts:
        digest.update(str(tuple(ids.shape)).encode())
        digest.update(ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _as_texts(ids: Any, what: str) -> list[torch.Tensor]:
    """input ids [B, N], [N] or a list of such -> list of [1, N] int64 CPU tensors."""
    items = list(ids) if isinstance(ids, (list, tuple)) else [ids]
    texts = []
    for item in items:
        if not isinstance(item, torch.Tensor) or item.dtype.is_floating_point or item.dtype == torch.bool:
            raise ValueError(f"{what} must be token ids: an integer tensor [B, N] or [N], or a list of them; got "
                             f"{type(item).__name__}{'' if not isinstance(item, torch.Tensor) else ' ' + str(item.dtype)}")
        if item.dim() == 1:
            item = item[None]
        if item.dim() != 2:
            raise ValueError(f"{what}: token ids must be [B, N] or [N]; got shape {tuple(item.shape)}")
        texts.extend(row[None].long() for row in item)
    if not texts or any(t.shape[1] < 2 for t in texts):
        raise ValueError(f"{what}: give at least one text of at least 2 tokens")
    return texts


def check_budget(budget: Any) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) \
            or not 0 <= budget <= 1:
        raise ValueError(f"budget must be a perplexity increase as a fraction in [0, 1], e.g. 0.03 for +3%; got {budget!r}")
    return float(budget)


# ---------------------------------------------------------------------------------------------------------
# Measurements (module-level functions: the tests count their calls)
# ---------------------------------------------------------------------------------------------------------

def measure_nll(model: torch.nn.Module, texts: Sequence[torch.Tensor]) -> dict[str, float]:
    """Sum of next-token losses over ``texts`` with the model as it is now: {nll, tokens, prefill_s}."""

    nll, tokens, seconds = 0.0, 0, 0.0
    for ids in texts:
        n, t, s = prefill_and_nll(model, ids.to(model.device))
        nll, tokens, seconds = nll + n, tokens + t, seconds + s
    return {"nll": nll, "tokens": tokens, "prefill_s": seconds}


def sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                   key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The reference output calibrate measures every candidate against (and times as the exact cost): torch SDPA,
    output only, no lse (the ``exact`` method is ``hf_sparse_attn.methods.exact``). q [B, H, N, D], k/v [B, H, N, D]
    (expanded); key_padding_mask [B, N] bool or None -> [B, H, N, D]."""
    if key_padding_mask is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    mask = key_padding_mask[:, None, None, :]
    if causal:
        n = q.shape[2]
        mask = mask & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def measure_layer(captured: Any, candidates: Sequence[tuple[str, dict[str, Any]]], seed: int, timed: bool,
                  repeats: int = 3) -> dict[str, Any]:
    """Run every candidate on one captured attention call (:class:`hf_sparse_attn.CapturedAttention`: query
    [B, H, N, D], key/value [B, Hkv, N, D]) through the adapter's own runtime (so the same fallbacks apply).

    Returns {ref_sq, err_sq: {key: float or None (not served)}, and when ``timed``: exact_s, method_s: {key: s}}
    (medians of ``repeats``, exact and each method alternated)."""

    if captured.attend_mask is not None:
        raise ValueError(f"layer {captured.layer_idx}: its attention mask is not causal + key padding; calibrate "
                         "measures plain text (no packed sequences or custom masks)")
    q, k, v = captured.query, captured.key, captured.value
    groups = q.shape[1] // k.shape[1]
    k_full, v_full = expand_kv_heads(k, groups), expand_kv_heads(v, groups)
    args = dict(scale=captured.scale, causal=captured.causal, key_padding_mask=captured.key_padding_mask)

    def synced(fn: Callable[[], Any]) -> Callable[[], Any]:  # GPU calls are asynchronous: time them to completion
        if q.device.type != "cuda":
            return fn
        return lambda: (fn(), torch.cuda.synchronize(q.device))

    def run_exact() -> torch.Tensor:
        return sdpa_reference(q, k_full, v_full, captured.causal, captured.scale, captured.key_padding_mask)

    ref = run_exact().float()
    record: dict[str, Any] = {"ref_sq": float(ref.double().pow(2).sum()), "err_sq": {}}
    runtimes = {}
    for method, params in candidates:
        key = candidate_key(method, params)
        runtime = LayerRuntime(captured.layer_idx, method, params, seed,
                               LayerPlan(captured.layer_idx, 0.0, 0, method, dict(params)))
        with torch.no_grad():
            out = runtime.attend(q, k, v, **args)
        if out is None:
            record["err_sq"][key] = None
            continue
        record["err_sq"][key] = float((out.float() - ref).double().pow(2).sum())
        runtimes[key] = runtime
    if timed:
        with torch.no_grad():
            record["exact_s"], record["method_s"] = time_calls(
                synced(run_exact),
                {key: synced(lambda r=runtime: r.attend(q, k, v, **args)) for key, runtime in runtimes.items()},
                repeats)
    return record


def time_calls(run_exact: Callable[[], Any], runs: dict[str, Callable[[], Any]], repeats: int) -> tuple[float, dict[str, float]]:
    """Medians of ``repeats`` timings (seconds) of the exact call and of each method's call, alternated in one loop
    so that both see the same machine state: (exact_s, {key: method_s})."""
    exact_times: list[float] = []
    method_times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        start = time.perf_counter()
        run_exact()
        exact_times.append(time.perf_counter() - start)
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            method_times[key].append(time.perf_counter() - start)
    return statistics.median(exact_times), {key: statistics.median(ts) for key, ts in method_times.items()}


# ---------------------------------------------------------------------------------------------------------
# Greedy plan and back-off (pure: the measurement of a combined plan is a function given to it)
# ---------------------------------------------------------------------------------------------------------

def greedy_order(cells: Sequence[Cell]) -> list[Cell]:
    """Served cells with a positive saving and a measured cost, by saving per cost (cost <= 0 first, by saving)."""
    usable = [c for c in cells if c.served and c.saving > 0 and c.cost is not None]
    return sorted(usable, key=lambda c: (-c.ratio, -c.saving, c.layer, c.key))


def prefix_order(cells: Sequence[Cell]) -> list[Cell]:
    """The best-ratio cell of each layer, in :func:`greedy_order`: the order whose prefixes ``metric="output_error"``
    searches (the same for every budget, so prefixes measured for one budget serve the next)."""
    order, taken = [], set()
    for cell in greedy_order(cells):
        if cell.layer not in taken:
            order.append(cell)
            taken.add(cell.layer)
    return order


def upgrade_plans(cells: Sequence[Cell]) -> list[list[Cell]]:
    """The plans of the multiple-choice greedy: plans[k] after k upgrades (plans[0] = all exact).

    Per layer, the candidates on the upper concave hull of (cost, saving) from exact (0, 0): each upgrade moves a
    layer to a candidate that saves more, at the best extra saving per extra cost. All layers' upgrades are merged
    by that ratio (it falls along each layer's hull, so a layer's upgrades stay in order). With one candidate per
    layer this is :func:`prefix_order`; with several (e.g. local windows 1024 and 512) a layer can first take the
    accurate one and later trade up to the faster one, which a one-cell-per-layer order cannot."""
    steps: list[tuple[float, int, int, Cell]] = []
    for layer in sorted({c.layer for c in cells}):
        points = [c for c in cells if c.layer == layer and c.served and c.saving > 0 and c.cost is not None]
        cost, saving, index = 0.0, 0.0, 0
        while True:
            better = [c for c in points if c.saving > saving]
            if not better:
                break
            ratio = lambda c: math.inf if c.cost <= cost else (c.saving - saving) / (c.cost - cost)  # noqa: E731
            pick = max(better, key=lambda c: (ratio(c), c.saving, c.key))
            steps.append((ratio(pick), index, layer, pick))
            cost, saving, index = max(cost, pick.cost), pick.saving, index + 1
    steps.sort(key=lambda t: (-t[0], t[1], t[2]))
    plans, current = [[]], {}
    for _, _, layer, cell in steps:
        current[layer] = cell
        plans.append(sorted(current.values(), key=lambda c: c.layer))
    return plans


def greedy_plan(cells: Sequence[Cell], budget: float, measure_change: Callable[[list[Cell]], float],
                costs_in_budget_units: bool = True, known: Optional[dict[int, float]] = None,
                plans: Optional[list[list[Cell]]] = None) -> tuple[list[Cell], list[dict[str, Any]]]:
    """The chosen cells (at most one per layer) and the measured steps [{layers, change, holds}].

    ``measure_change(cells) -> perplexity change`` of the combined plan on the calibration text (measured, never
    summed). ``costs_in_budget_units`` (metric loss): start from the longest prefix of :func:`greedy_order` (one
    cell per layer, the first of each layer that fits) whose costs sum within the budget, then drop the last
    (worst-ratio) cell while the measured change exceeds the budget. Otherwise (output error): the prefixes of
    :func:`prefix_order`, searched for the longest one that holds the budget (the change is taken to grow with the
    prefix length): the whole order first, then a bracket [holds, fails] shrunk by linear interpolation of the
    measured changes (regula falsi, the probe kept a quarter of the bracket away from its ends) until it is one
    layer wide: on 30 layers ~4.4 combined measurements on average, at most 8 (bisection: 6). ``known``: prefix length -> change already measured (e.g. for another budget, from the cache), used to
    bracket without measuring again. ``plans`` (output error only): search these nested plans (plans[k], k = 0..n,
    e.g. :func:`upgrade_plans`) instead of the prefixes of :func:`prefix_order`."""
    steps: list[dict[str, Any]] = []

    def holds(prefix: list[Cell]) -> bool:
        if not prefix:
            return True
        change = measure_change(prefix)
        ok = change <= budget
        steps.append({"layers": [[c.layer, c.key] for c in prefix], "change": change, "holds": ok})
        return ok

    if costs_in_budget_units:
        order, taken, total = [], set(), 0.0
        for cell in greedy_order(cells):
            if cell.layer in taken or total + max(cell.cost, 0.0) > budget:
                continue
            order.append(cell)
            taken.add(cell.layer)
            total += max(cell.cost, 0.0)
        while order and not holds(order):
            order = order[:-1]  # back off: drop the worst-ratio layer, measure again
        return order, steps
    order = prefix_order(cells)
    plans = plans if plans is not None else [order[:k] for k in range(len(order) + 1)]
    n = len(plans) - 1
    points = {0: 0.0}
    points.update({k: c for k, c in (known or {}).items() if 0 <= k <= n})  # known[0]: a non-empty base plan

    def probe(k: int) -> None:
        holds(plans[k])
        points[k] = steps[-1]["change"]

    if n and n not in points:
        probe(n)
    while True:
        failing = [k for k, c in points.items() if c > budget]
        if not failing:
            return plans[n], steps
        high = min(failing)
        low = max(k for k, c in points.items() if k < high and c <= budget)
        if high - low <= 1:
            key = [[c.layer, c.key] for c in plans[low]]
            if low and not any(s["holds"] and s["layers"] == key for s in steps):
                holds(plans[low])  # known from the cache: record the step the plan rests on
            return plans[low], steps
        c_low, c_high = points[low], points[high]
        guess = low + (budget - c_low) * (high - low) / max(c_high - c_low, 1e-12)
        quarter = (high - low) / 4  # kept a quarter away from both ends: the bracket shrinks by >= 1/4 per probe
        probe(min(max(round(min(max(guess, low + quarter), high - quarter)), low + 1), high - 1))


# ---------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------

class CalibratedPlan(PatchPlan):
    """A :class:`PatchPlan` found by :func:`calibrate`; ``plan.calibration`` holds how (budget, data fingerprint,
    measured cells, back-off steps, held-out check). It saves and loads like any plan."""

    def report(self) -> str:
        return calibration_report(self)


def _change(nll: float, base_nll: float, tokens: int) -> float:
    return math.exp((nll - base_nll) / tokens) - 1.0


def calibration_report(plan: PatchPlan) -> str:
    """The calibration of ``plan`` in words: budget, measured changes, per layer the choice, its cost and saving."""
    info = plan.calibration
    if not info:
        return f"{plan}\n(no calibration record: this plan was not made by calibrate)"
    pct = lambda x: "-" if x is None else f"{100 * x:+.2f}%"  # noqa: E731
    lines = [f"Calibrated plan: budget {100 * info['budget']:.2f}% perplexity, metric {info['metric']}, "
             f"{len(plan.patched_layers)}/{len(plan.layers)} layers patched",
             f"calibration text: {info['texts']} text(s), {info['tokens']} predicted tokens, sha256 "
             f"{info['data_sha256'][:16]}; exact perplexity {info['exact_perplexity']:.4g}",
             f"combined change on the calibration text (measured): {pct(info.get('calibration_change'))} "
             f"(budget {pct(info['budget'])})"]
    if info.get("why_exact"):
        lines.append(f"no layer patched: {info['why_exact']}")
    if info.get("stopped"):
        lines.append(f"time budget: {info['stopped']}; the plan is the best one measured before that")
    if info.get("estimate_s") is not None and "elapsed_s" in info:
        lines.append(f"run time: estimated ~{_duration(info['estimate_s'])}, took {_duration(info['elapsed_s'])}"
                     + (f" (max_minutes {info['max_minutes']:g})" if info.get("max_minutes") else ""))
    if info.get("skipped_cells"):
        lines.append("refinement: skipped (broke the budget on its own when added): "
                     + ", ".join(f"layer {layer} {key}" for layer, key in info["skipped_cells"]))
    lines += retrieval_lines(info.get("retrieval"), info.get("retrieval_budget"))
    held = info.get("heldout")
    if held:
        lines.append(f"held-out text ({held['texts']} text(s), {held['tokens']} tokens, sha256 {held['data_sha256'][:16]}): "
                     f"perplexity {held['exact_perplexity']:.4g} -> {held['plan_perplexity']:.4g}, change "
                     f"{pct(held['change'])} (budget {pct(info['budget'])}); prefill {held['exact_prefill_s']:.2f}s -> "
                     f"{held['plan_prefill_s']:.2f}s ({held['speedup']:.2f}x)")
    else:
        lines.append("held-out text: not given (pass heldout_ids= to check the plan on other text)")
    proxy = info.get("proxy_spearman") or {}
    if proxy.get("rho") is not None:
        lines.append(f"proxy: output error vs loss change over {proxy['n']} cells, Spearman rho {proxy['rho']:+.2f} "
                     f"(p={proxy['p_value']:.2g})")
    else:
        lines.append(f"proxy: output error vs loss change not ranked ({proxy.get('n', 0)} cells with both; "
                     "metric='loss' measures both)")
    saved, exact_total = info.get("attention_saving_s", 0.0), info.get("exact_attention_s", 0.0)
    if exact_total:
        lines.append(f"attention time of the first calibration text: exact {exact_total:.3f}s, saved by the plan "
                     f"{saved:.3f}s (sum of single-layer savings)")
    lines.append(f"{'layer':>5}  {'choice':<60} {'cost':>9} {'error':>7} {'attn ms':>15} {'speed':>6}  cells served")
    unsearched = [row["layer"] for row in info.get("layers", []) if not row.get("cells")]
    if unsearched:
        lines.append(f"{'':>5}  layers not searched (not in layers=): {unsearched}")
    for row in info.get("layers", []):
        if not row.get("cells"):
            continue
        choice = row.get("choice") or "exact"
        cost = row.get("cost")
        cost_text = "-" if cost is None else (pct(cost) if info["metric"] == "loss" else f"{cost:.3f}")
        err = "-" if row.get("error") is None else f"{row['error']:.3f}"
        ms = "-" if row.get("method_s") is None else f"{1e3 * row['exact_s']:.1f}->{1e3 * row['method_s']:.1f}"
        speed = "-" if row.get("method_s") is None else f"{row['exact_s'] / max(row['method_s'], 1e-12):.2f}x"
        lines.append(f"{row['layer']:>5}  {choice:<60} {cost_text:>9} {err:>7} {ms:>15} {speed:>6}  "
                     f"{row.get('served_cells', 0)}/{row.get('cells', 0)}")
    for step in info.get("steps", []):
        lines.append(f"  step: {len(step['layers'])} layer(s) {sorted(l for l, _ in step['layers'])} -> "
                     f"{pct(step['change'])} {'holds' if step['holds'] else 'over budget: back off'}")
    return "\n".join(lines)


def retrieval_lines(retrieval: Optional[dict], budget: Optional[float]) -> list[str]:
    """The retrieval check in words: the exact model's probe score per sample, then every plan probed."""
    if not retrieval:
        return ["retrieval probe: off" + (" (retrieval_budget=None)" if budget is None else "")]
    if retrieval.get("skipped"):
        return [f"retrieval probe: SKIPPED: {retrieval['skipped']}"]
    if retrieval.get("exact_score") is None:
        return [f"retrieval probe: {retrieval.get('note', 'not run')}"]
    note = [f"  note: {retrieval['note']}"] if retrieval.get("note") else []
    samples = ", ".join(f"{s['sample']} {s['score']:.0f}" for s in retrieval.get("exact_samples", []))
    lines = [f"retrieval probe ({retrieval['samples']} samples, budget {retrieval['budget']:g} points): exact model "
             f"{retrieval['exact_score']:.1f} ({samples}); samples the exact model misses are not probed"]
    for p in retrieval.get("plans", []):
        lines.append(f"  probe: plan of {p['layers']} layer(s) -> score {p['score']:.1f}, lost {p['lost']:.1f} "
                     f"points ({p['samples_probed']} sample(s) probed) "
                     f"{'passes' if p['passes'] else 'fails: fall back to a smaller plan'}"
                     + (f" (perplexity change {100 * p['change']:+.2f}%)" if p.get("change") is not None else ""))
    return lines + note


class _Cache:
    """The JSONL cache: key -> latest record, appended crash-safe (eval.bench.append_jsonl)."""

    def __init__(self, path: Optional[Union[str, os.PathLike]]):

        self.path = None if path is None else os.fspath(path)
        self.records: dict[str, dict] = {}
        if self.path is not None:
            for record in read_jsonl(self.path):
                if "key" in record:
                    self.records[record["key"]] = record

    def get(self, key: str) -> Optional[dict]:
        return self.records.get(key)

    def put(self, key: str, record: dict) -> dict:

        record = dict(record, key=key, run_id=RUN_ID)
        self.records[key] = record
        if self.path is not None:
            append_jsonl(self.path, record)
        return record


def _skeleton_plan(model: torch.nn.Module, adapter: Any, seed: int) -> CalibratedPlan:

    ranking = rank_layers(model, adapter=adapter)
    rank_of = {layer: r for r, layer in enumerate(ranking.order)}
    layers = [LayerPlan(layer_idx=i, weight_norm=ranking.weight_norms[i], rank=rank_of[i], method=None, params={},
                        head_weight_norms=ranking.head_weight_norms[i]) for i in range(len(ranking))]
    return CalibratedPlan(method=None, select="calibrated", layers=layers, seed=seed, norm=ranking.norm,
                          model_fingerprint=model_fingerprint(model, adapter), model_class=type(model).__name__,
                          adapter=adapter.name, versions=library_versions(), created=now_iso())


def _with_cells(skeleton: PatchPlan, cells: Sequence[Cell]) -> PatchPlan:
    plan = PatchPlan.from_dict(skeleton.to_dict())
    for cell in cells:
        layer = plan.layer(cell.layer)
        layer.method, layer.params = cell.method, dict(cell.params)
        layer.decode_method = "exact"  # patch_model's default for the layers it patches
    return plan


def _assignment_key(cells: Sequence[Cell]) -> str:
    return json.dumps(sorted([c.layer, c.key] for c in cells))


# ---------------------------------------------------------------------------------------------------------
# Run-time estimate, the time budget, the retrieval probe
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Estimate:
    """What a calibration will measure and about how long each part takes: steps [(what, seconds)]."""

    steps: list[tuple[str, float]]

    @property
    def total_s(self) -> float:
        return sum(s for _, s in self.steps)

    def text(self) -> str:
        parts = "; ".join(f"{what} ~{_duration(s)}" for what, s in self.steps if s > 0)
        return f"calibrate: estimated run time ~{_duration(self.total_s)} ({parts}; cache hits make it shorter)"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def typical_search_forwards(plans: int) -> float:
    """Combined measurements of the output-error prefix search over ``plans`` nested plans: the whole order, then
    the interpolated bracket (on 30 layers ~4.4 on average, measured on random monotone curves)."""
    return 0.0 if plans <= 0 else 1.0 + 0.7 * math.log2(plans + 1)


def estimate_run(*, forward_s: float, attention_s: float, texts: int, layers: int, candidates: int, timed_layers: int,
                 repeats: int, metric: str, refine: int = 0, heldout_texts: int = 0, probe_samples: int = 0,
                 generate_s: float = 0.0) -> Estimate:
    """The run-time estimate printed before a calibration starts (pure: the numbers are given).

    forward_s: one exact forward (with the loss) of one calibration text; attention_s: one layer's attention call
    on it; generate_s: one probe sample's ``generate``. Counts: the capture forwards (one per text); per layer and
    text one call per candidate plus the exact one for the errors, and ``repeats`` timed rounds on the timed layers;
    metric "loss": one forward per cell; the combined plans of the search (:func:`typical_search_forwards`), each
    refinement round about as many again on the rest; the retrieval probe: the exact model once and about one plan
    (a plan that fails stops at its first lost sample; a fallback adds a few); the held-out check: exact + plan."""
    calls = candidates + 1
    steps = [("capture forwards", texts * forward_s),
             (f"output error of {layers} layers x {candidates} candidates, timed on {timed_layers} layers",
              (texts * layers * calls + timed_layers * repeats * calls) * attention_s)]
    if metric == "loss":
        steps.append((f"single-layer losses (up to {layers * candidates} forwards)", layers * candidates * texts * forward_s))
    searched = layers if metric == "loss" else typical_search_forwards(layers)
    steps.append(("combined plans", (1.0 if metric == "loss" else searched) * texts * forward_s))
    if refine:
        steps.append((f"{refine} refinement round(s)", refine * typical_search_forwards(max(layers // 2, 1)) * texts
                      * forward_s))
    if probe_samples:
        steps.append((f"retrieval probe ({probe_samples} samples: exact model + plan)", 2 * probe_samples * generate_s))
    if heldout_texts:
        steps.append(("held-out check", 2 * heldout_texts * forward_s))
    return Estimate(steps)


class OutOfTime(Exception):
    """The next measurement would end past ``max_minutes``."""


class _Clock:
    def __init__(self, max_minutes: Optional[float]):
        self.start = time.perf_counter()
        self.limit = None if max_minutes is None else 60.0 * max_minutes
        self.stopped: Optional[str] = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def check(self, seconds: float, what: str) -> None:
        """Raise :class:`OutOfTime` when ``what`` (about ``seconds``) would end past the budget."""
        if self.limit is not None and self.elapsed() + seconds > self.limit:
            self.stopped = (f"max_minutes={self.limit / 60:g} reached after {_duration(self.elapsed())}: {what} "
                            f"(~{_duration(seconds)}) was not started")
            raise OutOfTime(self.stopped)


def check_max_minutes(max_minutes: Any) -> Optional[float]:
    if max_minutes is None:
        return None
    if isinstance(max_minutes, bool) or not isinstance(max_minutes, (int, float)) or not max_minutes > 0 \
            or not math.isfinite(max_minutes):
        raise ValueError(f"max_minutes must be a positive number of minutes (or None: no limit); got {max_minutes!r}")
    return float(max_minutes)


# The probe set: pass key at three depths and one needle-in-a-haystack task, interleaved so that a small
# probe_samples still mixes the tasks (RULER's generators: hf_sparse_attn.eval.ruler; depths in percent).
PROBE_SPECS: tuple[tuple[str, float], ...] = (("passkey", 50.0), ("niah_single_1", 50.0), ("passkey", 10.0),
                                              ("passkey", 90.0), ("niah_single_1", 10.0), ("niah_single_1", 90.0))
DEFAULT_PROBE_SAMPLES = 4
DEFAULT_RETRIEVAL_BUDGET = 5.0


class ProbeTooShort(ValueError):
    """The probe length cannot hold a probe sample."""


class RulerProbe:
    """The retrieval probe: ``probe(model, i) -> score`` (0-100) of sample ``i``, a greedy ``generate`` on a RULER
    pass-key / needle sample of ``length`` tokens (``hf_sparse_attn.eval.ruler``, imported on first use).

    The prompt is plain text by default (``chat_template=False``): the probe must find samples the exact model
    answers, and SmolLM2-135M-Instruct at 4k misses the pass key inside its chat template ("a special type of pass
    that is used in the Passkey game") while the plain prompt gives it (76006).

    Any object with ``__len__``, ``__call__(model, index) -> float`` (points, 0-100), optionally ``fingerprint``
    (str: which samples; cache records are keyed by it), ``describe(index) -> str`` and ``max_new_tokens`` can
    stand in (``calibrate(..., probe=...)``)."""

    def __init__(self, tokenizer: Any, length: int, samples: int = DEFAULT_PROBE_SAMPLES, seed: int = 0,
                 chat_template: bool = False):
        if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= len(PROBE_SPECS):
            raise ValueError(f"probe_samples must be an int between 1 and {len(PROBE_SPECS)}; got {samples!r}")
        try:
            from . import ruler
        except ImportError as err:
            raise ImportError(f"the retrieval probe needs hf_sparse_attn.eval.ruler ({err}); install the ruler extra "
                              "(pip install 'hf-sparse-attn[ruler]') or pass retrieval_budget=None") from err
        self.ruler, self.tokenizer, self.chat_template = ruler, tokenizer, chat_template
        self.samples = []
        for i, (task, depth) in enumerate(PROBE_SPECS[:samples]):
            try:
                self.samples.append(ruler.generate_sample(task, tokenizer, length, seed=seed, index=i, depth=depth,
                                                          chat_template=chat_template))
            except ruler.LengthTooShortError as err:
                raise ProbeTooShort(f"the retrieval probe cannot be built at {length} tokens: {task} needs at least "
                                    f"{err.minimum}") from err
        digest = hashlib.sha256()
        for s in self.samples:
            digest.update(json.dumps([s.task, s.prompt, list(s.answers), s.max_new_tokens]).encode())
        self.fingerprint = f"ruler:{length}:{seed}:{int(chat_template)}:{digest.hexdigest()[:16]}"
        self.max_new_tokens = max(s.max_new_tokens for s in self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, index: int) -> str:
        s = self.samples[index]
        return f"{s.task} at {s.depth:g}%" if s.depth is not None else s.task

    def __call__(self, model: torch.nn.Module, index: int) -> float:
        s = self.samples[index]
        prediction = self.ruler.predict(model, self.tokenizer, s, chat_template=self.chat_template)
        return float(self.ruler.score(s.task, [prediction], [list(s.answers)]))


def retrieval_fallback(ladder: Sequence[list[Cell]], passes: Callable[[list[Cell]], bool]) -> tuple[int, bool]:
    """The longest plan of ``ladder`` (nested plans, ladder[0] = all exact) that ``passes`` (the retrieval probe
    and the measured loss), searched as: the last plan first, then bisection (retrieval is taken to fall with the
    plan's size); the plan returned was checked by ``passes`` (or is all exact). Returns (index, whether the last
    plan passed)."""
    last = len(ladder) - 1
    if last <= 0 or passes(ladder[last]):
        return last, True
    low, high = 0, last  # ladder[low] passes (all exact), ladder[high] fails
    while high - low > 1:
        mid = (low + high) // 2
        if passes(ladder[mid]):
            low = mid
        else:
            high = mid
    return low, False


def why_no_layer(cells: Sequence[Cell], budget: float, steps: Sequence[dict], tokens_per_text: Sequence[int],
                 retrieval: Optional[dict], stopped: Optional[str]) -> str:
    """Why a calibration returned the all-exact plan, and what to change."""
    if budget == 0:
        return "budget 0: no approximation is free of cost, so no layer is measured or patched; give a budget > 0"
    if stopped:
        return f"stopped by the time budget before an approximate plan was measured ({stopped}): raise max_minutes " \
               "(--max-minutes) or cut the work (fewer candidates, layers or probe samples)"
    shortest = min(tokens_per_text) if tokens_per_text else 0
    if cells and not any(c.served for c in cells):
        limits = []
        for key in dict.fromkeys(c.key for c in cells):
            cell = next(c for c in cells if c.key == key)
            thresholds = {k: v for k, v in cell.params.items() if "min_seq_len" in k and v}
            limits.append(f"{candidate_label(cell.method, cell.params)}"
                          + (f" ({', '.join(f'{k} {v}' for k, v in thresholds.items())})" if thresholds else ""))
        return (f"no candidate served a call of {shortest} tokens: each would fall back to exact attention at this "
                f"length. Candidates: {'; '.join(limits)}. Calibrate on texts as long as those you will run (--tokens; "
                "the methods pay from a few thousand tokens), or pass --candidates / candidates= with smaller "
                "min_seq_len / causal_min_seq_len")
    served = [c for c in cells if c.served]
    if served and not any(c.saving > 0 for c in served):
        best = max(served, key=lambda c: (c.exact_s or 0) / max(c.method_s or math.inf, 1e-12))
        speed = (best.exact_s or 0) / max(best.method_s or math.inf, 1e-12)
        return (f"no served candidate was faster than exact attention at {shortest} tokens on this machine (best: "
                f"{candidate_label(best.method, best.params)}, {speed:.2f}x): calibrate at the length you will run "
                "(the methods pay at longer texts), or try faster candidates (--candidates)")
    if retrieval and retrieval.get("plans") and not any(p["lost"] <= retrieval["budget"] + 1e-9
                                                        for p in retrieval["plans"]):
        worst = retrieval["plans"][0]
        return (f"every plan probed lost more than retrieval_budget={retrieval['budget']:g} points on the retrieval "
                f"probe (the plan of {worst['layers']} layers scored {worst['score']:.1f} against the exact model's "
                f"{retrieval['exact_score']:.1f}): raise --retrieval-budget, or pass retrieval_budget=None "
                "(--retrieval-budget none) to skip the check")
    failed = [s for s in steps if not s["holds"]]
    if failed:
        smallest = min(failed, key=lambda s: len(s["layers"]))
        return (f"the smallest plan measured ({len(smallest['layers'])} layer(s)) changed perplexity by "
                f"{100 * smallest['change']:+.2f}%, over the budget {100 * budget:+.2f}%: raise the budget, or try "
                "more accurate candidates (e.g. local with a wider window)")
    return "no cell both served and saved time within the budget"


def _attention_call_s(model: torch.nn.Module, tokens: int, fallback: float) -> float:
    """Seconds of one exact attention call of the model's shape at ``tokens`` (timed once on random q/k/v; for
    the estimate only)."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads and hidden else None)
    if not heads or not head_dim or tokens < 2:
        return fallback
    q = torch.randn(1, heads, tokens, head_dim)
    start = time.perf_counter()
    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    return time.perf_counter() - start


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    calibration_ids: Any,
    budget: float = 0.03,
    methods: Optional[Sequence[str]] = None,
    metric: str = "output_error",
    *,
    heldout_ids: Any = None,
    candidates: CandidatesArg = None,
    layers: Optional[Sequence[int]] = None,
    cache: Optional[Union[str, os.PathLike]] = None,
    seed: int = 0,
    repeats: int = 1,
    progress: bool = True,
    search: str = "prefix",
    timed_layers: Optional[int] = 4,
    refine: int = 1,
    max_minutes: Optional[float] = None,
    tokenizer: Any = None,
    retrieval_budget: Optional[float] = DEFAULT_RETRIEVAL_BUDGET,
    probe_length: Optional[int] = None,
    probe_samples: int = DEFAULT_PROBE_SAMPLES,
    probe: Any = None,
) -> CalibratedPlan:
    """The plan with the most attention time saved whose measured perplexity change on ``calibration_ids`` stays
    within ``budget`` and that loses at most ``retrieval_budget`` points on a pass-key / needle probe set.

    calibration_ids / heldout_ids: token ids [B, N] or [N], or a list of them (texts of any length; each row is one
    text, scored at batch 1). budget: the allowed perplexity increase as a fraction (0.03 = +3%); 0 gives an
    all-exact plan without measuring (no approximation is free of cost). methods: candidate method names (default:
    the methods named in ``candidates``, else hyper, sparse_hyper, local); their parameter settings come from
    ``candidates[method]`` (a list of parameter dicts) or ``DEFAULT_CANDIDATES``.
    metric: "output_error" (default: cells ranked by the relative error of their attention output, the cheap proxy;
    the loss is measured only on combined plans, where the choice is close) or "loss" (every cell measured by its
    single-layer perplexity change: one forward per cell, slow). search (output error): "prefix" (the best cell of
    each layer, prefixes searched; ``refine`` rounds then skip a cell whose addition broke the budget alone and
    search the rest) or "upgrades" (:func:`upgrade_plans`). layers: the layers eligible (default all).
    timed_layers: time each candidate on this many layers spread over the eligible ones (every layer has the same
    shapes) and use the medians for the others (None: time every layer). repeats: timing rounds per timed layer.
    cache: a JSONL file of measured cells; a calibration that was killed resumes from it. max_minutes: a time
    budget: the estimate is printed first (``progress``); a calibration that cannot fit its mandatory steps is an
    error, and a search that runs out of time returns the best plan measured so far (the report says so).
    Retrieval: ``retrieval_budget`` (points of score, 0-100; None turns the check off) on ``probe_samples``
    RULER samples of ``probe_length`` tokens (default: the calibration length) generated with ``tokenizer``
    (required while the check is on); ``probe`` replaces the RULER probe (see :class:`RulerProbe`).
    The model must be unpatched; it is unpatched again on return. Returns a :class:`CalibratedPlan`.
    """

    budget = check_budget(budget)
    max_minutes = check_max_minutes(max_minutes)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")
    if search not in SEARCHES or (search == "upgrades" and metric != "output_error"):
        raise ValueError(f"search must be one of {SEARCHES} ('upgrades' with metric='output_error' only); got "
                         f"{search!r} with metric {metric!r}")
    if methods is None:
        methods = list(candidates) if isinstance(candidates, dict) and candidates else list(DEFAULT_METHODS)
    resolved = resolve_candidates(methods, candidates)
    texts = _as_texts(calibration_ids, "calibration_ids")
    heldout = None if heldout_ids is None else _as_texts(heldout_ids, "heldout_ids")
    for name, value, low in (("repeats", repeats, 1), ("refine", refine, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}; got {value!r}")
    if timed_layers is not None and (isinstance(timed_layers, bool) or not isinstance(timed_layers, int)
                                     or timed_layers < 1):
        raise ValueError(f"timed_layers must be an int >= 1 or None (time every layer); got {timed_layers!r}")
    if retrieval_budget is not None:
        if isinstance(retrieval_budget, bool) or not isinstance(retrieval_budget, (int, float)) \
                or not 0 <= retrieval_budget <= 100:
            raise ValueError(f"retrieval_budget must be points of score in [0, 100] (e.g. 5.0), or None to turn the "
                             f"retrieval check off; got {retrieval_budget!r}")
        if probe is None and tokenizer is None:
            raise ValueError("calibrate checks retrieval (retrieval_budget=%g points on a pass-key / needle probe "
                             "set) and needs the tokenizer to build the probe: pass tokenizer=..., or "
                             "retrieval_budget=None to skip the check" % retrieval_budget)
    if current_plan(model) is not None:
        raise ValueError("the model is patched: calibrate measures against the exact model. Call "
                         "hf_sparse_attn.unpatch_model(model) first")
    adapter = find_adapter(model)
    skeleton = _skeleton_plan(model, adapter, seed)
    num_layers = len(skeleton.layers)
    eligible = list(range(num_layers)) if layers is None else sorted(set(int(i) for i in layers))
    bad = [i for i in eligible if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the model has layers 0..{num_layers - 1}")
    data_sha = data_fingerprint(texts)
    model_sha = skeleton.model_fingerprint["qk_sha256"][:16]
    store = _Cache(cache)
    clock = _Clock(max_minutes)
    bar = _progress(progress)
    say = (lambda text: bar.write(text, file=sys.stderr)) if progress else (lambda text: None)  # under the bar

    def key_of(*parts: Any) -> str:
        return "|".join([model_sha, str(seed)] + [str(p) for p in parts])

    def nll_of(cells: Sequence[Cell], which: list[torch.Tensor], sha: str, kind: str) -> dict:
        key = key_of(kind, sha, _assignment_key(cells))
        record = store.get(key)
        if record is None:
            if cells:
                patch_model(model, plan=_with_cells(skeleton, cells))
            try:
                record = store.put(key, measure_nll(model, which))
            finally:
                if cells:
                    unpatch_model(model)
        return record

    info: dict[str, Any] = {"budget": budget, "metric": metric, "search": search, "data_sha256": data_sha,
                            "texts": len(texts), "text_tokens": [int(t.shape[1]) for t in texts],
                            "candidates": [[m, p] for m, p in resolved], "eligible_layers": eligible, "seed": seed,
                            "max_minutes": max_minutes, "retrieval_budget": None if budget == 0 else retrieval_budget}
    base = nll_of([], texts, data_sha, "nll")
    info.update(tokens=base["tokens"], exact_perplexity=math.exp(base["nll"] / base["tokens"]))
    forward_s = 1.15 * base["prefill_s"] / len(texts)  # + the loss head, not in the prefill timing

    probe_set, probe_fp, generate_s = None, None, 0.0
    if budget > 0 and retrieval_budget is not None:
        length = probe_length or max(int(t.shape[1]) for t in texts)
        try:
            probe_set = probe if probe is not None else RulerProbe(tokenizer, length, probe_samples, seed=seed)
        except ProbeTooShort as err:
            if probe_length is not None:
                raise ValueError(f"{err}: give a longer probe_length (--probe-length), or retrieval_budget=None") \
                    from None
            info["retrieval_skipped"] = (f"{err} (the calibration length): the retrieval check is skipped; give "
                                         "probe_length= (--probe-length) to probe at another length")
            say(f"calibrate: {info['retrieval_skipped']}")
    if probe_set is not None:
        probe_fp = getattr(probe_set, "fingerprint", "custom")
        per_token = forward_s / max(int(texts[0].shape[1]), 1)
        # a prefill of the probe's length (attention grows faster than linearly) + decode steps (~8 tokens' worth)
        generate_s = forward_s * (length / texts[0].shape[1]) ** 1.2 \
            + getattr(probe_set, "max_new_tokens", 16) * 8 * per_token
    estimate = Estimate([])
    if budget > 0:
        n_timed = len(spread(eligible, timed_layers))
        estimate = estimate_run(
            forward_s=forward_s, attention_s=_attention_call_s(model, int(texts[0].shape[1]),
                                                               forward_s / num_layers / 4),
            texts=len(texts), layers=len(eligible), candidates=len(resolved), timed_layers=n_timed, repeats=repeats,
            metric=metric, refine=refine if metric == "output_error" and search == "prefix" else 0,
            heldout_texts=0 if heldout is None else len(heldout),
            probe_samples=0 if probe_set is None else len(probe_set), generate_s=generate_s)
    info["estimate_s"] = round(estimate.total_s, 3)  # ms: a tiny model's estimate is under 0.1 s
    info["estimate"] = [[what, round(s, 1)] for what, s in estimate.steps]
    if budget > 0:
        say(estimate.text() + (f"; max_minutes {max_minutes:g}" if max_minutes else ""))
        mandatory = sum(s for what, s in estimate.steps if not what.startswith(("single-layer", "combined",
                                                                                "held-out", "refinement")))
        if max_minutes is not None and clock.elapsed() + mandatory + len(texts) * forward_s > 60 * max_minutes:
            raise ValueError(f"calibrate needs about {_duration(mandatory + len(texts) * forward_s)} before it can "
                             f"return an approximate plan ({estimate.text()}), more than max_minutes={max_minutes:g}: "
                             "raise max_minutes, or cut the work: fewer candidates (candidates= / --candidates), "
                             "fewer layers (layers=), fewer or shorter texts, fewer probe samples (probe_samples=)")

    cells: list[Cell] = []
    measured: list[tuple[list[Cell], float]] = []  # every combined plan measured: (cells, change)
    if budget > 0:
        cells = _measure_cells(model, texts, data_sha, eligible, resolved, seed, repeats, store, key_of, bar,
                               capture_attention, timed_layers)
        if metric == "loss":
            todo = [c for c in cells if c.served and c.saving > 0]
            bar.reset(total=len(todo))
            bar.set_description("calibrate: loss of single layers")
            try:
                for cell in todo:
                    if store.get(key_of("nll", data_sha, _assignment_key([cell]))) is None:
                        clock.check(len(texts) * forward_s, "a single-layer loss")
                    c_nll = nll_of([cell], texts, data_sha, "nll")
                    cell.loss_change = _change(c_nll["nll"], base["nll"], base["tokens"])
                    bar.update(1)
            except OutOfTime:
                pass
        else:  # reuse any single-layer losses of an earlier metric="loss" run on the same data (for the proxy rank)
            for cell in cells:
                record = store.get(key_of("nll", data_sha, _assignment_key([cell])))
                if record is not None:
                    cell.loss_change = _change(record["nll"], base["nll"], base["tokens"])
        for cell in cells:
            cell.cost = cell.loss_change if metric == "loss" else cell.error

    def change_of(chosen: list[Cell]) -> float:
        bar.set_description(f"calibrate: combined plan of {len(chosen)} layers")
        if chosen and store.get(key_of("nll", data_sha, _assignment_key(chosen))) is None:
            clock.check(len(texts) * forward_s, f"the combined plan of {len(chosen)} layers")
        record = nll_of(chosen, texts, data_sha, "nll")
        change = _change(record["nll"], base["nll"], base["tokens"])
        measured.append((list(chosen), change))
        return change

    def lookup(plan_cells: Sequence[Cell]) -> Optional[float]:
        """The measured change of a combined plan (cache), None when not measured."""
        if not plan_cells:
            return 0.0
        record = store.get(key_of("nll", data_sha, _assignment_key(plan_cells)))
        return None if record is None else _change(record["nll"], base["nll"], base["tokens"])

    def known_of(plans: Sequence[list[Cell]]) -> dict[int, float]:
        known = {}
        for k in range(1, len(plans)):
            record = store.get(key_of("nll", data_sha, _assignment_key(plans[k])))
            if record is not None:
                known[k] = _change(record["nll"], base["nll"], base["tokens"])
        return known

    chosen: list[Cell] = []
    steps: list[dict[str, Any]] = []
    ladder: list[list[Cell]] = [[]]  # nested plans ending with the chosen one: the retrieval check's fallbacks
    skipped: list[Cell] = []
    if budget > 0:
        try:
            if metric == "loss":
                chosen, steps = greedy_plan(cells, budget, change_of)
                ladder = [chosen[:k] for k in range(len(chosen) + 1)]
            elif search == "upgrades":
                plans = upgrade_plans(cells)
                chosen, steps = greedy_plan(cells, budget, change_of, costs_in_budget_units=False,
                                            known=known_of(plans), plans=plans)
                ladder = plans[:next(k for k, p in enumerate(plans) if p == chosen) + 1]
            else:
                chosen, steps, skipped = prefix_search(cells, budget, change_of, lookup, refine)
                ladder = [chosen[:k] for k in range(len(chosen) + 1)]
        except OutOfTime:
            holding = [(cs, ch) for cs, ch in measured if ch <= budget and cs]
            chosen = max(holding, key=lambda t: (sum(c.saving for c in t[0]), -t[1]))[0] if holding else []
            ladder = [chosen[:k] for k in range(len(chosen) + 1)]
            steps = steps or [{"layers": [[c.layer, c.key] for c in cs], "change": ch, "holds": ch <= budget}
                              for cs, ch in measured if cs]
            say(f"calibrate: {clock.stopped}; returning the best plan measured so far")
    info["skipped_cells"] = [[c.layer, c.key] for c in skipped]

    retrieval = None
    if probe_set is not None:
        retrieval = {"budget": float(retrieval_budget), "fingerprint": probe_fp, "samples": len(probe_set),
                     "plans": []}
    if probe_set is None and info.get("retrieval_skipped"):
        retrieval = {"budget": float(retrieval_budget), "skipped": info.pop("retrieval_skipped"), "plans": []}
    elif retrieval is not None and not chosen:
        retrieval["note"] = "not run: no approximate plan to check"
    elif retrieval is not None:
        try:
            exact_scores = _probe_scores(model, skeleton, [], probe_set, probe_fp, store, key_of, clock,
                                         forward_s=generate_s)
        except OutOfTime:
            exact_scores = None
        if exact_scores is None:
            chosen = []
            retrieval["note"] = "the exact model was not probed before max_minutes: the plan is all exact"
        else:
            retrieval["exact_score"] = sum(exact_scores) / len(exact_scores)
            retrieval["exact_samples"] = [{"sample": _probe_label(probe_set, i), "score": s}
                                          for i, s in enumerate(exact_scores)]
            if not any(exact_scores):
                retrieval["note"] = ("the exact model scores 0 on every probe sample: the probe cannot tell plans "
                                     "apart at this length (a weak retriever); the plan is not held back by it")

            def passes(plan_cells: list[Cell]) -> bool:
                scores = _probe_scores(model, skeleton, plan_cells, probe_set, probe_fp, store, key_of, clock,
                                       forward_s=generate_s, exact=exact_scores,
                                       allowed=float(retrieval_budget))
                lost = sum(max(e - s, 0.0) if s is not None else e for e, s in zip(exact_scores, scores)) / len(scores)
                ok = lost <= retrieval_budget + 1e-9
                known_scores = [s if s is not None else 0.0 for s in scores]
                retrieval["plans"].append({"layers": len(plan_cells), "cells": [[c.layer, c.key] for c in plan_cells],
                                           "score": sum(min(s, e) for s, e in zip(known_scores, exact_scores))
                                           / len(scores), "lost": lost, "passes": ok,
                                           "samples_probed": sum(s is not None for s in scores)})
                if ok and plan_cells:  # a smaller fallback plan is measured too (a cache hit for the plans searched)
                    retrieval["plans"][-1]["change"] = change = change_of(plan_cells)
                    ok = retrieval["plans"][-1]["passes"] = change <= budget
                return ok

            try:
                index, _ = retrieval_fallback(ladder, passes)
                chosen = ladder[index]
            except OutOfTime:
                good = [p for p in retrieval["plans"] if p["passes"]]
                best = max(good, key=lambda p: p["layers"]) if good else None
                chosen = [] if best is None else next(pl for pl in ladder if len(pl) == best["layers"])
                say(f"calibrate: {clock.stopped}; returning the best plan that passed the retrieval probe")
    info["retrieval"] = retrieval
    bar.close()
    plan = _with_cells(skeleton, chosen)
    plan = CalibratedPlan(**{f.name: getattr(plan, f.name) for f in dataclasses.fields(PatchPlan)})
    combined = nll_of(chosen, texts, data_sha, "nll")
    info["calibration_change"] = _change(combined["nll"], base["nll"], base["tokens"])
    info["steps"] = steps
    info["stopped"] = clock.stopped
    info["elapsed_s"] = round(clock.elapsed(), 3)
    info["why_exact"] = None if chosen else why_no_layer(cells, budget, steps, info["text_tokens"], retrieval,
                                                         clock.stopped)

    both = [c for c in cells if c.loss_change is not None and c.error is not None]
    info["proxy_spearman"] = spearman([c.error for c in both], [c.loss_change for c in both])
    chosen_by_layer = {c.layer: c for c in chosen}
    rows, exact_total = [], 0.0
    for i in range(num_layers):
        mine = [c for c in cells if c.layer == i]
        pick = chosen_by_layer.get(i)
        exact_s = next((c.exact_s for c in mine if c.exact_s is not None), None)
        exact_total += exact_s or 0.0
        rows.append({"layer": i, "choice": None if pick is None else candidate_label(pick.method, pick.params),
                     "method": None if pick is None else pick.method, "cells": len(mine),
                     "served_cells": sum(c.served for c in mine), "exact_s": exact_s,
                     "cost": None if pick is None else pick.cost, "error": None if pick is None else pick.error,
                     "loss_change": None if pick is None else pick.loss_change,
                     "method_s": None if pick is None else pick.method_s})
    info["layers"] = rows
    info["cells"] = [dataclasses.asdict(c) for c in cells]
    info["exact_attention_s"] = exact_total
    info["attention_saving_s"] = sum(c.saving for c in chosen)
    if heldout is not None:
        held_sha = data_fingerprint(heldout)
        held_base = nll_of([], heldout, held_sha, "heldout")
        held_plan = nll_of(chosen, heldout, held_sha, "heldout")
        info["heldout"] = {
            "data_sha256": held_sha, "texts": len(heldout), "tokens": held_base["tokens"],
            "exact_perplexity": math.exp(held_base["nll"] / held_base["tokens"]),
            "plan_perplexity": math.exp(held_plan["nll"] / held_plan["tokens"]),
            "change": _change(held_plan["nll"], held_base["nll"], held_base["tokens"]),
            "exact_prefill_s": held_base["prefill_s"], "plan_prefill_s": held_plan["prefill_s"],
            "speedup": held_base["prefill_s"] / max(held_plan["prefill_s"], 1e-12),
            "exact_run_id": held_base.get("run_id"), "plan_run_id": held_plan.get("run_id"),
        }
    info["elapsed_s"] = round(clock.elapsed(), 3)
    plan.calibration = info
    return plan


DEFAULT_METHODS = ("hyper", "sparse_hyper", "local")


def prefix_search(cells: Sequence[Cell], budget: float, measure_change: Callable[[list[Cell]], float],
                  lookup: Callable[[list[Cell]], Optional[float]], refine: int = 1
                  ) -> tuple[list[Cell], list[dict[str, Any]], list[Cell]]:
    """The output-error search: the longest holding prefix of :func:`prefix_order` (:func:`greedy_plan`), then up
    to ``refine`` rounds where the choice was close: when the cell after the plan broke the budget on its own
    (:func:`_culprit`), it is skipped and the rest of the order is searched the same way on top of the plan.
    ``lookup(cells)``: a combined plan's change already measured (cache), None otherwise. Returns (chosen cells in
    the order they were added, the measured steps, the skipped cells)."""
    order = prefix_order(cells)

    def known_of(plans: Sequence[list[Cell]]) -> dict[int, float]:
        return {k: c for k in range(len(plans)) if (c := lookup(plans[k])) is not None}

    chosen, steps = greedy_plan(cells, budget, measure_change, costs_in_budget_units=False,
                                known=known_of([order[:k] for k in range(len(order) + 1)]))
    skipped: list[Cell] = []
    for _ in range(refine):
        rest = [c for c in order if c.layer not in {x.layer for x in chosen} and c not in skipped]
        culprit = _culprit(chosen, rest, lookup, budget)
        if culprit is None:
            break
        skipped.append(culprit)
        rest = [c for c in rest if c is not culprit]
        plans = [chosen + rest[:k] for k in range(len(rest) + 1)]
        chosen, more = greedy_plan(cells, budget, measure_change, costs_in_budget_units=False, known=known_of(plans),
                                   plans=plans)
        steps += more
    return chosen, steps, skipped


def _culprit(chosen: list[Cell], rest: list[Cell], lookup: Callable[[list[Cell]], Optional[float]],
             budget: float) -> Optional[Cell]:
    """The cell whose addition to the holding plan ``chosen`` broke the budget, when it looks like that cell's
    own fault rather than a budget used up: alone (an empty plan), or a jump in the measured change more than
    twice the plan's average per layer while the plan leaves room for another such layer. None: stop refining.
    ``lookup(cells)``: the measured change of a combined plan, None when not measured."""
    if not rest:
        return None
    failed, held = lookup(chosen + rest[:1]), lookup(chosen)
    if failed is None or held is None or failed <= budget:
        return None
    if not chosen:
        return rest[0]
    typical = max(held, 0.0) / len(chosen)
    room = budget - held
    return rest[0] if failed - held > 2 * typical and room >= 0.5 * typical else None


def _probe_label(probe: Any, index: int) -> str:
    describe = getattr(probe, "describe", None)
    return describe(index) if callable(describe) else f"sample {index}"


def _probe_scores(model, skeleton, cells, probe, probe_fp, store, key_of, clock, *, forward_s: float,
                  exact: Optional[Sequence[float]] = None, allowed: float = 0.0) -> list[Optional[float]]:
    """Per-sample probe scores of ``cells`` (cached per sample). With ``exact`` (the exact model's scores), only the
    samples the exact model scores on are probed (a plan's gain where the exact model misses is not counted) and
    probing stops once the points lost exceed ``allowed`` (the rest are None)."""
    n = len(probe)
    scores: list[Optional[float]] = [None] * n
    lost = 0.0
    patched = False
    try:
        for i in range(n):
            if exact is not None and exact[i] <= 0:
                scores[i] = 0.0
                continue
            key = key_of("probe", probe_fp, i, _assignment_key(cells))
            record = store.get(key)
            if record is None:
                clock.check(forward_s, f"probe sample {i} of a plan of {len(cells)} layers")
                if cells and not patched:
                    patch_model(model, plan=_with_cells(skeleton, cells))
                    patched = True
                start = time.perf_counter()
                score = float(probe(model, i))
                record = store.put(key, {"kind": "probe", "score": score, "seconds": time.perf_counter() - start})
            scores[i] = record["score"]
            if exact is not None:
                lost += max(exact[i] - scores[i], 0.0)
                if lost / n > allowed + 1e-9:
                    break
    finally:
        if patched:
            unpatch_model(model)
    if exact is None and any(s is None for s in scores):
        return None
    return scores


def _progress(enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=0, disable=not enabled, desc="calibrate", leave=False)


def spread(items: Sequence[int], count: Optional[int]) -> list[int]:
    """``count`` items spread evenly over ``items`` (first and last included); all of them for None."""
    items = list(items)
    if count is None or count >= len(items):
        return items
    if count == 1:
        return [items[len(items) // 2]]
    return sorted({items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)})


def _measure_cells(model, texts, data_sha, eligible, resolved, seed, repeats, store, key_of, bar,
                   capture_attention, timed_layers: Optional[int] = None) -> list[Cell]:
    """Output error (every text) and timing (first text, on ``timed_layers`` layers spread over the eligible ones;
    the others take the medians of the timed layers) of every eligible layer x candidate, from one capture forward
    per text that lacks records."""

    keys = [candidate_key(m, p) for m, p in resolved]
    timed = set(spread(eligible, timed_layers))
    bar.reset(total=len(texts) * len(eligible))
    bar.set_description("calibrate: output error and time per layer")
    per_text: list[dict[int, dict]] = []

    def layer_key(text_sha: str, layer: int, is_timed: bool) -> str:
        return key_of("layer", text_sha, layer, is_timed, repeats if is_timed else 0)

    for t, ids in enumerate(texts):
        text_sha = data_fingerprint([ids])
        records, missing = {}, []
        for layer in eligible:
            is_timed = t == 0 and layer in timed
            record = store.get(layer_key(text_sha, layer, is_timed))
            if record is None and t == 0 and not is_timed:  # a record timed by an earlier run serves as well
                record = store.get(layer_key(text_sha, layer, True))
            if record is not None and set(keys) <= set(record["err_sq"]):
                records[layer] = record
                bar.update(1)
            else:
                missing.append(layer)
        if missing:
            with capture_attention(model, layers=missing) as captured:
                prefill_and_nll(model, ids.to(model.device))
            for layer in missing:
                calls = captured[layer]
                if len(calls) != 1:
                    raise ValueError(f"layer {layer} was called {len(calls)} times in one forward; calibrate needs "
                                     "one attention call per layer and text")
                is_timed = t == 0 and layer in timed
                measured = measure_layer(calls[0], resolved, seed, timed=is_timed, repeats=repeats)
                records[layer] = store.put(layer_key(text_sha, layer, is_timed),
                                           dict(measured, kind="layer", layer=layer, text=t))
                calls.clear()
                bar.update(1)
            del captured
        per_text.append(records)
    timings = [per_text[0][layer] for layer in eligible if "exact_s" in per_text[0][layer]]
    median_exact = statistics.median(r["exact_s"] for r in timings) if timings else None
    median_method = {key: statistics.median(vals) for key in keys
                     if (vals := [r["method_s"][key] for r in timings if key in r.get("method_s", {})])}
    cells = []
    for layer in eligible:
        timing = per_text[0][layer]
        exact_s = timing.get("exact_s", median_exact)
        for (method, params), key in zip(resolved, keys):
            errs = [per_text[t][layer]["err_sq"][key] for t in range(len(texts))]
            served = all(e is not None for e in errs)
            ref = sum(per_text[t][layer]["ref_sq"] for t in range(len(texts)))
            method_s = timing["method_s"].get(key) if "method_s" in timing else median_method.get(key)
            cells.append(Cell(layer=layer, method=method, params=params, served=served,
                              error=math.sqrt(sum(errs) / max(ref, 1e-30)) if served else None,
                              method_s=method_s if served else None, exact_s=exact_s))
    return cells


# ---------------------------------------------------------------------------------------------------------
# How well the proxy predicts the loss (a subset of cells measured both ways)
# ---------------------------------------------------------------------------------------------------------

@torch.no_grad()
def proxy_check(
    model: torch.nn.Module,
    text_ids: torch.Tensor,
    cells: Sequence[tuple[int, str, dict[str, Any]]],
    *,
    cache: Optional[Union[str, os.PathLike]] = None,
    seed: int = 0,
    progress: bool = True,
    should_stop: Optional[Callable[[], bool]] = None,
) -> dict[str, Any]:
    """Output error against single-layer loss change for ``cells`` = [(layer, method, params)] on one text
    (token ids [1, N] or [N]).

    error: relative Frobenius error of that layer's attention output on the exact model's captured q/k/v (one
    capture forward for all layers); loss change: the perplexity change of the text with only that layer replaced
    (one forward per cell, keyed in the cache like :func:`calibrate`'s single-layer losses, so the two share
    records). ``should_stop()`` is asked before every forward: the cells measured so far are returned (resume by
    calling again with the same cache). Returns {cells: [{layer, method, params, label, error, loss_change}],
    spearman: {rho, p_value, n} over the cells with both, complete: bool}."""
    texts = _as_texts(text_ids, "text_ids")[:1]
    if current_plan(model) is not None:
        raise ValueError("the model is patched: call hf_sparse_attn.unpatch_model(model) first")
    adapter = find_adapter(model)
    skeleton = _skeleton_plan(model, adapter, seed)
    wanted = []
    for layer, method, params in cells:
        if not 0 <= int(layer) < len(skeleton.layers):
            raise ValueError(f"layer {layer} does not exist: the model has layers 0..{len(skeleton.layers) - 1}")
        (resolved,) = resolve_candidates([method], {method: [params]})
        wanted.append(Cell(layer=int(layer), method=method, params=resolved[1], served=True))
    sha = data_fingerprint(texts)
    model_sha = skeleton.model_fingerprint["qk_sha256"][:16]
    store = _Cache(cache)
    stop = should_stop or (lambda: False)

    def key_of(*parts: Any) -> str:
        return "|".join([model_sha, str(seed)] + [str(p) for p in parts])

    by_layer: dict[int, list[Cell]] = {}
    for cell in wanted:
        by_layer.setdefault(cell.layer, []).append(cell)
    err_key = {layer: key_of("proxy_error", sha, layer, sorted(c.key for c in mine)) for layer, mine in by_layer.items()}
    missing = [layer for layer in by_layer if store.get(err_key[layer]) is None]
    complete = True
    if missing and stop():
        missing, complete = [], False
    if missing:
        with capture_attention(model, layers=missing) as captured:
            prefill_and_nll(model, texts[0].to(model.device))
        for layer in missing:
            measured = measure_layer(captured[layer][0], [(c.method, c.params) for c in by_layer[layer]], seed,
                                     timed=False)
            store.put(err_key[layer], dict(measured, kind="proxy_error", layer=layer))
            captured[layer].clear()
        del captured
    base_key = key_of("nll", sha, _assignment_key([]))
    base = store.get(base_key)
    if base is None and not stop():
        base = store.put(base_key, measure_nll(model, texts))
    bar = _progress(progress)
    bar.reset(total=len(wanted))
    bar.set_description("proxy: single-layer losses")
    rows = []
    for cell in wanted:
        record = store.get(err_key[cell.layer])
        err_sq = None if record is None else record["err_sq"].get(cell.key)
        error = None if err_sq is None else math.sqrt(err_sq / max(record["ref_sq"], 1e-30))
        loss_record = store.get(key_of("nll", sha, _assignment_key([cell])))
        if loss_record is None and base is not None and error is not None and not stop():
            patch_model(model, plan=_with_cells(skeleton, [cell]))
            try:
                loss_record = store.put(key_of("nll", sha, _assignment_key([cell])), measure_nll(model, texts))
            finally:
                unpatch_model(model)
        complete = complete and record is not None and (error is None or loss_record is not None)
        change = None if loss_record is None or base is None else _change(loss_record["nll"], base["nll"], base["tokens"])
        rows.append({"layer": cell.layer, "method": cell.method, "params": cell.params,
                     "label": candidate_label(cell.method, cell.params), "error": error, "loss_change": change})
        bar.update(1)
    bar.close()
    both = [r for r in rows if r["error"] is not None and r["loss_change"] is not None]
    return {"cells": rows, "spearman": spearman([r["error"] for r in both], [r["loss_change"] for r in both]),
            "complete": complete}
