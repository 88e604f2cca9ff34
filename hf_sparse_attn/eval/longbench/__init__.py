"""LongBench / LongBench-E evaluation (official scoring reproduced exactly) and the offline long-context suite.

- ``tasks``: the task table (metric, category, output length, template, chat-template and first-line rules).
- ``metrics``: the official metrics; ``score``: task / bucket / category scores and reports.
- ``data``: reading the released JSONL / data.zip / parquet / a datasets id.
- ``predict``: prompt building, middle truncation, greedy decoding, crash-safe resumable sharded output.
- ``offline``: LongBench-format tasks built from real text shipped in packages.
The ``longbench``, ``longbench-score`` and ``longbench-grid`` commands are ``hf_sparse_attn/commands/longbench.py``,
``longbench_score.py`` and ``longbench_grid.py``.
"""

from .metrics import METRICS, get_metric
from .score import comparison_table, length_bucket, sample_score, score_directory, score_task, score_task_e, summarize
from .tasks import LONGBENCH_E_TASKS, LONGBENCH_TASKS, TASKS, TaskSpec, get_task

__all__ = [
    "METRICS", "get_metric", "comparison_table", "length_bucket", "sample_score", "score_directory", "score_task",
    "score_task_e", "summarize", "LONGBENCH_E_TASKS", "LONGBENCH_TASKS", "TASKS", "TaskSpec", "get_task",
]
