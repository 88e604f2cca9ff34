"""Model-level benchmark: prefill time and perplexity of a patched causal LM, per method x replaced layers x selection.

What is measured, for one configuration ("cell": method, tokens N, number of replaced layers, selection, seed):

* perplexity = exp(sum of natural-log next-token losses / number of scored tokens), summed over the same
  articles, each cut to its first N tokens, so every cell of one N scores the identical token set (N - 1 tokens per
  article). The loss is computed from the final hidden states through the LM head in chunks of rows
  (:func:`prefill_and_nll`), never materializing [N, vocab] logits at once (8k tokens x 49k vocab = 1.6 GB);
* prefill time = wall time of the base model's forward over the N tokens (no cache, no LM head: what a serving
  prefill costs before the first token's logits), summed over the articles;
* speed-up = the exact baseline's prefill time (0 layers replaced) measured *in the same run* (the same process,
  minutes apart, see ``run_id``) divided by the cell's prefill time. A resumed run measures its own baseline again;
* attention's share of the exact prefill, from ``torch.profiler``: the time inside
  ``aten::scaled_dot_product_attention`` (the part a method replaces) and inside the attention modules (with the
  Q/K/V/O projections and RoPE, which stay), each over the profiled forward's wall time. Replacing k of L layers
  by an infinitely fast method can at best give the Amdahl ceiling 1 / (1 - share * k / L).

Results are JSON lines: one per finished article of a patched cell and one per finished cell, flushed at once, so a
crash loses at most the article in progress. Given the same file again, a cell is skipped when its record covers every
requested article; a cell run on fewer articles (say 8 before ``--articles 20``) is extended: its articles are reused
and only the missing ones computed (resume).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import time
import uuid
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

SELECTIONS = ("weight_norm", "last", "first", "measured", "random")


# ---------------------------------------------------------------------------------------------------------
# Scoring one sequence
# ---------------------------------------------------------------------------------------------------------

def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    decoder = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or decoder is model or head is None:
        raise TypeError(f"{type(model).__name__} is not a causal LM with a base model and an LM head "
                        "(e.g. LlamaForCausalLM); the model benchmark needs next-token logits")
    return decoder, head


@torch.no_grad()
def prefill_and_nll(model: torch.nn.Module, input_ids: torch.Tensor, loss_chunk: int = 1024) -> tuple[float, int, float]:
    """(sum of natural-log next-token losses over the N - 1 predicted tokens, N - 1, prefill seconds).

    input_ids [1, N]. The prefill (timed) is the base model's forward; the losses come from the LM head applied to
    ``loss_chunk`` rows of hidden states at a time (untimed), in float32. For models whose logits are the plain
    LM-head projection of the last hidden state (Llama, Mistral, Qwen2, GPT-2, GLM; not models with logit
    soft-capping), this equals cross_entropy(model(input_ids).logits[0, :-1], input_ids[0, 1:], reduction="sum").
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [1, N] with N >= 2; got {tuple(input_ids.shape)}")
    decoder, head = _decoder_and_head(model)
    start = time.perf_counter()
    hidden = decoder(input_ids=input_ids, use_cache=False).last_hidden_state  # [1, N, hidden]
    seconds = time.perf_counter() - start
    n = input_ids.shape[1]
    nll = 0.0
    for s in range(0, n - 1, loss_chunk):
        e = min(n - 1, s + loss_chunk)
        logits = head(hidden[0, s:e]).float()  # [e - s, vocab]
        nll += torch.nn.functional.cross_entropy(logits, input_ids[0, s + 1 : e + 1], reduction="sum").item()
    return nll, n - 1, seconds


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean natural-log loss). Natural log throughout: not 2**loss (the public HyperAttention script's slip)."""
    if tokens <= 0:
        raise ValueError("no tokens were scored")
    return math.exp(nll_sum / tokens)


# ---------------------------------------------------------------------------------------------------------
# Attention's share of prefill (torch.profiler) and the Amdahl ceiling
# ---------------------------------------------------------------------------------------------------------

ATTENTION_MODULE_LABEL = "hf_sparse_attn::attention_module"
SDPA_OP = "aten::scaled_dot_product_attention"


@torch.no_grad()
def profile_attention_share(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, float]:
    """Profile one prefill of ``model`` (run it unpatched: the attention op is SDPA) with ``torch.profiler``.

    Returns {"wall_s", "sdpa_s", "attention_module_s", "sdpa_share", "attention_module_share", "sdpa_calls",
    "attention_module_calls"}: time inside ``aten::scaled_dot_product_attention`` and inside the attention
    modules (each module forward wrapped in a ``record_function`` through hooks) over the forward's wall time.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    from ..patches import find_adapter

    decoder, _ = _decoder_and_head(model)
    modules = find_adapter(model).attention_layers(model)
    open_ranges: list[Any] = []

    def pre_hook(_module, _args):
        ctx = record_function(ATTENTION_MODULE_LABEL)
        ctx.__enter__()
        open_ranges.append(ctx)

    def post_hook(_module, _args, _out):
        open_ranges.pop().__exit__(None, None, None)

    handles = [m.register_forward_pre_hook(pre_hook) for m in modules] + [m.register_forward_hook(post_hook) for m in modules]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            decoder(input_ids=input_ids, use_cache=False)
            wall = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    totals = {SDPA_OP: [0.0, 0], ATTENTION_MODULE_LABEL: [0.0, 0]}
    for event in prof.key_averages():
        if event.key in totals:
            totals[event.key][0] += event.cpu_time_total / 1e6  # microseconds -> seconds
            totals[event.key][1] += event.count
    sdpa_s, sdpa_calls = totals[SDPA_OP]
    module_s, module_calls = totals[ATTENTION_MODULE_LABEL]
    return {"wall_s": wall, "sdpa_s": sdpa_s, "attention_module_s": module_s, "sdpa_share": sdpa_s / wall,
            "attention_module_share": module_s / wall, "sdpa_calls": int(sdpa_calls), "attention_module_calls": int(module_calls)}


def amdahl_ceiling(share: float, replaced_layers: int, num_layers: int) -> float:
    """Best possible speed-up when ``replaced_layers`` of ``num_layers`` equal layers lose their attention time
    entirely: 1 / (1 - share * replaced / num_layers), ``share`` = attention's fraction of the whole prefill."""
    if not 0.0 <= share < 1.0 or not 0 <= replaced_layers <= num_layers:
        raise ValueError(f"need 0 <= share < 1 and 0 <= replaced_layers <= num_layers; got {share}, {replaced_layers}, {num_layers}")
    return 1.0 / (1.0 - share * replaced_layers / num_layers)


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


# ---------------------------------------------------------------------------------------------------------
# Texts
# ---------------------------------------------------------------------------------------------------------

def article_token_sets(tokenizer: Any, tokens: int, num_articles: int, articles: Optional[Sequence[tuple[str, str]]] = None,
                       skip_titles: Iterable[str] = ()) -> list[tuple[str, torch.Tensor]]:
    """The first ``num_articles`` articles (corpus order) with at least ``tokens`` tokens, each cut to its first
    ``tokens`` tokens: list of (title, input_ids [1, tokens]). Default corpus: :func:`wikipedia_articles`."""
    if articles is None:
        from .data import wikipedia_articles

        articles = wikipedia_articles(min_chars=tokens)  # >= 1 char per token for these texts
    skip = set(skip_titles)
    chosen = []
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
# Results file (JSONL, one line per finished cell)
# ---------------------------------------------------------------------------------------------------------

def read_jsonl(path: str) -> list[dict]:
    """Every complete JSON line of ``path`` (a line cut by a crash is ignored); [] if the file does not exist."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def append_jsonl(path: str, record: dict) -> None:
    """Append one record as one line, in a single ``write`` to a file opened with ``O_APPEND``, then fsync: two bench
    processes (one per core, different cells) can share one results file without interleaving their lines."""
    data = (json.dumps(record) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def finished_keys(records: Iterable[dict], titles_for: Optional[Callable[[int], Sequence[str]]] = None) -> set[str]:
    """Keys of the finished cells. With ``titles_for`` (N -> the requested article titles), only the cells whose
    latest record covers every requested article of its N count as finished."""
    cells = latest_cells(records)
    if titles_for is None:
        return set(cells)
    return {k for k, c in cells.items()
            if set(titles_for(c["tokens"])) <= {a["title"] for a in c.get("per_article", [])}}


# ---------------------------------------------------------------------------------------------------------
# Running cells
# ---------------------------------------------------------------------------------------------------------

def selection_order_measured(model: torch.nn.Module, calibration_ids: torch.Tensor) -> list[int]:
    """Layer order of ``select="measured"``: most (k, eps)-sparse first on ``calibration_ids`` [1, N], from
    :func:`hf_sparse_attn.eval.sparsity.measured_sparsity_scores` (computed once, reused by every cell)."""
    from ..selection import rank_layers, selection_order
    from .sparsity import measured_sparsity_scores

    scores = measured_sparsity_scores(model, calibration_ids)
    return selection_order(rank_layers(model), "measured", measured_scores=scores)


def _patch_for(model: torch.nn.Module, cell: Cell, method_params: dict, measured_order: Optional[list[int]]):
    from .. import patch_model

    params = dict(method_params.get(cell.method, {}))
    if cell.select == "measured":
        if measured_order is None:
            raise ValueError("select 'measured' needs the measured sparsity order (calibration text)")
        return patch_model(model, method=cell.method, layers=cell.layers, select=measured_order, seed=cell.seed, **params)
    return patch_model(model, method=cell.method, layers=cell.layers, select=cell.select, seed=cell.seed, **params)


def run_cell(model: torch.nn.Module, cell: Cell, texts: Sequence[tuple[str, torch.Tensor]], *,
             method_params: Optional[dict[str, dict]] = None, measured_order: Optional[list[int]] = None,
             scorer: Callable[..., tuple[float, int, float]] = prefill_and_nll,
             done_articles: Optional[dict[str, dict]] = None,
             on_article: Optional[Callable[[dict], None]] = None) -> dict:
    """Run one cell on every text (the model is patched for the cell and unpatched after). Returns the record
    (without the run fields: see :func:`run_grid`).

    ``done_articles``: title -> article record (``{"title", "nll_sum", "tokens", "prefill_s", ...}``) finished by an
    earlier, interrupted run of this cell: reused, not recomputed. ``on_article`` is called with each newly
    computed article record (``run_grid`` appends it to the results file, so a crash loses at most one article)."""
    from .. import unpatch_model

    for _, ids in texts:
        if ids.shape[1] != cell.tokens:
            raise ValueError(f"a text has {ids.shape[1]} tokens; cell {cell.key} needs {cell.tokens}")
    plan = None if cell.is_baseline else _patch_for(model, cell, method_params or {}, measured_order)
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
    nll_sum = sum(a["nll_sum"] for a in per_article)
    tokens_scored = sum(a["tokens"] for a in per_article)
    record = {
        "kind": "cell", "key": cell.key, **dataclasses.asdict(cell),
        "perplexity": perplexity(nll_sum, tokens_scored), "nll_sum": nll_sum, "tokens_scored": tokens_scored,
        "articles": len(per_article), "prefill_s": sum(a["prefill_s"] for a in per_article), "per_article": per_article,
        "load_avg_1min": [load_before, os.getloadavg()[0]],
    }
    if plan is not None:
        record["patched_layers"] = plan.patched_layers
        record["params"] = plan.layer(plan.patched_layers[0]).params if plan.patched_layers else {}
        record["served"] = sum(plan.layer(i).served for i in plan.patched_layers)
        record["fallbacks"] = plan.fallback_counts()
    else:
        record["patched_layers"], record["params"], record["served"], record["fallbacks"] = [], {}, 0, {}
    return record


def new_run_info() -> dict:
    return {"run_id": uuid.uuid4().hex[:12], "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count()}


def run_grid(model: torch.nn.Module, cells: Sequence[Cell], texts_for: Callable[[int], Sequence[tuple[str, torch.Tensor]]],
             out_path: str, *, method_params: Optional[dict[str, dict]] = None,
             measured_order_for: Optional[Callable[[], list[int]]] = None, profile: bool = True,
             scorer: Callable[..., tuple[float, int, float]] = prefill_and_nll, progress: bool = True,
             run_info: Optional[dict] = None) -> list[dict]:
    """Run every cell not yet in ``out_path`` and append its record. Returns all records of the file afterwards.

    For each N with cells left to do, the exact baseline is measured first in this run (again, if an earlier run
    already has it: a speed-up is only computed against a baseline of the same run) and, with ``profile``, one
    profiled exact prefill of the first text gives attention's share. Each cell record carries ``run_id``,
    ``baseline_prefill_s`` (this run's) and ``speedup`` = baseline_prefill_s / prefill_s.

    Every finished article of a patched cell is appended at once (``"kind": "article"``); a rerun after a crash
    reuses them, so it loses at most the article in flight. The speed-up of a cell finished across two runs is
    then taken over the articles timed in this run, against this run's baseline times of the same articles.
    """
    from tqdm import tqdm

    run_info = dict(run_info or new_run_info())
    run_id = run_info["run_id"]
    previous = read_jsonl(out_path)
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
    bar = tqdm(total=len(todo), desc="model bench", unit="cell", disable=not progress)
    warmed = False
    for n in sorted({c.tokens for c in todo}):
        texts = texts_by_n[n]
        if not warmed:  # the first forward of a process pays one-time costs: keep them out of the baseline
            scorer(model, texts[0][1][:, : min(512, n)])
            warmed = True
        base = baseline_cell(n)
        # the baseline is timed in this run on every article a patched cell will time in this run (and on the
        # articles it lacks); its other articles are reused from the earlier record
        to_time = {t for c in todo if c.tokens == n and not c.is_baseline for t, _ in texts if t not in partial.get(c.key, {})}
        earlier_base = previous_cells.get(base.key)
        base_reuse = {a["title"]: a for a in (earlier_base or {}).get("per_article", []) if a["title"] not in to_time}
        bar.set_postfix_str(f"{base.key} ({len(texts) - len(base_reuse)} articles to time)")
        record = run_cell(model, base, texts, scorer=scorer, done_articles=base_reuse,
                          on_article=lambda a, key=base.key: bar.set_postfix_str(f"{key} article {a['title'][:20]}"))
        record["run_id"] = run_id
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
        for cell in [c for c in todo if c.tokens == n and not c.is_baseline]:
            bar.set_postfix_str(cell.key)
            if cell.select == "measured" and measured_order is None:
                if measured_order_for is None:
                    raise ValueError("a 'measured' cell needs measured_order_for (calibration)")
                measured_order = list(measured_order_for())
            def on_article(article: dict, key: str = cell.key) -> None:
                append_jsonl(out_path, {"kind": "article", "key": key, "run_id": run_id, **article})
                bar.set_postfix_str(f"{key} article {article['title'][:20]}")

            record = run_cell(model, cell, texts, method_params=method_params, measured_order=measured_order, scorer=scorer,
                              done_articles=partial.get(cell.key), on_article=on_article)
            base_times = {a["title"]: a["prefill_s"] for a in baselines[n]["per_article"] if not a.get("resumed")}
            timed_here = [a for a in record["per_article"] if not a.get("resumed")]
            base_s = sum(base_times[a["title"]] for a in timed_here)
            cell_s = sum(a["prefill_s"] for a in timed_here)
            record.update(run_id=run_id, baseline_prefill_s=base_s, articles_timed=len(timed_here), prefill_s_timed=cell_s,
                          speedup=base_s / cell_s if cell_s > 0 else None,
                          baseline_perplexity=baselines[n]["perplexity"])
            append_jsonl(out_path, record)
            bar.update(1)
    bar.close()
    return read_jsonl(out_path)


# ---------------------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------------------

def latest_cells(records: Iterable[dict]) -> dict[str, dict]:
    """key -> the last finished record of each cell."""
    out: dict[str, dict] = {}
    for r in records:
        if r.get("kind") == "cell":
            out[r["key"]] = r
    return out


def latest_profiles(records: Iterable[dict]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in records:
        if r.get("kind") == "profile":
            out[int(r["tokens"])] = r
    return out


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
    rows = []
    for c in cells.values():
        row = {k: c.get(k) for k in ("key", "method", "tokens", "layers", "select", "seed", "perplexity", "tokens_scored",
                                      "articles", "prefill_s", "baseline_prefill_s", "speedup", "run_id", "served", "fallbacks",
                                      "load_avg_1min", "params")}
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


SELECTION_ORDER = ("weight_norm", "last", "first", "measured", "random")


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


# ---------------------------------------------------------------------------------------------------------
# Goals of issue 7 and the markdown report
# ---------------------------------------------------------------------------------------------------------

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


def model_report_markdown(summary: dict, goals: Sequence[dict], *, header_lines: Sequence[str],
                          comparison: Sequence[dict] = (), comparison_plots: Optional[dict] = None) -> str:
    """results.md: header, goals, profile table, the article-by-article selection comparison, every cell,
    random-selection groups."""
    lines = list(header_lines) + ["", "## Goals (issue 7)", ""]
    for g in goals:
        lines.append(f"- **{g['status']}** — {g['method']}: {g['goal']}. {g['detail']}.")
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
    lines += ["", "## Every cell", "",
              "Perplexity = exp(mean natural-log loss) over the identical token set of each N; speed-up = this run's exact "
              "prefill time / the cell's (sums over the articles timed in the cell's run: 'prefill s' is that sum); median article change = the median over the articles of each "
              "article's own perplexity change; ceiling = Amdahl bound for that many layers; load = 1-minute "
              "load average of the machine before/after the cell (2 cores: above ~2 other jobs competed). 'articles' = scored "
              "(timed in the run of the speed-up): a cell extended to more articles in a later run is timed on the new ones; "
              "its change is against the exact model on its own articles.", "",
              "| N | method | layers | select | seed | perplexity | change | median article change | articles (timed) | tokens scored | prefill s | speed-up | ceiling | served | fallbacks | load |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        falls = "; ".join(f"{k}: {v}" for k, v in sorted((r.get("fallbacks") or {}).items())) or "-"
        lines.append(f"| {r['tokens']} | {r['method']} | {r['layers']} | {r['select']} | {r['seed']} | {r['perplexity']:.3f} | "
                     f"{_fmt(r['ppl_change_pct'], '+.1f')}% | {_fmt(r.get('median_article_change_pct'), '+.1f')}% | {r.get('articles')} ({r['articles_timed']}) | {r['tokens_scored']} | {r['prefill_s_timed']:.1f} | {_fmt(r['speedup'], '.2f')}x | "
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


def write_model_results(out_dir: str, num_layers: int, *, header_lines: Sequence[str], extra: Optional[dict] = None) -> dict:
    """From ``out_dir``/results.jsonl write results.json, results.md and the plots: one ppl-vs-speed-up PNG per N,
    one per-article heatmap per selection comparison, one change-vs-layers curve per (method, N) compared at two or
    more layer counts."""
    from .plots import plot_perplexity_vs_speedup, plot_selection_articles, plot_selections_vs_layers

    records = read_jsonl(os.path.join(out_dir, "results.jsonl"))
    summary = summarize(records, num_layers)
    comparison = selection_comparison(records)
    goals = evaluate_goals(summary, num_layers, comparison=comparison)
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
    result = {**(extra or {}), "runs": runs, "goals": goals, "plots": plots + list(comparison_plots.values()),
              "selection_comparison": comparison,
              "selections_by_layer_count": [{**o, "cells": [{"select": s, "layers": l, **c} for (s, l), c in o["cells"].items()]}
                                            for o in overviews], **summary}
    tmp = os.path.join(out_dir, "results.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "results.json"))
    md = model_report_markdown(summary, goals, header_lines=list(header_lines) + ([""] + [f"![{p}]({p})" for p in plots] if plots else []),
                               comparison=comparison, comparison_plots=comparison_plots)
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(md)
    return result
