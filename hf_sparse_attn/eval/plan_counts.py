"""The served / fallback counts of a patched run directory, kept per sample next to its predictions.

A patched model counts, per layer, the prefill calls its method served, the calls that fell back to exact attention
(per reason) and the calls against a KV cache its decode method served (:class:`hf_sparse_attn.plan.LayerPlan`).
Those counters live in one process and start when it patches the model, so they cannot describe a run that was
resumed (several invocations) or sharded (several processes). Instead each process appends, for every sample it
predicts, what the counters grew by during that sample to ``plan_counts.ndjson`` in the output directory: one line
``{"task", "id", "layers": {layer_idx: {"served", "decode_served", "fallbacks", "decode_fallbacks"}}}`` per sample, appended with
:func:`hf_sparse_attn.eval.store.append_record` (one write under a lock: processes sharing the file never interleave).
JSON Lines like the predictions, but not named ``.jsonl``: readers of a directory take those for prediction files.

The counts of a run are the sums over the samples that have a prediction in the directory, each sample's last line
(a sample lost by a kill and predicted again counts once): an invocation that predicts nothing adds nothing, and a
line whose prediction was never written (a kill in between) counts nothing.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Iterable

__all__ = ["COUNTS_FILE", "SampleCounts", "layer_counts", "run_plan", "plan_counts"]

COUNTS_FILE = "plan_counts.ndjson"


def layer_counts(plan) -> dict[str, dict]:
    """{layer_idx (as a string, the JSON key): {"served", "decode_served", "fallbacks", "decode_fallbacks"}} of the
    plan's patched layers: their counters now."""
    return {str(layer.layer_idx): {"served": layer.served, "decode_served": layer.decode_served,
                                   "fallbacks": dict(layer.fallbacks), "decode_fallbacks": dict(layer.decode_fallbacks)}
            for layer in plan.layers if layer.patched}


def _grown(now: dict[str, dict], before: dict[str, dict]) -> dict[str, dict]:
    """What the counters ``now`` grew by since ``before`` (layers and reasons that did not grow left out)."""
    out = {}
    for idx, counts in now.items():
        old = before.get(idx, {"served": 0, "decode_served": 0, "fallbacks": {}, "decode_fallbacks": {}})
        grown = {"served": counts["served"] - old["served"],
                 "decode_served": counts["decode_served"] - old["decode_served"]}
        for key in ("fallbacks", "decode_fallbacks"):
            grown[key] = {r: n - old[key].get(r, 0) for r, n in counts[key].items() if n != old[key].get(r, 0)}
        if grown["served"] or grown["decode_served"] or grown["fallbacks"] or grown["decode_fallbacks"]:
            out[idx] = grown
    return out


class SampleCounts:
    """The per-sample counts of one process: :meth:`record` after each sample appends what ``plan``'s counters grew by
    since the previous one (or since this object was made) to ``plan_counts.ndjson`` of ``out_dir``."""

    def __init__(self, plan, out_dir: str) -> None:
        self.plan = plan
        self.path = os.path.join(out_dir, COUNTS_FILE)
        self.last = layer_counts(plan)

    def record(self, task: str, sample_id: Any) -> None:
        from .store import append_record

        now = layer_counts(self.plan)
        append_record(self.path, {"task": task, "id": sample_id, "layers": _grown(now, self.last)}, ensure_ascii=False)
        self.last = now


def _key(task: str, sample_id: Any) -> tuple[str, str]:
    return task, json.dumps(sample_id, sort_keys=True)


def run_plan(plan, out_dir: str, predictions: dict[str, Iterable[Any]]) -> tuple[Any, int]:
    """(a copy of ``plan`` whose layer counters are the sums over the samples ``predictions`` ({task: sample ids},
    the predictions in ``out_dir``), the number of those samples that have counts). Samples without a line (predicted
    unpatched, or by a version that kept no counts) add nothing."""
    from .store import read_records

    wanted = {_key(task, i) for task, ids in predictions.items() for i in ids}
    last: dict[tuple[str, str], dict] = {}
    for line in read_records(os.path.join(out_dir, COUNTS_FILE)):
        if isinstance(line, dict) and _key(line.get("task"), line.get("id")) in wanted:
            last[_key(line["task"], line["id"])] = line
    total = copy.deepcopy(plan)
    total.reset_counts()
    by_idx = {str(layer.layer_idx): layer for layer in total.layers}
    for line in last.values():
        for idx, grown in line["layers"].items():
            layer = by_idx.get(idx)
            if layer is None:
                continue
            layer.served += grown["served"]
            layer.decode_served += grown["decode_served"]
            for reason, n in grown["fallbacks"].items():
                layer.fallbacks[reason] = layer.fallbacks.get(reason, 0) + n
            for reason, n in grown.get("decode_fallbacks", {}).items():
                layer.decode_fallbacks[reason] = layer.decode_fallbacks.get(reason, 0) + n
    return total, len(last)


def plan_counts(plan) -> dict:
    """The served / fallback counts of the plan's patched layers: ``served`` and ``prefill_calls`` (prefill calls),
    ``fallbacks`` (reason -> prefill calls, most first), the calls against the KV cache counted apart:
    ``decode_served`` (by the decode method), ``decode_steps_exact`` (run by exact attention) and
    ``decode_fallbacks`` (reason -> those calls), and ``patched_layers``."""
    from ..patches.base import DECODE_REASON

    served = sum(layer.served for layer in plan.layers if layer.patched)
    fallbacks: dict[str, int] = {}
    decode_fallbacks: dict[str, int] = {}
    for layer in plan.layers:
        if layer.patched:
            for reason, n in layer.fallbacks.items():
                fallbacks[reason] = fallbacks.get(reason, 0) + n
            for reason, n in layer.decode_fallbacks.items():
                decode_fallbacks[reason] = decode_fallbacks.get(reason, 0) + n
    if DECODE_REASON in fallbacks:  # a plan written before calls against the cache were counted apart
        decode_fallbacks[DECODE_REASON] = decode_fallbacks.get(DECODE_REASON, 0) + fallbacks.pop(DECODE_REASON)
    return {"served": served, "prefill_calls": served + sum(fallbacks.values()),
            "fallbacks": dict(sorted(fallbacks.items(), key=lambda kv: -kv[1])),
            "decode_served": sum(layer.decode_served for layer in plan.layers if layer.patched),
            "decode_steps_exact": sum(decode_fallbacks.values()),
            "decode_fallbacks": dict(sorted(decode_fallbacks.items(), key=lambda kv: -kv[1])),
            "patched_layers": list(plan.patched_layers)}
