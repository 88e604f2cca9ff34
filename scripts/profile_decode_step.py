"""Where a decode step's time goes: real SmolLM2-135M, one thread, single-token greedy steps after a long prompt.

For each context length (--contexts, tokens of one real Wikipedia article) the prompt is prefilled once (untimed)
into a ``DynamicCache``; its keys and values are copied into a fresh cache of each kind (--kinds: ``dynamic``, the
unpatched model with a ``DynamicCache``; ``growing``, the unpatched model with a :class:`hf_sparse_attn.GrowingCache`;
``exact_decode``, a copy of the model patched on every layer with the project's exact decode method, on a
``GrowingCache``), and --steps greedy single-token steps are timed on each, the
kinds alternating step by step (the same tokens: each step feeds the previous argmax; the 2-D attention mask of ones
grows by one each step, as ``generate()`` does). Every step is split with manual timers (perf_counter around the
wrapped call):

* attention: the attention function (all layers): transformers' ``sdpa`` (the KV heads stay grouped for an unmasked
  step), or ``hf_sparse_attn`` for the patched copy;
* cache append: ``cache.update`` (all layers; ``torch.cat`` of the whole layer for ``DynamicCache``);
* mask: ``create_causal_mask`` (once per step; for sdpa without padding it returns None without building a mask);
* LM head: the ``lm_head`` module (its projection to the vocabulary);
* the rest: the step's wall time minus those (projections, MLPs, norms, RoPE, Python).

Also one step per cache kind under ``torch.profiler``: the operators with the most self CPU time. The medians of the
steps are reported; differences between context lengths show which parts grow with the context.

Writes --out/{results.json, results.md}.

    taskset -c 1 .venv/bin/python scripts/profile_decode_step.py --out eval/results/decode_step_profile
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch

from hf_sparse_attn.eval.script_report import command_line, write_report

PARTS = ("attention", "cache_append", "mask", "lm_head")
KINDS = ("dynamic", "growing", "exact_decode")


class StepTimers:
    """Accumulates seconds per part while installed: wraps the sdpa attention function, the cache's update,
    ``create_causal_mask`` in the model's module and the LM head."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.depth: dict[str, int] = {}

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PARTS, 0.0)

    def _timed(self, part: str, fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.depth[part] = self.depth.get(part, 0) + 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth[part] -= 1
                if self.depth[part] == 0:  # the outermost call only: hf_sparse_attn may call sdpa inside
                    self.seconds[part] += time.perf_counter() - start

        return wrapper

    @contextlib.contextmanager
    def installed(self, cache: Any):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        module = sys.modules[type(self.model).__module__]
        original_mask = module.create_causal_mask
        from hf_sparse_attn.patches.attention_interface import ATTENTION_NAME, register_attention

        register_attention()
        originals = {name: ALL_ATTENTION_FUNCTIONS[name] for name in ("sdpa", ATTENTION_NAME)}
        for name, fn in originals.items():
            ALL_ATTENTION_FUNCTIONS[name] = self._timed("attention", fn)
        module.create_causal_mask = self._timed("mask", original_mask)
        cache.update = self._timed("cache_append", cache.update)  # instance attribute shadows the method
        head = self.model.get_output_embeddings()
        starts: list[float] = []
        pre = head.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))
        post = head.register_forward_hook(
            lambda *_: self.seconds.__setitem__("lm_head", self.seconds["lm_head"] + time.perf_counter() - starts.pop()))
        try:
            yield self
        finally:
            pre.remove()
            post.remove()
            del cache.update
            module.create_causal_mask = original_mask
            for name in originals:
                del ALL_ATTENTION_FUNCTIONS[name]  # back to the global entries


def copy_cache(source: Any, kind: str, config: Any) -> Any:
    """A fresh cache of ``kind`` holding copies of ``source``'s keys and values (the prefill, computed once)."""
    from transformers import DynamicCache

    from hf_sparse_attn import GrowingCache

    cache = DynamicCache(config=config) if kind == "dynamic" else GrowingCache(config)
    for i, layer in enumerate(source.layers):
        cache.update(layer.keys.clone(), layer.values.clone(), i)
    return cache


@torch.no_grad()
def profile_context(models: dict[str, torch.nn.Module], ids: torch.Tensor, steps: int) -> dict:
    """models: kind -> the model that steps that kind's cache (``exact_decode``: the patched copy)."""
    from transformers import DynamicCache

    from hf_sparse_attn.patches.decode_cache import cache_keyword

    kinds = tuple(models)
    model = models[kinds[0]]
    name = cache_keyword(model)
    prefill = DynamicCache(config=model.config)
    logits = model(input_ids=ids, use_cache=True, **{name: prefill}).logits
    first = logits[:, -1:].argmax(-1)
    state = {k: {"cache": copy_cache(prefill, "dynamic" if k == "dynamic" else "growing", model.config),
                 "token": first, "mask": torch.ones_like(ids), "steps": []} for k in kinds}
    del prefill, logits
    timers = {k: StepTimers(m) for k, m in models.items()}
    for step in range(steps + 1):  # step 0 is a warm-up, not recorded
        for kind in kinds:
            s = state[kind]
            s["mask"] = torch.cat([s["mask"], s["mask"].new_ones(1, 1)], dim=1)
            timers[kind].reset()
            with timers[kind].installed(s["cache"]):
                start = time.perf_counter()
                out = models[kind](input_ids=s["token"], attention_mask=s["mask"], use_cache=True, **{name: s["cache"]})
                wall = time.perf_counter() - start
            s["token"] = out.logits[:, -1:].argmax(-1)
            if step > 0:
                parts = {k: 1e3 * v for k, v in timers[kind].seconds.items()}
                s["steps"].append({"total_ms": 1e3 * wall, **{f"{k}_ms": v for k, v in parts.items()},
                                   "rest_ms": 1e3 * wall - sum(parts.values()), "token": int(s["token"])})
    result = {}
    for kind in kinds:
        s = state[kind]
        fields = ["total_ms", *[f"{p}_ms" for p in PARTS], "rest_ms"]
        result[kind] = {"median": {f: statistics.median(x[f] for x in s["steps"]) for f in fields},
                        "steps": s["steps"], "cache_length_after": s["cache"].get_seq_length(),
                        "top_ops": top_ops(models[kind], s, name)}
    result["same_tokens"] = len({tuple(x["token"] for x in state[k]["steps"]) for k in kinds}) == 1
    return result


