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

The package, by job: :mod:`.measure` (one sequence: prefill time, loss, profile), :mod:`.grid` (the cells, their
texts, running them), :mod:`.results` (the results file), :mod:`.report` (summaries, results.json / results.md /
plots) and :mod:`.goals` (the goals of an experiment config, checked in the report). The kernel level:
:mod:`.kernel_timing` (one method against SDPA on random inputs) and :mod:`.kernel_suite` (the suite of
``bench kernel``). The command is ``hf_sparse_attn/commands/bench.py``.
"""

from __future__ import annotations

from .goals import evaluate_goals
from .grid import (
    SELECTIONS,
    Cell,
    article_token_sets,
    baseline_cell,
    build_grid,
    new_run_info,
    run_cell,
    run_grid,
    selection_order_measured,
    shard_cells,
)
from .measure import (
    ATTENTION_MODULE_LABEL,
    SDPA_OP,
    amdahl_ceiling,
    decoder_and_head,
    perplexity,
    prefill_and_nll,
    profile_attention_share,
)
from .report import (
    SELECTION_ORDER,
    article_change_pct,
    model_report_markdown,
    selection_comparison,
    selections_by_layer_count,
    summarize,
    write_model_results,
)
from .results import (
    append_jsonl,
    finished_keys,
    latest_cells,
    latest_profiles,
    read_jsonl,
    read_results,
    results_files,
    shard_results_file,
)

__all__ = ["decoder_and_head", "prefill_and_nll", "perplexity", "ATTENTION_MODULE_LABEL", "SDPA_OP", "profile_attention_share", "amdahl_ceiling", "SELECTIONS", "Cell", "baseline_cell", "build_grid", "article_token_sets", "selection_order_measured", "run_cell", "new_run_info", "run_grid", "shard_cells", "read_jsonl", "read_results", "results_files", "shard_results_file", "append_jsonl", "finished_keys", "latest_cells", "latest_profiles", "SELECTION_ORDER", "article_change_pct", "summarize", "selection_comparison", "selections_by_layer_count", "model_report_markdown", "write_model_results", "evaluate_goals"]
