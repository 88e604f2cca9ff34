"""`hf-sparse-attn plan show FILE` and `hf-sparse-attn plan diff FILE_A FILE_B`: read saved plans (``plan.save``).

``show`` prints the plan as ``print(plan)`` does, then its served / fallback call counts (what the run that saved
it measured). ``diff`` names what makes two plans run differently: the model they were made for, the seed, the
layers, and per layer the method and each parameter. It exits 1 when they differ, 0 when they run the same
(a different ``created`` date, library versions or call counts are mentioned, not counted).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

# plan-level fields that change what runs (select and norm only choose the layers, which are compared one by one)
RUN_FIELDS = ("model_class", "model_fingerprint", "seed")
NOTE_FIELDS = ("method", "select", "norm", "adapter", "created", "versions", "calibration")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "diff exits 0 when the plans run the same, 1 when they differ, 2 when a file cannot be read."
    sub = parser.add_subparsers(dest="plan_command", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print a saved plan and its served / fallback counts",
                          description="print a saved plan as print(plan) does, and its served / fallback counts")
    show.add_argument("file", metavar="FILE", help="a plan JSON written by plan.save(path) or a command's --plan-out")
    diff = sub.add_parser("diff", help="the layers, methods and parameters in which two plans differ",
                          description="the layers, methods and parameters in which two plans differ; exit status 1 "
                                      "when they differ, 0 when they run the same")
    diff.add_argument("file_a", metavar="FILE_A")
    diff.add_argument("file_b", metavar="FILE_B")


def _load(path: str):
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no such plan file (write one with plan.save(path), or `hf-sparse-attn demo "
                         "--plan-out FILE`)")
    from ..plan import PatchPlan

    return PatchPlan.load(path)


def counts_report(plan) -> str:
    """'calls served: 30 in 15 layers; fell back to exact attention: 2 (short: 2)' (the counts the plan recorded)."""
    served = sum(layer.served for layer in plan.layers)
    serving = sum(1 for layer in plan.layers if layer.served)
    fallbacks = plan.fallback_counts()
    total = sum(fallbacks.values())
    reasons = "; ".join(f"{reason}: {n}" for reason, n in sorted(fallbacks.items(), key=lambda item: -item[1]))
    line = (f"calls served by the method: {served} (in {serving} of {len(plan.patched_layers)} patched layers); "
            f"fell back to exact attention: {total}" + (f" ({reasons})" if reasons else ""))
    decode_served = sum(layer.decode_served for layer in plan.layers)
    if decode_served:
        line += f"; calls against the KV cache served by the decode method: {decode_served}"
    if served == 0 and total == 0 and decode_served == 0:
        line += " — the plan was saved before any forward pass, or its counts were reset"
    return line


def _value(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if not isinstance(value, str) else value


def plan_differences(a, b) -> tuple[list[str], list[str]]:
    """(differences that change what runs, other differences) between two PatchPlans, as lines."""
    runs: list[str] = []
    for field in RUN_FIELDS:
        va, vb = getattr(a, field), getattr(b, field)
        if va != vb:
            if field == "model_fingerprint":
                keys = sorted(k for k in set(va) | set(vb) if va.get(k) != vb.get(k))
                runs.append(f"model_fingerprint: made for different weights (differs in {', '.join(keys)})")
            else:
                runs.append(f"{field}: {_value(va)} -> {_value(vb)}")
    layers_a = {layer.layer_idx: layer for layer in a.layers}
    layers_b = {layer.layer_idx: layer for layer in b.layers}
    for idx in sorted(set(layers_a) | set(layers_b)):
        la, lb = layers_a.get(idx), layers_b.get(idx)
        if la is None or lb is None:
            present = lb if la is None else la
            runs.append(f"layer {idx}: only in {'B' if la is None else 'A'} (method {present.method or '-'})")
            continue
        if la.method != lb.method:
            runs.append(f"layer {idx}: method {la.method or '-'} -> {lb.method or '-'}")
            continue
        if la.patched and la.params != lb.params:
            changed = []
            for name in sorted(set(la.params) | set(lb.params)):
                pa, pb = la.params.get(name, "(unset)"), lb.params.get(name, "(unset)")
                if name not in la.params or name not in lb.params or pa != pb:
                    changed.append(f"{name}: {_value(pa)} -> {_value(pb)}")
            runs.append(f"layer {idx} ({la.method}): params {'; '.join(changed)}")
    notes = [field for field in NOTE_FIELDS if getattr(a, field) != getattr(b, field)]
    if any((la.served, la.fallbacks, la.decode_served, la.decode_fallbacks)
           != (layers_b[i].served, layers_b[i].fallbacks, layers_b[i].decode_served, layers_b[i].decode_fallbacks)
           for i, la in layers_a.items() if i in layers_b):
        notes.append("served / fallback counts")
    return runs, notes


def run(args: argparse.Namespace) -> int:
    if args.plan_command == "show":
        plan = _load(args.file)
        print(plan)
        print(counts_report(plan))
        return 0
    a, b = _load(args.file_a), _load(args.file_b)
    runs, notes = plan_differences(a, b)
    print(f"A: {args.file_a}\nB: {args.file_b}")
    for line in runs:
        print(f"  {line}")
    note = f" (they also differ in: {', '.join(notes)}, which does not change what runs)" if notes else ""
    if runs:
        print(f"{len(runs)} difference(s) in what runs{note}")
        return 1
    print(f"the plans run the same: same layers, methods and parameters{note}")
    return 0