@torch.no_grad()
def top_ops(model, s: dict, name: str, count: int = 12) -> dict:
    """One more step under torch.profiler: its wall time, the self CPU time of all operators together, and the
    ``count`` operators with the most self CPU time (ms)."""
    from torch.profiler import ProfilerActivity, profile

    s["mask"] = torch.cat([s["mask"], s["mask"].new_ones(1, 1)], dim=1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        out = model(input_ids=s["token"], attention_mask=s["mask"], use_cache=True, **{name: s["cache"]})
        wall = time.perf_counter() - start
    s["token"] = out.logits[:, -1:].argmax(-1)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return {"wall_ms": 1e3 * wall, "ops_self_ms": sum(e.self_cpu_time_total for e in events) / 1e3,
            "ops": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in events[:count]]}


def markdown(result: dict) -> str:
    lines = ["# Where a decode step's time goes: SmolLM2-135M, one thread", "",
             f"Machine: {result['machine']}; torch {result['torch']}, transformers {result['transformers']}, 1 thread. "
             f"Date: {result['date']}. Load average (1 min) before / after: {result['load_before']:.1f} / "
             f"{result['load_after']:.1f}.", f"Command: `{result['command']}`", "",
             f"Prompt: the first {max(result['contexts'])} tokens of the Wikipedia article '{result['article']}' (shorter "
             f"contexts: its first tokens), prefilled once, untimed. Median over {result['steps']} single-token greedy "
             "steps per cache kind (kinds alternating step by step; the 2-D mask of ones passed as generate() does). "
             "ms per token.", "",
             "| context | kind | total | attention | cache append | mask | LM head | rest |", "|---|---|---|---|---|---|---|---|"]
    for n in result["contexts"]:
        for kind in result["kinds"]:
            m = result["by_context"][str(n)][kind]["median"]
            lines.append(f"| {n} | {kind} | {m['total_ms']:.1f} | {m['attention_ms']:.1f} | {m['cache_append_ms']:.2f} | "
                         f"{m['mask_ms']:.3f} | {m['lm_head_ms']:.1f} | {m['rest_ms']:.1f} |")
    lines += ["", "Same greedy tokens from every kind at every context: "
              + str(all(result["by_context"][str(n)]["same_tokens"] for n in result["contexts"])) + ".", ""]
    for n in result["contexts"]:
        for kind in result["kinds"]:
            top = result["by_context"][str(n)][kind]["top_ops"]
            lines.append(f"One profiled step, context {n}, {kind}: {top['wall_ms']:.1f} ms wall, {top['ops_self_ms']:.1f} ms "
                         "in operators (the rest is Python); top operators by self CPU time (calls): "
                         + ", ".join(f"{o['op']} {o['self_ms']:.2f} ms ({o['calls']})" for o in top["ops"][:8]) + ".")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--contexts", nargs="+", type=int, default=[512, 8000], help="prompt lengths in tokens")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per cache kind and context")
    parser.add_argument("--kinds", nargs="+", default=["dynamic", "growing"], choices=KINDS,
                        help="dynamic / growing: the unpatched model with a DynamicCache / GrowingCache; exact_decode: "
                             "a copy patched on every layer with the exact decode method (GrowingCache)")
    parser.add_argument("--report-only", action="store_true", help="rewrite results.md from results.json")
    args = parser.parse_args(argv)
    if args.report_only:
        write_report(args.out, markdown)
        return 0
    torch.set_num_threads(1)
    import transformers

    from hf_sparse_attn.eval.data import first_article_of, load_smollm2

    model, tokenizer = load_smollm2()
    longest = max(args.contexts)
    title, ids = first_article_of(tokenizer, longest)
    load_before = os.getloadavg()[0]
    by_context = {}
    models = {kind: model for kind in args.kinds}
    if "exact_decode" in models:
        from hf_sparse_attn import patch_model

        models["exact_decode"] = copy.deepcopy(model)
        patch_model(models["exact_decode"], method="exact", layers="all", decode_method="exact")
    for n in args.contexts:
        by_context[str(n)] = profile_context(models, ids[:, :n].contiguous(), args.steps)
        print(f"context {n}: " + ", ".join(f"{k} {by_context[str(n)][k]['median']['total_ms']:.1f} ms"
                                           for k in args.kinds), file=sys.stderr)
    result = {"machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU; 2 cores shared with other jobs", "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
              "command": command_line(),
              "article": title, "contexts": args.contexts, "steps": args.steps, "kinds": args.kinds,
              "load_before": load_before, "load_after": os.getloadavg()[0], "by_context": by_context}
    write_report(args.out, markdown, result)
    print(f"wrote {args.out}/results.json and results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
