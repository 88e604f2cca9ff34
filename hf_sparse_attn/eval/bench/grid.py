"""The grid of cells (method x tokens N x replaced layers x selection x seed), the texts they score, and running
them: each cell patches the model, scores every text and appends its records to the results file."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import os
import platform
import uuid
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from .measure import DECODE_CACHE_NAMES, compare_decode, perplexity, prefill_and_nll, profile_attention_share, ratio_interval
from .results import append_jsonl, finished_keys, latest_cells, read_jsonl

# the layer selections the benchmark compares (presets of hf_sparse_attn.selection), in report order
SELECTIONS = ("weight_norm", "last", "first", "measured", "random", "retrieval")
# a cell record's "timing": its articles were timed in turn with the exact baseline's, article by article (records
# without it come from runs that timed every article exact, then every article patched)
PAIRED_TIMING = "paired by article"
# what `bench model --selections` runs when not told (retrieval needs a probe: asked for by name)
DEFAULT_SELECTIONS = ("weight_norm", "last", "first", "measured", "random")


# ---------------------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Cell:
    """One configuration. ``layers == 0`` is the exact baseline (method "exact", select "none")."""

    method: str
    tokens: int
    layers: int
    select: str
    seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.method}|N={self.tokens}|layers={self.layers}|{self.select}|seed={self.seed}"

    @property
    def is_baseline(self) -> bool:
        return self.layers == 0


def baseline_cell(tokens: int) -> Cell:
    return Cell("exact", tokens, 0, "none", 0)


def build_grid(methods: Sequence[str], token_lengths: Sequence[int], layer_counts: Sequence[int],
               selections: Sequence[str] = ("weight_norm",), random_seeds: Sequence[int] = (0, 1, 2),
               compare_selections_at: Optional[Sequence[int]] = None,
               method_layers: Optional[dict[str, Sequence[int]]] = None,
               compare_methods: Optional[Sequence[str]] = None) -> list[Cell]:
    """All cells, baselines first for each N. ``weight_norm`` runs at every layer count; the other selections at
    ``compare_selections_at`` (default: every layer count). ``random`` runs once per seed. Layer count 0 is the
    one shared baseline of each N; "exact" in ``methods`` adds nothing beyond it (patching exact changes nothing).
    ``method_layers``: method -> the layer counts it runs at (default: ``layer_counts``); ``compare_methods``: the
    methods that run the other selections (default: all)."""
    unknown = [s for s in selections if s not in SELECTIONS]
    if unknown:
        raise ValueError(f"unknown selection(s) {unknown}; choose from {list(SELECTIONS)}")
    compare = set(layer_counts if compare_selections_at is None else compare_selections_at)
    cells: list[Cell] = []
    for n in token_lengths:
        cells.append(baseline_cell(n))
        for method in methods:
            if method == "exact":
                continue
            for layers in (method_layers or {}).get(method, layer_counts):
                if layers == 0:
                    continue
                for select in selections:
                    if select != "weight_norm" and (layers not in compare or
                                                    (compare_methods is not None and method not in compare_methods)):
                        continue
                    for seed in (random_seeds if select == "random" else (0,)):
                        cells.append(Cell(method, n, layers, select, seed))
    seen: set[str] = set()
    unique = []
    for cell in cells:
        if cell.key not in seen:
            seen.add(cell.key)
            unique.append(cell)
    return unique


def shard_cells(cells: Sequence[Cell], index: int, count: int) -> list[Cell]:
    """Shard ``index`` of ``count`` (0 <= index < count) of a grid: every baseline, and the patched cells at
    positions index, index + count, index + 2 * count, ... of ``cells`` (baselines not counted). Each shard is its
    own process with its own results file (:func:`.store.shard_results_file`): a speed-up needs a baseline timed in
    the same run, so every shard times the exact baseline of its N on its articles again (the first shard to
    finish it records the cell; the others record a "baseline_rerun"). The report reads every shard's file."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: write --shard i/n with 0 <= i < n (e.g. 0/2 and 1/2)")
    patched = [c for c in cells if not c.is_baseline]
    mine = set(c.key for c in patched[index::count])
    return [c for c in cells if c.is_baseline or c.key in mine]


# ---------------------------------------------------------------------------------------------------------
# Texts
# ---------------------------------------------------------------------------------------------------------

