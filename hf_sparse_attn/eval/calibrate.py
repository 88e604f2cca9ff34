"""calibrate: the fastest plan that stays within a quality budget, found on the user's own model and text.

    from hf_sparse_attn import calibrate
    plan = calibrate(model, calibration_ids, budget=0.03, methods=["hyper", "sparse_hyper", "local"], metric="loss")
    print(plan.report()); plan.save("plan.json")     # re-apply: patch_model(model, plan="plan.json")

The search (docs/calibrate.md has the whole story):

1. **Cells.** For every eligible layer and every candidate (a method with one parameter setting, see
   ``DEFAULT_CANDIDATES``), measure what replacing that layer alone costs and what it saves:
   - cost, ``metric="loss"``: the perplexity change of the calibration text with only that layer replaced,
     ``exp((nll_patched - nll_exact) / tokens) - 1`` (a fraction: 0.03 = +3%);
   - cost, ``metric="output_error"`` (the cheap proxy, measured for every cell in both modes): the relative
     Frobenius error ``||out - exact|| / ||exact||`` of the layer's attention output, computed by running the method
     on the q/k/v the exact model gave that layer (``capture_attention``), over all calibration texts;
   - saving: seconds of that layer's attention call, exact SDPA minus the method, measured on this machine on the
     captured q/k/v of the first calibration text (median of ``repeats``, the two alternated).
   A candidate that would not serve the call (its ``min_seq_len``, its own check) is recorded as not served and
   never chosen.
2. **Greedy.** Cells with a positive saving, ordered by saving per cost (cost <= 0 first), one cell per layer.
   ``metric="loss"``: the longest prefix of that order whose single-layer costs sum within the budget;
   ``metric="output_error"`` (costs in other units than the budget): the longest prefix whose measured combined
   loss holds the budget, found by interpolation on the measured changes (:func:`greedy_plan`); the prefixes
   measured for one budget serve the next from the cache.
3. **Back-off.** The combined plan's perplexity change is measured on the calibration text (never summed); while it
   exceeds the budget, the worst-ratio layer (the last of the prefix) is dropped and the plan measured again.
4. **Held-out.** With ``heldout_ids``, the plan's perplexity change and prefill speed-up on that text are measured
   and reported next to the budget.

Also here: :func:`proxy_check` (output error against single-layer loss on a subset of cells), and the comparison
with fixed plans from the model benchmark's records (:func:`fixed_plans_on`, :func:`best_fixed_plan`,
:func:`compare_budgets`, :func:`results_markdown`, :func:`frontier_plot`) used by scripts/calibrate_smollm2.py.

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
import time
import uuid
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

from ..methods.common import expand_kv_heads
from ..methods.registry import get_spec, list_methods
from ..patches import LayerRuntime, capture_attention, find_adapter
from ..patching import current_plan, patch_model, unpatch_model
from ..plan import LayerPlan, PatchPlan, library_versions, model_fingerprint, now_iso
from ..selection import rank_layers
from .model_bench import append_jsonl, prefill_and_nll, read_jsonl
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


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
                    key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """SDPA on q [B, H, N, D], k/v [B, H, N, D] (expanded); key_padding_mask [B, N] bool or None -> [B, H, N, D]."""
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
        return exact_attention(q, k_full, v_full, captured.causal, captured.scale, captured.key_padding_mask)

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
    points.update({k: c for k, c in (known or {}).items() if 0 < k <= n})

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


class _Cache:
    """The JSONL cache: key -> latest record, appended crash-safe (eval.model_bench.append_jsonl)."""

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
    return CalibratedPlan(method="calibrated", select="calibrated", layers=layers, seed=seed, norm=ranking.norm,
                          model_fingerprint=model_fingerprint(model, adapter), model_class=type(model).__name__,
                          adapter=adapter.name, versions=library_versions(), created=now_iso())


def _with_cells(skeleton: PatchPlan, cells: Sequence[Cell]) -> PatchPlan:
    plan = PatchPlan.from_dict(skeleton.to_dict())
    for cell in cells:
        layer = plan.layer(cell.layer)
        layer.method, layer.params = cell.method, dict(cell.params)
    return plan


def _assignment_key(cells: Sequence[Cell]) -> str:
    return json.dumps(sorted([c.layer, c.key] for c in cells))


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    calibration_ids: Any,
    budget: float = 0.03,
    methods: Sequence[str] = ("hyper", "sparse_hyper", "local"),
    metric: str = "loss",
    *,
    heldout_ids: Any = None,
    candidates: CandidatesArg = None,
    layers: Optional[Sequence[int]] = None,
    cache: Optional[Union[str, os.PathLike]] = None,
    seed: int = 0,
    repeats: int = 3,
    progress: bool = True,
    search: str = "prefix",
) -> CalibratedPlan:
    """The plan with the most attention time saved whose measured perplexity change on ``calibration_ids`` stays
    within ``budget``.

    calibration_ids / heldout_ids: token ids [B, N] or [N], or a list of them (texts of any length; each row is one
    text, scored at batch 1). budget: the allowed perplexity increase as a fraction (0.03 = +3%); 0 gives an
    all-exact plan without measuring (no approximation is free of cost). methods: candidate method names; their
    parameter settings come from ``candidates[method]`` (a list of parameter dicts) or ``DEFAULT_CANDIDATES``.
    metric: "loss" (every cell measured by perplexity change) or "output_error" (cells ranked by the relative error
    of their attention output; only combined plans are measured by loss). layers: the layers eligible (default all).
    cache: a JSONL file of measured cells; a calibration that was killed resumes from it. search (output error):
    "prefix" (the best cell of each layer, prefixes searched) or "upgrades" (:func:`upgrade_plans`: a layer may
    trade up from an accurate candidate to a faster one).
    The model must be unpatched; it is unpatched again on return. Returns a :class:`CalibratedPlan`.
    """

    budget = check_budget(budget)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")
    if search not in SEARCHES or (search == "upgrades" and metric != "output_error"):
        raise ValueError(f"search must be one of {SEARCHES} ('upgrades' with metric='output_error' only); got "
                         f"{search!r} with metric {metric!r}")
    resolved = resolve_candidates(methods, candidates)
    texts = _as_texts(calibration_ids, "calibration_ids")
    heldout = None if heldout_ids is None else _as_texts(heldout_ids, "heldout_ids")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1; got {repeats!r}")
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
    bar = _progress(progress)

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
                            "texts": len(texts),
                            "candidates": [[m, p] for m, p in resolved], "eligible_layers": eligible, "seed": seed}
    base = nll_of([], texts, data_sha, "nll")
    info.update(tokens=base["tokens"], exact_perplexity=math.exp(base["nll"] / base["tokens"]))

    cells: list[Cell] = []
    if budget > 0:
        cells = _measure_cells(model, texts, data_sha, eligible, resolved, seed, repeats, store, key_of, bar,
                               capture_attention)
        if metric == "loss":
            todo = [c for c in cells if c.served and c.saving > 0]
            bar.reset(total=len(todo))
            bar.set_description("calibrate: loss of single layers")
            for cell in todo:
                c_nll = nll_of([cell], texts, data_sha, "nll")
                cell.loss_change = _change(c_nll["nll"], base["nll"], base["tokens"])
                bar.update(1)
        else:  # reuse any single-layer losses of an earlier metric="loss" run on the same data (for the proxy rank)
            for cell in cells:
                record = store.get(key_of("nll", data_sha, _assignment_key([cell])))
                if record is not None:
                    cell.loss_change = _change(record["nll"], base["nll"], base["tokens"])
        for cell in cells:
            cell.cost = cell.loss_change if metric == "loss" else cell.error

    def measure_change(chosen: list[Cell]) -> float:
        bar.set_description(f"calibrate: combined plan of {len(chosen)} layers")
        record = nll_of(chosen, texts, data_sha, "nll")
        return _change(record["nll"], base["nll"], base["tokens"])

    known, plans = {}, None  # output error: the plans already measured (by another budget) bracket for free
    if budget > 0 and metric == "output_error":
        order = prefix_order(cells)
        plans = upgrade_plans(cells) if search == "upgrades" else [order[:k] for k in range(len(order) + 1)]
        for k in range(1, len(plans)):
            record = store.get(key_of("nll", data_sha, _assignment_key(plans[k])))
            if record is not None:
                known[k] = _change(record["nll"], base["nll"], base["tokens"])
    chosen, steps = greedy_plan(cells, budget, measure_change, costs_in_budget_units=(metric == "loss"),
                                known=known, plans=plans) if budget > 0 else ([], [])
    bar.close()
    plan = _with_cells(skeleton, chosen)
    plan = CalibratedPlan(**{f.name: getattr(plan, f.name) for f in dataclasses.fields(PatchPlan)})
    combined = nll_of(chosen, texts, data_sha, "nll")
    info["calibration_change"] = _change(combined["nll"], base["nll"], base["tokens"])
    info["steps"] = steps

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
    plan.calibration = info
    return plan


def _progress(enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=0, disable=not enabled, desc="calibrate", leave=False)


def _measure_cells(model, texts, data_sha, eligible, resolved, seed, repeats, store, key_of, bar,
                   capture_attention) -> list[Cell]:
    """Output error (every text) and timing (first text) of every eligible layer x candidate, from one capture
    forward per text that lacks records."""

    keys = [candidate_key(m, p) for m, p in resolved]
    bar.reset(total=len(texts) * len(eligible))
    bar.set_description("calibrate: output error and time per layer")
    per_text: list[dict[int, dict]] = []
    for t, ids in enumerate(texts):
        text_sha = data_fingerprint([ids])
        records, missing = {}, []
        for layer in eligible:
            record = store.get(key_of("layer", text_sha, layer, t == 0, repeats if t == 0 else 0))
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
                measured = measure_layer(calls[0], resolved, seed, timed=(t == 0), repeats=repeats)
                records[layer] = store.put(key_of("layer", text_sha, layer, t == 0, repeats if t == 0 else 0),
                                           dict(measured, kind="layer", layer=layer, text=t))
                calls.clear()
                bar.update(1)
            del captured
        per_text.append(records)
    cells = []
    for layer in eligible:
        timing = per_text[0][layer]
        for (method, params), key in zip(resolved, keys):
            errs = [per_text[t][layer]["err_sq"][key] for t in range(len(texts))]
            served = all(e is not None for e in errs)
            ref = sum(per_text[t][layer]["ref_sq"] for t in range(len(texts)))
            cells.append(Cell(layer=layer, method=method, params=params, served=served,
                              error=math.sqrt(sum(errs) / max(ref, 1e-30)) if served else None,
                              method_s=timing["method_s"].get(key) if served else None, exact_s=timing["exact_s"]))
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


# ---------------------------------------------------------------------------------------------------------
# Calibrated plans against fixed plans (method x selection x layer count), from the model benchmark's records
# ---------------------------------------------------------------------------------------------------------

def fixed_plans_on(records: Iterable[dict], titles: Sequence[str], source: str = "") -> list[dict[str, Any]]:
    """Each fixed plan of a model-benchmark record file (eval/results/model_bench*/results.jsonl), scored on the
    articles ``titles`` only.

    Perplexity change: ``exp((sum nll_plan - sum nll_exact) / tokens) - 1`` over those articles (the exact model's
    per-article losses from the file's exact records; exact attention is deterministic, so any run's serve).
    Prefill speed-up: sum of exact seconds / sum of plan seconds over those articles, each article paired with the
    exact model timed on it in the same run (the benchmark times its exact baseline in every run on the articles
    that run times). Plans that lack one of the articles are skipped. Returns rows {source, key, label, method,
    causal_mode, select, layers, seed, params, articles, articles_timed, heldout_change, heldout_speedup}."""
    records = list(records)
    wanted = list(titles)
    exact_nll: dict[str, tuple[float, int]] = {}
    exact_s: dict[tuple[str, str], float] = {}
    latest: dict[str, dict] = {}
    for record in records:
        if record.get("kind") not in ("cell", "baseline_rerun"):
            continue
        if record.get("method") == "exact":
            for a in record.get("per_article", []):
                exact_nll.setdefault(a["title"], (a["nll_sum"], a["tokens"]))
                if not a.get("resumed"):
                    exact_s[(a.get("run_id", record.get("run_id")), a["title"])] = a["prefill_s"]
        elif record["kind"] == "cell":
            latest[record["key"]] = record
    rows = []
    for key, record in latest.items():
        per = {a["title"]: a for a in record.get("per_article", [])}
        if any(t not in per or t not in exact_nll for t in wanted) or not wanted:
            continue
        nll = sum(per[t]["nll_sum"] for t in wanted)
        base = sum(exact_nll[t][0] for t in wanted)
        tokens = sum(exact_nll[t][1] for t in wanted)
        pairs = [(exact_s[(per[t].get("run_id", record.get("run_id")), t)], per[t]["prefill_s"]) for t in wanted
                 if (per[t].get("run_id", record.get("run_id")), t) in exact_s]
        params = record.get("params", {})
        mode = params.get("causal_mode", "recursive") if record["method"] in ("hyper", "sparse_hyper") else ""
        variant = mode.replace("_", " ") if mode else (f"w{params['window']}" if record["method"] == "local"
                                                       and "window" in params else "")
        label = f"{record['method']}{' ' + variant if variant else ''}, {record['select']}" \
                f"{'' if record['select'] != 'random' else ' seed ' + str(record.get('seed'))}, {record['layers']} layers"
        rows.append({"source": source, "key": key, "label": label, "method": record["method"], "causal_mode": mode,
                     "variant": variant,
                     "select": record["select"], "layers": record["layers"], "seed": record.get("seed"),
                     "params": params, "articles": len(wanted), "articles_timed": len(pairs),
                     "heldout_change": _change(nll, base, tokens),
                     "heldout_speedup": sum(e for e, _ in pairs) / sum(p for _, p in pairs) if pairs else None})
    return sorted(rows, key=lambda r: (r["heldout_change"], r["key"]))


def best_fixed_plan(fixed: Sequence[dict], change: float) -> Optional[dict]:
    """The fastest fixed plan (largest ``heldout_speedup``) whose held-out perplexity change is no worse than
    ``change``; None when every fixed plan is worse (then only the exact model, 1.00x, is no worse)."""
    fit = [f for f in fixed if f["heldout_speedup"] is not None and f["heldout_change"] <= change + 1e-12]
    return max(fit, key=lambda f: (f["heldout_speedup"], -f["heldout_change"])) if fit else None


GOAL_MARGIN = 0.01  # held-out change within budget + 1 point
GOAL_SPEEDUP = 1.10  # at the 3% budget: at least 10% faster than the best fixed plan no worse in held-out perplexity


def compare_budgets(plans: Sequence[dict], fixed: Sequence[dict]) -> list[dict[str, Any]]:
    """One row per calibrated plan ({budget, heldout_change, heldout_speedup, ...}, the plan's calibration record
    flattened): the best fixed plan no worse in held-out perplexity and the two goals (None: not decidable, e.g.
    no held-out check yet). The speed-up goal is checked at the 3% budget only."""
    rows = []
    for plan in sorted(plans, key=lambda p: p["budget"]):
        row = dict(plan)
        change, speedup = plan.get("heldout_change"), plan.get("heldout_speedup")
        best = None if change is None else best_fixed_plan(fixed, change)
        row["best_fixed"] = best
        fixed_speedup = 1.0 if best is None else best["heldout_speedup"]
        row["best_fixed_speedup"] = None if change is None else fixed_speedup
        row["vs_fixed"] = None if speedup is None or change is None else speedup / fixed_speedup
        row["goal_quality"] = None if change is None else change <= plan["budget"] + GOAL_MARGIN
        row["goal_speed"] = None if abs(plan["budget"] - 0.03) > 1e-9 or row["vs_fixed"] is None \
            else row["vs_fixed"] >= GOAL_SPEEDUP
        rows.append(row)
    return rows


def plan_summary(plan: PatchPlan) -> dict[str, Any]:
    """The numbers of a saved calibrated plan that the comparison needs (held-out ones None before the check)."""
    info = plan.calibration or {}
    held = info.get("heldout") or {}
    choices = {str(r["layer"]): r["choice"] for r in info.get("layers", []) if r.get("choice")}
    return {"budget": info.get("budget"), "metric": info.get("metric"), "patched_layers": len(plan.patched_layers),
            "choices": choices, "calibration_change": info.get("calibration_change"),
            "search_steps": len(info.get("steps", [])), "heldout_change": held.get("change"),
            "heldout_speedup": held.get("speedup_same_run", held.get("speedup")), "heldout_articles": held.get("texts"),
            "exact_prefill_s": held.get("exact_prefill_s"), "plan_prefill_s": held.get("plan_prefill_s"),
            "exact_retimed": held.get("exact_retimed"),
            "same_run": (held.get("exact_run_id") == held.get("plan_run_id") or "speedup_same_run" in held)
            if held else None}


def frontier_plot(rows: Sequence[dict], fixed: Sequence[dict], path: Union[str, os.PathLike], title: str = "") -> None:
    """Perplexity change (held-out, %) against prefill speed-up: fixed plans by method, calibrated plans by budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = {"local": "s", "sparse_hyper": "o", "hyper": "^"}
    for method in sorted({f["method"] for f in fixed}):
        for variant in sorted({f["variant"] for f in fixed if f["method"] == method}):
            pts = [f for f in fixed if f["method"] == method and f["variant"] == variant and f["heldout_speedup"]]
            ax.scatter([f["heldout_speedup"] for f in pts], [100 * f["heldout_change"] for f in pts],
                       marker=markers.get(method, "x"), alpha=0.6,
                       label=f"fixed: {method}{' ' + variant if variant else ''}")
    done = [r for r in rows if r.get("heldout_speedup") is not None]
    ax.plot([r["heldout_speedup"] for r in done], [100 * r["heldout_change"] for r in done], "k*-", markersize=14,
            label="calibrated plans")
    for r in done:
        ax.annotate(f"budget {100 * r['budget']:g}%", (r["heldout_speedup"], 100 * r["heldout_change"]),
                    textcoords="offset points", xytext=(6, -12))
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("prefill speed-up over the exact model of the same run")
    ax.set_ylabel("held-out perplexity change (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def layer_ranges(layers: Sequence[int]) -> str:
    """Sorted layer numbers as ranges: [0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    runs: list[list[int]] = []  # [first, last] of each run of consecutive layers
    for layer in layers:
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def results_markdown(rows: Sequence[dict], fixed: Sequence[dict], proxy: Optional[dict], meta: dict,
                     notes: Sequence[str] = ()) -> str:
    """results.md of the SmolLM2 calibration: per budget the calibrated plan, its held-out change and speed-up,
    the best fixed plan no worse in held-out perplexity, the goals; the proxy's rank correlation; the fixed plans."""
    pct = lambda x: "-" if x is None else f"{100 * x:+.2f}%"  # noqa: E731
    spd = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
    yes = lambda x: "not decided yet" if x is None else ("met" if x else "NOT met")  # noqa: E731
    arts = meta.get("articles") or {}
    fixed_dirs = sorted({f["source"] for f in fixed}) or ["none"]
    lines = [f"# Calibrated plans vs fixed plans, {meta.get('model', 'the model')} at {meta.get('tokens')} tokens", "",
             f"Command: `{meta.get('command')}`. Machine: {meta.get('machine')}; {meta.get('threads')} torch thread(s); "
             f"date {meta.get('date')}; 1-min load average when this report was written: "
             f"{meta.get('load_avg_1min_at_report')}. Metric {meta.get('metric')}; search {meta.get('search', 'prefix')}; candidates "
             f"{json.dumps(meta.get('candidates'))}.", "",
             f"Calibration articles: {', '.join(arts.get('calibration', [])) or '-'}. Held-out articles "
             f"({len(arts.get('heldout', []))}): {', '.join(arts.get('heldout', [])) or '-'}.", "",
             "Speed-ups are prefill time of the exact model / prefill time of the plan on the held-out articles, each "
             "against the exact model timed in its own run: the calibrated plans were timed in this run, the fixed plans "
             f"in the model benchmark's runs ({', '.join(fixed_dirs)}) on the same machine. Compare speed-ups, not seconds. The fixed plans' numbers are recomputed from their per-article "
             "records on the held-out articles only.", "",
             "| budget | layers patched | calibration change | held-out change | held-out speed-up | exact + plan timed "
             "in one run | best fixed plan no worse (held-out change, speed-up) | calibrated / fixed speed-up | "
             "within budget + 1 point | 3%: >= 1.10x the fixed plan |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        best = r.get("best_fixed")
        best_text = "-" if r.get("heldout_change") is None else (
            "none (only the exact model, 1.00x)" if best is None else
            f"{best['label']} ({pct(best['heldout_change'])}, {spd(best['heldout_speedup'])})")
        lines.append(f"| {100 * r['budget']:g}% | {r.get('patched_layers')} | {pct(r.get('calibration_change'))} | "
                     f"{pct(r.get('heldout_change'))} | {spd(r.get('heldout_speedup'))} | "
                     f"{'-' if r.get('same_run') is None else ('yes' if r['same_run'] else 'no')} | {best_text} | "
                     f"{spd(r.get('vs_fixed'))} | {yes(r.get('goal_quality'))} | "
                     f"{'-' if abs(r['budget'] - 0.03) > 1e-9 else yes(r.get('goal_speed'))} |")
    if not rows:
        lines.append("| (no calibrated plan yet) | | | | | | | | | |")
    lines += ["", "Per budget, the layers and their choice (exact elsewhere):", ""]
    for r in rows:
        by_choice: dict[str, list[int]] = {}
        for layer, choice in r.get("choices", {}).items():
            by_choice.setdefault(choice, []).append(int(layer))
        lines.append(f"- {100 * r['budget']:g}%: " + ("; ".join(
            f"{choice}: {layer_ranges(sorted(layers))}" for choice, layers in sorted(
                by_choice.items(), key=lambda kv: min(kv[1]))) or "all exact"))
    lines += ["", "## How well the proxy predicts the loss", ""]
    if proxy and proxy.get("cells"):
        sp = proxy.get("spearman") or {}
        n_all = len(proxy["cells"])
        rho, p_value = sp.get("rho"), sp.get("p_value")
        lines.append(f"Output error of a layer's attention (captured q/k/v) against the perplexity change with only "
                     f"that layer replaced, on one calibration article ({proxy.get('text', '-')}): Spearman rho "
                     f"{'-' if rho is None else f'{rho:+.2f}'} over {sp.get('n', 0)} of {n_all} cells"
                     f"{'' if proxy.get('complete') else ' (incomplete: run the command again to measure the rest)'}"
                     f"{'' if p_value is None else f', p={p_value:.2g}'}.")
        by_method: dict[str, list[dict]] = {}
        for c in proxy["cells"]:
            if c.get("error") is not None and c.get("loss_change") is not None:
                by_method.setdefault(c["label"], []).append(c)
        for label, cs in sorted(by_method.items()):
            one = spearman([c["error"] for c in cs], [c["loss_change"] for c in cs])
            one_rho = one.get("rho")
            lines.append(f"- {label}: rho {'-' if one_rho is None else f'{one_rho:+.2f}'} over {one['n']} layers")
    elif meta.get("proxy") == "none":
        lines.append("Not part of this experiment (--proxy none).")
    else:
        lines.append("Not measured yet (step 3 of the script).")
    lines += ["", "## Fixed plans on the held-out articles", "",
              "| source | plan | held-out change | speed-up | articles (timed) |", "|---|---|---|---|---|"]
    for f in fixed:
        lines.append(f"| {f['source']} | {f['label']} | {pct(f['heldout_change'])} | {spd(f['heldout_speedup'])} | "
                     f"{f['articles']} ({f['articles_timed']}) |")
    if notes:
        lines += [""] + [f"Note: {n}" for n in notes]
    return "\n".join(lines) + "\n"
