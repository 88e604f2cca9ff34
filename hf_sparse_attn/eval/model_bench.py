"""The model-level benchmark under its older module path: every name lives in :mod:`hf_sparse_attn.eval.bench`
(measure, grid, store, report, goals) and is importable from here too."""

from __future__ import annotations

from .bench import *  # noqa: F401,F403
from .bench import __all__  # noqa: F401
from .bench.grid import _patch_for  # noqa: F401
from .bench.measure import decoder_and_head as _decoder_and_head  # noqa: F401
