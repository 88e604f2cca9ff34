"""A prompt fed in chunks (transformers' ``generate(prefill_chunk_size=...)``) on real SmolLM2-135M, one thread:
prefill time, perplexity and pass keys of ``recommended(model)``, whose ``block_select`` serves every chunk as its
prefill would (``MethodSpec.chunk_fn``), against the unpatched model fed in the same chunks.

Configurations (two model copies in one process, one unpatched, one patched with ``recommended(model)``):

* ``unpatched_chunked``: the model's own attention, the prompt in chunks of --chunk tokens (the baseline);
* ``recommended_chunked``: the recommended plan, the same chunks (the first is a prefill, the others chunks against
  the cache, both served by block_select);
* ``unpatched_whole`` / ``recommended_whole``: the prompt at once (what chunking costs or saves).

Speed and perplexity: the first --length tokens of --articles real Wikipedia articles; per article the three
configurations run in turn (--repeats times, the fastest repeat kept), each a forward over the chunks into a
``DynamicCache`` with the logits of every row (the LM head is in every configuration's time). Ratio = the unpatched
chunked prefill's seconds / the configuration's, summed over articles, with a percentile-bootstrap interval over
articles (``hf_sparse_attn.eval.bench.measure.ratio_interval``). Perplexity from the same logits.

Pass keys: RULER's ``passkey`` samples 0 .. --samples - 1 at --length (depths 0, 10, ..., 100 %), greedy through
``hf_sparse_attn.eval.ruler.predict`` (generate, with the plan's decode methods) with ``prefill_chunk_size`` for the
chunked configurations. Records are appended per sample to --out/passkey.jsonl (a rerun predicts only what is missing).

Writes --out/{timing.json (written once the timing is done: a rerun with the same settings keeps it), passkey.jsonl,
results.json, results.md}.

    taskset -c 1 .venv/bin/python scripts/bench_chunked_prefill.py --out eval/results/chunked_prefill_smollm2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import torch

from hf_sparse_attn.eval.script_report import command_line, write_report

CONFIGS = ("unpatched_chunked", "recommended_chunked", "unpatched_whole", "recommended_whole")


@torch.no_grad()
def timed_forward(model: torch.nn.Module, ids: torch.Tensor, chunk: int | None) -> tuple[float, float]:
    """(seconds, summed next-token NLL over the N - 1 predicted tokens) of a forward over ids [1, N] into a
    DynamicCache, in chunks of ``chunk`` tokens (None: at once)."""
    from transformers import DynamicCache

    from hf_sparse_attn.patches.decode_cache import cache_keyword

    cache = DynamicCache(config=model.config)
    step = ids.shape[1] if chunk is None else chunk
    nll, seconds = 0.0, 0.0
    for start in range(0, ids.shape[1], step):
        stop = min(ids.shape[1], start + step)
        begin = time.perf_counter()
        logits = model(input_ids=ids[:, start:stop], use_cache=True, **{cache_keyword(model): cache}).logits
        seconds += time.perf_counter() - begin
        targets = ids[0, start + 1:stop + 1]
        nll += torch.nn.functional.cross_entropy(logits[0, :targets.shape[0]].float(), targets, reduction="sum").item()
    return seconds, nll


def time_configurations(models: dict, tokenizer, args: argparse.Namespace) -> dict:
    """Per configuration: the fastest-of-repeats seconds per article, the ratio to the unpatched chunked prefill
    with its bootstrap interval, and the perplexity over all articles' tokens."""
    from tqdm import tqdm

    from hf_sparse_attn.eval.bench.measure import ratio_interval
    from hf_sparse_attn.eval.data import wikipedia_articles

    texts = []
    for title, text in wikipedia_articles(min_chars=args.length):
        ids = tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] >= args.length:
            texts.append((title, ids[:, :args.length]))
        if len(texts) == args.articles:
            break
    timing = {name: {"seconds": [], "nll": []} for name in CONFIGS}
    for title, ids in tqdm(texts, desc="timing"):
        best, nll = {}, {}
        for _ in range(args.repeats):
            for name in CONFIGS:
                model, chunk = models[name]
                seconds, nll[name] = timed_forward(model, ids, chunk)  # the same NLL every repeat
                best[name] = min(best.get(name, float("inf")), seconds)
        for name in CONFIGS:
            timing[name]["seconds"].append(best[name])
            timing[name]["nll"].append(nll[name])
    baseline = timing["unpatched_chunked"]
    summary = {}
    tokens = len(texts) * (args.length - 1)
    for name in CONFIGS:
        t = timing[name]
        lo, hi = ratio_interval(baseline["seconds"], t["seconds"])
        summary[name] = {"seconds": t["seconds"], "ratio": sum(baseline["seconds"]) / sum(t["seconds"]),
                         "ratio_interval": [lo, hi], "perplexity": float(torch.tensor(sum(t["nll"]) / tokens).exp()),
                         "articles": [title for title, _ in texts]}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--length", type=int, default=8192, help="prompt tokens")
    parser.add_argument("--chunk", type=int, default=2048, help="prefill_chunk_size")
    parser.add_argument("--articles", type=int, default=3, help="articles timed")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats per article and configuration")
    parser.add_argument("--samples", type=int, default=11, help="passkey samples (11: one per depth 0, 10, ..., 100%%)")
    parser.add_argument("--passkey-configs", nargs="+", default=list(CONFIGS), choices=CONFIGS,
                        help="the configurations whose pass keys are predicted")
    parser.add_argument("--report-only", action="store_true", help="rewrite results.md from results.json")
    args = parser.parse_args(argv)
    if args.report_only:
        write_report(args.out, markdown)
        return 0
    torch.set_num_threads(1)
    import transformers
    from tqdm import tqdm

    from hf_sparse_attn import patch_model, recommended
    from hf_sparse_attn.commands.bench import machine_description
    from hf_sparse_attn.eval.data import load_smollm2
    from hf_sparse_attn.eval.ruler import generate_sample, predict
    from hf_sparse_attn.eval.ruler.tasks import sample_id
    from hf_sparse_attn.eval.ruler.metrics import sample_hits
    from hf_sparse_attn.eval.store import JsonlStore, write_json

    os.makedirs(args.out, exist_ok=True)
    unpatched, tokenizer = load_smollm2()
    patched, _ = load_smollm2()
    plan = patch_model(patched, **recommended(patched))
    models = {"unpatched_chunked": (unpatched, args.chunk), "recommended_chunked": (patched, args.chunk),
              "unpatched_whole": (unpatched, None), "recommended_whole": (patched, None)}
    load_before = os.getloadavg()[0]

    timing_path = os.path.join(args.out, "timing.json")
    timing_settings = {"length": args.length, "chunk": args.chunk, "articles": args.articles, "repeats": args.repeats}
    summary = None
    if os.path.exists(timing_path):  # a rerun after a crash in the pass-key part keeps the timing it wrote
        with open(timing_path, encoding="utf-8") as f:
            saved = json.load(f)
        summary = saved["summary"] if saved.get("settings") == timing_settings else None
    if summary is None:
        summary = time_configurations(models, tokenizer, args)
        write_json(timing_path, {"settings": timing_settings, "summary": summary,
                                 "load_after_timing": os.getloadavg()[0]})

    store = JsonlStore(os.path.join(args.out, "passkey.jsonl"))
    path = os.path.join(args.out, "passkey.jsonl")
    done = set()
    if os.path.exists(path):  # resume; records of other settings (length, chunk size) are refused, never mixed
        with open(path, encoding="utf-8") as f:
            for r in (json.loads(line) for line in f if line.strip()):
                chunk = models[r["config"]][1] if r["config"] in models else "?"
                if r["id"] != sample_id("passkey", args.length, 0, r["index"]) or r["chunk"] != chunk:
                    raise SystemExit(f"{path} holds pass keys of other settings ({r['id']}, chunk {r['chunk']}); this "
                                     f"run asks for length {args.length}, chunk {args.chunk}: use another --out")
                done.add((r["config"], r["index"]))
    todo = [(name, i) for i in range(args.samples) for name in args.passkey_configs if (name, i) not in done]
    for name, index in tqdm(todo, desc="passkey"):
        model, chunk = models[name]
        sample = generate_sample("passkey", tokenizer, args.length, seed=0, index=index)
        begin = time.perf_counter()
        pred = predict(model, tokenizer, sample, prefill_chunk_size=chunk)
        store.append({"config": name, "index": index, "id": sample.id, "depth": sample.depth, "pred": pred,
                      "answers": sample.answers, "hits": sample_hits(pred, sample.answers),
                      "prompt_tokens": sample.prompt_tokens, "chunk": chunk,
                      "seconds": round(time.perf_counter() - begin, 2)})
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for name in args.passkey_configs:
        mine = sorted((r for r in records if r["config"] == name and r["index"] < args.samples),
                      key=lambda r: r["index"])
        summary[name]["passkey_found"] = sum(all(r["hits"]) for r in mine)
        summary[name]["passkey_samples"] = len(mine)
        summary[name]["passkey_found_depths"] = [r["depth"] for r in mine if all(r["hits"])]

    result = {"date": datetime.date.today().isoformat(),
              "machine": machine_description("2 cores shared with other jobs"),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "command": command_line(),
              "load_before": load_before, "load_after": os.getloadavg()[0], "length": args.length,
              "chunk": args.chunk, "repeats": args.repeats, "plan": plan.to_dict(), "configs": summary}
    write_report(args.out, markdown, result)
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    lines = ["# A prompt fed in chunks: recommended(model) on SmolLM2-135M, one thread", "",
             f"Machine: {result['machine']}; torch {result['torch']}, transformers {result['transformers']}, 1 thread. "
             f"Date: {result['date']}. Load average (1 min) before / after: {result['load_before']:.1f} / "
             f"{result['load_after']:.1f}.", f"Command: `{result['command']}`", "",
             f"{result['length']} tokens, chunks of {result['chunk']} (`generate(prefill_chunk_size=...)`); speed: the "
             "unpatched model's chunked prefill seconds / the configuration's (summed over articles; fastest of "
             f"{result['repeats']} repeats; 95% bootstrap interval over articles); perplexity of the same tokens; pass "
             "keys found at depths 0-100%, greedy through generate with the plan's decode methods.", "",
             "| configuration | prefill speed | perplexity | pass keys found |", "|---|---|---|---|"]
    for name, row in result["configs"].items():
        lo, hi = row["ratio_interval"]
        keys = f"{row['passkey_found']} of {row['passkey_samples']}" if "passkey_found" in row else "-"
        lines.append(f"| {name} | {row['ratio']:.2f}x [{lo:.2f}, {hi:.2f}] | {row['perplexity']:.3f} | {keys} |")
    lines += ["", "Articles: " + ", ".join(next(iter(result["configs"].values()))["articles"]) + ".", ""]
    layers = result["plan"]["layers"]
    fallbacks: dict[str, int] = {}
    for layer in layers:
        for counts in (layer.get("fallbacks") or {}, layer.get("decode_fallbacks") or {}):
            for reason, n in counts.items():
                fallbacks[reason] = fallbacks.get(reason, 0) + n
    lines += [f"The recommended plan over the whole run (timing and pass keys, both configurations): "
              f"{sum(layer.get('served', 0) for layer in layers)} calls served by the prefill method (whole prompts and "
              f"chunks), {sum(layer.get('decode_served', 0) for layer in layers)} by the decode methods; exact "
              f"attention: {fallbacks or 'none'}.", ""]
    for name, row in result["configs"].items():
        if "passkey_found" in row:
            lines.append(f"- {name}: pass keys found at depths {row['passkey_found_depths']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