def article_token_sets(tokenizer: Any, tokens: int, num_articles: int, articles: Optional[Sequence[tuple[str, str]]] = None,
                       skip_titles: Iterable[str] = (), concatenate: bool = False) -> list[tuple[str, torch.Tensor]]:
    """The first ``num_articles`` articles (corpus order) with at least ``tokens`` tokens, each cut to its first
    ``tokens`` tokens: list of (title, input_ids [1, tokens]). Default corpus: :func:`wikipedia_articles`.

    ``concatenate=True`` (for contexts longer than any article): each text is consecutive articles of the corpus,
    joined by a blank line until it holds ``tokens`` tokens, titled "A + B + ..."; every article is used once."""
    if articles is None:
        from ..data import wikipedia_articles

        articles = wikipedia_articles(min_chars=0 if concatenate else tokens)  # >= 1 char per token for these texts
    skip = set(skip_titles)
    chosen = []
    if concatenate:
        titles: list[str] = []
        parts: list[str] = []
        for title, text in articles:
            if title in skip:
                continue
            titles.append(title)
            parts.append(text)
            ids = tokenizer("\n\n".join(parts), return_tensors="pt").input_ids
            if ids.shape[1] >= tokens:
                chosen.append((" + ".join(titles), ids[:, :tokens].contiguous()))
                titles, parts = [], []
                if len(chosen) == num_articles:
                    return chosen
        raise ValueError(f"the corpus makes only {len(chosen)} texts of {tokens} tokens from consecutive articles; asked "
                         f"for {num_articles}. Use fewer articles (--articles) or shorter contexts (--tokens).")
    for title, text in articles:
        if title in skip:
            continue
        ids = tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] >= tokens:
            chosen.append((title, ids[:, :tokens].contiguous()))
            if len(chosen) == num_articles:
                return chosen
    raise ValueError(f"only {len(chosen)} articles have >= {tokens} tokens; asked for {num_articles}. Use fewer articles "
                     "(--articles) or shorter contexts (--tokens).")


# ---------------------------------------------------------------------------------------------------------
# Running cells
# ---------------------------------------------------------------------------------------------------------

def selection_order_retrieval(model: torch.nn.Module, tokenizer: Any, length: int = 2048) -> list[int]:
    """Layer order of ``select="retrieval"``: least needle mass first on a pass-key probe of ``length`` tokens
    (:func:`hf_sparse_attn.retrieval_probe`, its defaults otherwise; computed once, reused by every cell)."""
    from ...retrieval import retrieval_probe, retrieval_scores
    from ...selection import rank_layers, selection_order

    scores = retrieval_scores(model, retrieval_probe(tokenizer, length=length))
    return selection_order(rank_layers(model), "retrieval", retrieval_scores=scores)


def selection_order_measured(model: torch.nn.Module, calibration_ids: torch.Tensor) -> list[int]:
    """Layer order of ``select="measured"``: most (k, eps)-sparse first on ``calibration_ids`` [1, N], from
    :func:`hf_sparse_attn.eval.sparsity.measured_sparsity_scores` (computed once, reused by every cell)."""
    from ...selection import rank_layers, selection_order
    from ..sparsity import measured_sparsity_scores

    scores = measured_sparsity_scores(model, calibration_ids)
    return selection_order(rank_layers(model), "measured", measured_scores=scores)


def _patch_for(model: torch.nn.Module, cell: Cell, method_params: dict, measured_order: Optional[list[int]],
               decode: Optional[dict] = None, retrieval_order: Optional[list[int]] = None):
    """Patch ``model`` as ``cell`` says; ``decode``: patch_model's ``decode_method`` / ``decode_params`` (default:
    patch_model's own). The orders of the selections computed on the model (``measured``, ``retrieval``) are given,
    computed once for every cell."""
    from ... import patch_model

    params = {**method_params.get(cell.method, {}), **(decode or {})}
    computed = {"measured": (measured_order, "the measured sparsity order (calibration text)"),
                "retrieval": (retrieval_order, "the needle-mass order of a retrieval probe")}
    if cell.select in computed:
        order, what = computed[cell.select]
        if order is None:
            raise ValueError(f"select {cell.select!r} needs {what}")
        return patch_model(model, method=cell.method, layers=cell.layers, select=order, seed=cell.seed, **params)
    return patch_model(model, method=cell.method, layers=cell.layers, select=cell.select, seed=cell.seed, **params)


