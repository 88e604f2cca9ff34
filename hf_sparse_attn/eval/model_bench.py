"""The model-level benchmark under its older module path: every name lives in :mod:`hf_sparse_attn.eval.bench`
(measure, grid, store, report, goals) and is importable from here too."""

from __future__ import annotations

from .bench.goals import evaluate_goals
from .bench.grid import (
    SELECTIONS,
    Cell,
    _patch_for,  # noqa: F401
    article_token_sets,
    baseline_cell,
    build_grid,
    new_run_info,
    run_cell,
    run_grid,
    selection_order_measured,
)
from .bench.measure import (
    ATTENTION_MODULE_LABEL,
    SDPA_OP,
    amdahl_ceiling,
    decoder_and_head,
    perplexity,
    prefill_and_nll,
    profile_attention_share,
)
from .bench.measure import decoder_and_head as _decoder_and_head  # noqa: F401
from .bench.report import (
    SELECTION_ORDER,
    article_change_pct,
    model_report_markdown,
    selection_comparison,
    selections_by_layer_count,
    summarize,
    write_model_results,
)
from .bench.store import (
    append_jsonl,
    finished_keys,
    latest_cells,
    latest_profiles,
    read_jsonl,
)

__all__ = ["decoder_and_head", "prefill_and_nll", "perplexity", "ATTENTION_MODULE_LABEL", "SDPA_OP", "profile_attention_share", "amdahl_ceiling", "SELECTIONS", "Cell", "baseline_cell", "build_grid", "article_token_sets", "selection_order_measured", "run_cell", "new_run_info", "run_grid", "read_jsonl", "append_jsonl", "finished_keys", "latest_cells", "latest_profiles", "SELECTION_ORDER", "article_change_pct", "summarize", "selection_comparison", "selections_by_layer_count", "model_report_markdown", "write_model_results", "evaluate_goals"]