def run_cell(model: torch.nn.Module, cell: Cell, texts: Sequence[tuple[str, torch.Tensor]], *,
             method_params: Optional[dict[str, dict]] = None, measured_order: Optional[list[int]] = None,
             retrieval_order: Optional[list[int]] = None,
             scorer: Callable[..., tuple[float, int, float]] = prefill_and_nll,
             done_articles: Optional[dict[str, dict]] = None,
             on_article: Optional[Callable[[dict], None]] = None, decode: Optional[dict] = None) -> dict:
    """Run one cell on every text (the model is patched for the cell and unpatched after). Returns the record
    (without the run fields: see :func:`run_grid`). ``decode``: patch_model's ``decode_method`` / ``decode_params``
    for the patched layers (the prefill runs without a cache: they only reach the plan).

    ``done_articles``: title -> article record (``{"title", "nll_sum", "tokens", "prefill_s", ...}``) finished by an
    earlier, interrupted run of this cell: reused, not recomputed. ``on_article`` is called with each newly
    computed article record (``run_grid`` appends it to the results file, so a crash loses at most one article)."""
    from ... import unpatch_model

    for _, ids in texts:
        if ids.shape[1] != cell.tokens:
            raise ValueError(f"a text has {ids.shape[1]} tokens; cell {cell.key} needs {cell.tokens}")
    plan = None if cell.is_baseline else _patch_for(model, cell, method_params or {}, measured_order, decode,
                                                    retrieval_order)
    per_article = []
    load_before = os.getloadavg()[0]
    try:
        for title, ids in texts:
            if done_articles and title in done_articles:
                per_article.append(dict(done_articles[title], resumed=True))
                continue
            nll, scored, seconds = scorer(model, ids)
            article = {"title": title, "nll_sum": nll, "tokens": scored, "prefill_s": seconds}
            per_article.append(article)
            if on_article is not None:
                on_article(article)
    finally:
        if plan is not None:
            unpatch_model(model)
    record = {"kind": "cell", "key": cell.key, **dataclasses.asdict(cell), **article_totals(per_article),
              "load_avg_1min": [load_before, os.getloadavg()[0]]}
    if plan is not None:
        record["patched_layers"] = plan.patched_layers
        own = [i for i in plan.patched_layers if plan.layer(i).rank < cell.layers]  # the cell's `layers` chosen
        record["params"] = dict(plan.layer(own[0]).params) if own else {}
        others = [plan.layer(i) for i in plan.patched_layers if i not in own]
        if others:  # patch_model's other_layers: the layers the cell's count does not choose
            record["params"]["other_layers"] = {"method": others[0].method, **others[0].params}
        record["served"] = sum(plan.layer(i).served for i in plan.patched_layers)
        record["fallbacks"] = plan.fallback_counts()
    else:
        record["patched_layers"], record["params"], record["served"], record["fallbacks"] = [], {}, 0, {}
    return record


def article_totals(per_article: Sequence[dict]) -> dict:
    """A cell record's sums over its article records (``{"nll_sum", "tokens", "prefill_s", ...}``): perplexity,
    nll_sum, tokens_scored, articles, prefill_s and the articles themselves."""
    nll_sum = sum(a["nll_sum"] for a in per_article)
    tokens_scored = sum(a["tokens"] for a in per_article)
    return {"perplexity": perplexity(nll_sum, tokens_scored), "nll_sum": nll_sum, "tokens_scored": tokens_scored,
            "articles": len(per_article), "prefill_s": sum(a["prefill_s"] for a in per_article),
            "per_article": list(per_article)}


def merge_article_records(parts: Sequence[dict]) -> dict:
    """One cell record from :func:`run_cell` records of the same cell on one article each (in article order): the
    articles, sums and perplexity over all of them, the calls served and fallbacks of every patch added up."""
    fallbacks: collections.Counter = collections.Counter()
    for p in parts:
        fallbacks.update(p["fallbacks"])
    return {**parts[0], **article_totals([a for p in parts for a in p["per_article"]]),
            "load_avg_1min": [parts[0]["load_avg_1min"][0], parts[-1]["load_avg_1min"][1]],
            "served": sum(p["served"] for p in parts), "fallbacks": dict(fallbacks)}


def new_run_info() -> dict:
    return {"run_id": uuid.uuid4().hex[:12], "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count()}


def run_grid(model: torch.nn.Module, cells: Sequence[Cell], texts_for: Callable[[int], Sequence[tuple[str, torch.Tensor]]],
             out_path: str, *, method_params: Optional[dict[str, dict]] = None,
             measured_order_for: Optional[Callable[[], list[int]]] = None,
             retrieval_order_for: Optional[Callable[[], list[int]]] = None, profile: bool = True,
             scorer: Callable[..., tuple[float, int, float]] = prefill_and_nll, progress: bool = True,
             run_info: Optional[dict] = None, prepare_tokens: Optional[Callable[[int], None]] = None,
             other_results: Sequence[str] = (), decode: Optional[dict] = None) -> list[dict]:
    """Run every cell not yet in ``out_path`` and append its record. Returns all records of the file afterwards.
    ``decode``: patch_model's ``decode_method`` / ``decode_params`` for the patched cells (see :func:`run_cell`).

    ``prepare_tokens(n)``, when given, is called before the cells of each context length n run (e.g. to scale the
    model's RoPE to n: the baseline and every cell of that n then use the same model).

    For each N with cells left to do, the exact baseline is measured in this run (again, if an earlier run
    already has it: a speed-up is only computed against a baseline of the same run), article by article in turn with
    the patched cells (the baseline on an article, then every cell on it), so that the machine's drift during a run
    reaches both sides of a ratio alike; with ``profile``, one profiled exact prefill of the first text then gives
    attention's share. Each cell record carries ``run_id``, ``baseline_prefill_s`` (this run's) and ``speedup`` =
    baseline_prefill_s / prefill_s.

    Every finished article of a patched cell is appended at once (``"kind": "article"``); a rerun after a crash
    reuses them, so it loses at most the article in flight (the baseline is re-timed on the articles left to do).
    ``other_results``: the other results files of the same out dir (other shards', see :func:`shard_cells`): their
    finished cells and articles count as done here, nothing is written to them. The speed-up of a cell finished across two runs is
    then taken over the articles timed in this run, against this run's baseline times of the same articles.
    """
    from tqdm import tqdm

    run_info = dict(run_info or new_run_info())
    run_id = run_info["run_id"]
    previous = [r for path in other_results if path != out_path for r in read_jsonl(path)] + read_jsonl(out_path)
    previous_cells = latest_cells(previous)
    texts_by_n = {n: texts_for(n) for n in sorted({c.tokens for c in cells})}
    done = finished_keys(previous, lambda n: [t for t, _ in texts_by_n.get(n, ())])
    # articles already computed for unfinished cells: from an earlier cell record on fewer articles, then from the
    # article records of an interrupted run (the later one wins)
    partial: dict[str, dict[str, dict]] = {}
    fields = ("title", "nll_sum", "tokens", "prefill_s", "run_id")
    for key, c in previous_cells.items():
        if key not in done:
            for a in c.get("per_article", []):
                partial.setdefault(key, {})[a["title"]] = {k: a.get(k, c.get("run_id")) for k in fields}
    for r in previous:
        if r.get("kind") == "article" and r["key"] not in done:
            partial.setdefault(r["key"], {})[r["title"]] = {k: r[k] for k in fields}
    todo = [c for c in cells if c.key not in done]
    if not todo:
        return read_jsonl(out_path)
    append_jsonl(out_path, {"kind": "run", **run_info, "cells_todo": [c.key for c in todo]})
    baselines: dict[int, dict] = {}
    measured_order: Optional[list[int]] = None
    retrieval_order: Optional[list[int]] = None
    bar = tqdm(total=len(todo), desc="model bench", unit="cell", disable=not progress)
    warmed = False
    for n in sorted({c.tokens for c in todo}):
        texts = texts_by_n[n]
        if prepare_tokens is not None:
            prepare_tokens(n)
        if not warmed:  # the first forward of a process pays one-time costs: keep them out of the baseline
            scorer(model, texts[0][1][:, : min(512, n)])
            warmed = True
        base = baseline_cell(n)
        cells_n = [c for c in todo if c.tokens == n and not c.is_baseline]
        if any(c.select == "measured" for c in cells_n) and measured_order is None:
            if measured_order_for is None:
                raise ValueError("a 'measured' cell needs measured_order_for (calibration)")
            measured_order = list(measured_order_for())
        if any(c.select == "retrieval" for c in cells_n) and retrieval_order is None:
            if retrieval_order_for is None:
                raise ValueError("a 'retrieval' cell needs retrieval_order_for (a retrieval probe)")
            retrieval_order = list(retrieval_order_for())
        # the baseline is timed in this run on every article a patched cell will time in this run (and on the
        # articles it lacks); its other articles are reused from the earlier record
        to_time = {t for c in cells_n for t, _ in texts if t not in partial.get(c.key, {})}
        earlier_base = (previous_cells.get(base.key) or {}).get("per_article", [])
        base_reuse = {a["title"]: a for a in earlier_base if a["title"] not in to_time}

        def on_article(article: dict, key: str) -> None:
            if key != base.key:  # the baseline's times serve this run's ratios only: its record is written whole
                append_jsonl(out_path, {"kind": "article", "key": key, "run_id": run_id, **article})
            bar.set_postfix_str(f"{key} article {article['title'][:20]}")

        # article by article: the exact baseline, then every patched cell on the same article, so that a drift of the
        # machine during the run reaches the baseline and the cells alike (each cell is patched for its article only)
        parts: dict[str, list[dict]] = {c.key: [] for c in [base, *cells_n]}
        for title, ids in texts:
            parts[base.key].append(run_cell(model, base, [(title, ids)], scorer=scorer, done_articles=base_reuse,
                                            on_article=lambda a: on_article(a, base.key)))
            for cell in cells_n:
                parts[cell.key].append(run_cell(
                    model, cell, [(title, ids)], method_params=method_params, measured_order=measured_order,
                    retrieval_order=retrieval_order, scorer=scorer, done_articles=partial.get(cell.key),
                    on_article=lambda a, key=cell.key: on_article(a, key), decode=decode))
        record = merge_article_records(parts[base.key])
        record.update(run_id=run_id, timing=PAIRED_TIMING)
        baselines[n] = record
        if base.key not in done:
            record.update(baseline_prefill_s=record["prefill_s"], speedup=1.0)
            append_jsonl(out_path, record)
            bar.update(1)
        else:  # the baseline was finished earlier: record this run's own timing for this run's speed-ups
            append_jsonl(out_path, {**record, "kind": "baseline_rerun"})
        if profile:
            prof = profile_attention_share(model, texts[0][1])
            append_jsonl(out_path, {"kind": "profile", "run_id": run_id, "tokens": n, "title": texts[0][0], **prof})
        base_times = {a["title"]: a["prefill_s"] for a in record["per_article"] if not a.get("resumed")}
        for cell in cells_n:
            record = merge_article_records(parts[cell.key])
            timed_here = [a for a in record["per_article"] if not a.get("resumed")]
            base_s = sum(base_times[a["title"]] for a in timed_here)
            cell_s = sum(a["prefill_s"] for a in timed_here)
            record.update(run_id=run_id, timing=PAIRED_TIMING, baseline_prefill_s=base_s, articles_timed=len(timed_here),
                          prefill_s_timed=cell_s,
                          speedup=base_s / cell_s if cell_s > 0 else None,
                          baseline_perplexity=baselines[n]["perplexity"])
            append_jsonl(out_path, record)
            bar.update(1)
    bar.close()
    return read_jsonl(out_path)


def decode_setting(record: dict) -> tuple[Optional[str], str]:
    """(decode method, its parameters as sorted JSON) of a ``"kind": "decode"`` record: what the patched layers ran
    on the decode steps. A record without the fields (made before bench model had --decode-method) measured the
    model's own attention there: (None, "{}")."""
    return record.get("decode_method"), json.dumps(record.get("decode_params") or {}, sort_keys=True)


def continuation_ppl_change(per_article: Sequence[dict], kind: str = "exact") -> Optional[float]:
    """Perplexity of the cell's tokens over the exact model's, in percent: 100 * (exp(mean cell nll - mean baseline
    nll) - 1), every article the same number of tokens. ``kind`` "exact": each side's generated tokens scored by the
    exact model (per article "cell_exact_nll" / "baseline_exact_nll", nats per token); "forced": the prompt's last
    tokens predicted through each side's own decode path ("cell_forced_nll" / "baseline_forced_nll"). None where the
    articles lack them (a record made before they were measured)."""
    import math

    keys = (f"cell_{kind}_nll", f"baseline_{kind}_nll")
    if not per_article or any(a.get(k) is None for a in per_article for k in keys):
        return None
    cell = sum(a[keys[0]] for a in per_article) / len(per_article)
    base = sum(a[keys[1]] for a in per_article) / len(per_article)
    return 100 * (math.exp(cell - base) - 1)


def run_decode_cells(model: torch.nn.Module, cells: Sequence[Any], texts_for: Callable[[int], Sequence[tuple[str, torch.Tensor]]],
                     out_path: str, *, steps: int, cell_cache: str = "dynamic", baseline_cache: Optional[str] = None,
                     method_params: Optional[dict] = None, measured_order_for: Optional[Callable[[], list[int]]] = None,
                     retrieval_order_for: Optional[Callable[[], list[int]]] = None,
                     other_results: Sequence[str] = (), progress: bool = True,
                     prepare_tokens: Optional[Callable[[int], None]] = None, decode_method: Optional[str] = "exact",
                     decode_params: Optional[dict] = None) -> list[dict]:
    """``bench model --decode-tokens``: for every cell (:class:`hf_sparse_attn.eval.bench.grid.Cell`; the baseline
    cell too) and every text of its N, :func:`compare_decode` of the exact model with ``baseline_cache`` (default:
    ``cell_cache``) against the cell's model (patched as the cell says, its layers running ``decode_method`` with
    ``decode_params`` on the steps against the cache: patch_model's arguments) with ``cell_cache``, their steps
    alternating (the cell's first on every other text). Appends one ``"kind": "decode"`` record per cell to
    ``out_path`` and returns the new records; a cell with such a record for the same steps, caches and decode setting (in ``out_path`` or
    ``other_results``) is skipped. The baseline cell is the unpatched model on both sides: its decode setting is
    None whatever ``decode_method`` says. ``prepare_tokens(n)`` is called before the cells of each N (as in
    ``run_grid``, e.g. RoPE scaling).

    Record: {"kind": "decode", "key", "method", "tokens", "layers", "select", "seed", "decode_tokens",
    "cache", "baseline_cache" (class names), "decode_method" (None: the model's own attention), "decode_params"
    (filled in with the method's defaults), "served" (prefill calls the cell's method served), "decode_served"
    (calls against the cache its decode method served), "layer_decode" (decode method -> patched layers running it:
    ``other_layers`` may give the layers not chosen their own), "fallbacks" (reason -> calls that ran the model's
    attention; counts summed over the texts, 0 / {} for the baseline), "per_article": [{"title", "baseline_ms",
    "cell_ms" (medians), "baseline_step_ms", "cell_step_ms", "same_tokens", "cell_tokens"}], "baseline_median_ms",
    "cell_median_ms" (the means of the per-text medians), "speedup" (sum of baseline medians / sum of cell medians),
    "speedup_ci" (95% bootstrap over texts), "baseline_tokens_per_s", "cell_tokens_per_s",
    "continuation_ppl_change_pct" (:func:`continuation_ppl_change`; per article "baseline_exact_nll" / "cell_exact_nll"),
    "forced_ppl_change_pct" (the prompt's last ``steps`` tokens through each side's decode path; per article
    "baseline_forced_nll" / "cell_forced_nll"; decode_served counts these steps too),
    "load_avg_1min"}."""
    import collections
    import os

    from tqdm import tqdm

    from ... import current_plan, unpatch_model
    from ...validation import check_decode
    from .results import append_jsonl, read_jsonl

    baseline_cache = baseline_cache or cell_cache
    names = (DECODE_CACHE_NAMES[cell_cache], DECODE_CACHE_NAMES[baseline_cache])
    resolved = check_decode(decode_method, decode_params)  # an unknown method or parameter fails before any prefill
    patched_setting = {"decode_method": decode_method, "decode_params": resolved}
    unpatched_setting = {"decode_method": None, "decode_params": {}}

    def setting(cell: Any) -> dict:
        return unpatched_setting if cell.is_baseline else patched_setting

    done = {(r["key"], decode_setting(r)) for path in {*other_results, out_path} for r in read_jsonl(path)
            if r.get("kind") == "decode" and r.get("decode_tokens") == steps and (r.get("cache"), r.get("baseline_cache")) == names}
    todo = sorted((c for c in cells if (c.key, decode_setting(setting(c))) not in done),
                  key=lambda c: c.tokens)  # stable: baselines stay first
    prepared = None
    measured_order: Optional[list[int]] = None
    retrieval_order: Optional[list[int]] = None
    new = []
    for cell in tqdm(todo, desc="decode", unit="cell", disable=not progress):
        if prepare_tokens is not None and prepared != cell.tokens:
            prepare_tokens(cell.tokens)
            prepared = cell.tokens
        if cell.select == "measured" and measured_order is None and measured_order_for is not None:
            measured_order = list(measured_order_for())
        if cell.select == "retrieval" and retrieval_order is None and retrieval_order_for is not None:
            retrieval_order = list(retrieval_order_for())
        counts = {"served": 0, "decode_served": 0, "fallbacks": collections.Counter(), "layer_decode": {}}
        enter = exit_ = None
        if not cell.is_baseline:
            def enter(cell=cell) -> None:
                _patch_for(model, cell, method_params or {}, measured_order,
                           {"decode_method": decode_method, "decode_params": decode_params}, retrieval_order)

            def exit_() -> None:  # the counts of the plan of this text, then unpatch
                plan = current_plan(model)
                for i in plan.patched_layers:
                    counts["served"] += plan.layer(i).served
                    counts["decode_served"] += plan.layer(i).decode_served
                counts["fallbacks"].update(plan.fallback_counts())
                counts["layer_decode"] = dict(collections.Counter(str(plan.layer(i).decode_method)
                                                                  for i in plan.patched_layers))
                unpatch_model(model)
        load_before = os.getloadavg()[0]
        per_article = []
        for i, (title, ids) in enumerate(texts_for(cell.tokens)):
            r = compare_decode(model, ids, steps, baseline_cache=baseline_cache, cell_cache=cell_cache,
                               enter_cell=enter, exit_cell=exit_, cell_first=i % 2 == 1)
            per_article.append({"title": title, "baseline_ms": r["baseline"]["median_ms"], "cell_ms": r["cell"]["median_ms"],
                                "baseline_step_ms": r["baseline"]["step_ms"], "cell_step_ms": r["cell"]["step_ms"],
                                "same_tokens": r["same_tokens"], "cell_tokens": r["cell"]["tokens"],
                                "baseline_exact_nll": r["exact_nll"]["baseline"], "cell_exact_nll": r["exact_nll"]["cell"],
                                "baseline_forced_nll": r["forced_nll"]["baseline"],
                                "cell_forced_nll": r["forced_nll"]["cell"]})
        base = [a["baseline_ms"] for a in per_article]
        mine = [a["cell_ms"] for a in per_article]
        record = {"kind": "decode", "key": cell.key, "method": cell.method, "tokens": cell.tokens, "layers": cell.layers,
                  "select": cell.select, "seed": cell.seed, "decode_tokens": steps, "cache": names[0],
                  "baseline_cache": names[1], **setting(cell), "served": counts["served"],
                  "decode_served": counts["decode_served"], "fallbacks": dict(counts["fallbacks"]),
                  "layer_decode": counts["layer_decode"], "per_article": per_article,
                  "baseline_median_ms": sum(base) / len(base), "cell_median_ms": sum(mine) / len(mine),
                  "speedup": sum(base) / sum(mine), "speedup_ci": list(ratio_interval(base, mine)),
                  "baseline_tokens_per_s": 1e3 * len(base) / sum(base), "cell_tokens_per_s": 1e3 * len(mine) / sum(mine),
                  "continuation_ppl_change_pct": continuation_ppl_change(per_article),
                  "forced_ppl_change_pct": continuation_ppl_change(per_article, "forced"),
                  "load_avg_1min": [load_before, os.getloadavg()[0]]}
        append_jsonl(out_path, record)
        new.append(record)
    return new
