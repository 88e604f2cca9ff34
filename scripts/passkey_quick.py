"""Quick pass-key check on real SmolLM2-135M at ~8k tokens: does a patched model still retrieve a fact far behind the
local window? (Not RULER: one key per depth, the classic repeated filler.)

The prompt: an instruction, the filler "The grass is green. The sky is blue. The sun is yellow. Here we go. There and
back again." repeated to ~--tokens tokens with "The pass key is NNNNN. Remember it. NNNNN is the pass key." inserted at
each depth (fraction of the filler), ending "What is the pass key? The pass key is". Greedy ``generate`` of 8 tokens
with the model patched on all layers (prefill runs the method; decode steps run exact attention, as the plugin does);
found = the 5 digits appear in the answer. Run pinned with one torch thread:

    taskset -c 0 .venv/bin/python scripts/passkey_quick.py [--methods exact local block_select] [--depths 0.1 0.3 0.5]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
QUESTION = "\nWhat is the pass key? The pass key is"


def build_prompt(tokenizer, depth: float, key: int, tokens: int) -> str:
    """The prompt text: INTRO, filler to about ``tokens`` tokens with the key sentence at ``depth`` of it, QUESTION."""
    per_filler = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    fixed = len(tokenizer(INTRO + QUESTION, add_special_tokens=False).input_ids) + 30
    repeats = max(1, (tokens - fixed) // per_filler)
    at = int(round(depth * repeats))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    return INTRO + FILLER * at + needle + FILLER * (repeats - at) + QUESTION


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["exact", "local", "block_select"],
                        help="exact = unpatched; others patched on all layers with their defaults")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    parser.add_argument("--tokens", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--param", action="append", default=[], metavar="METHOD:NAME=VALUE",
                        help="a method parameter, e.g. block_select:num_blocks=16 (repeatable)")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from hf_sparse_attn import patch_model, unpatch_model
    from hf_sparse_attn.commands.arguments import parse_value
    from hf_sparse_attn.eval.data import load_smollm2

    params: dict[str, dict] = {}
    for item in args.param:
        method, _, assignment = item.partition(":")
        name, _, value = assignment.partition("=")
        params.setdefault(method, {})[name] = parse_value(value)
    model, tokenizer = load_smollm2()
    rng = random.Random(args.seed)
    keys = [rng.randint(10000, 99999) for _ in args.depths]
    results = []
    for method in args.methods:
        for depth, key in zip(args.depths, keys):
            prompt = build_prompt(tokenizer, depth, key, args.tokens)
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            plan = None
            if method != "exact":
                plan = patch_model(model, method=method, layers="all", **params.get(method, {}))
            try:
                start = time.perf_counter()
                with torch.no_grad():
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                         pad_token_id=tokenizer.eos_token_id)
                seconds = time.perf_counter() - start
                served = None if plan is None else sum(layer.served for layer in plan.layers)
            finally:
                if plan is not None:
                    unpatch_model(model)
            answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            found = str(key) in answer
            row = dict(method=method, params=params.get(method, {}), depth=depth, key=key, tokens=ids.shape[1],
                       answer=answer, found=found, seconds=round(seconds, 1), served_prefill_calls=served)
            results.append(row)
            print(json.dumps(row), flush=True)
    print("\nmethod        " + "  ".join(f"depth {d:.0%}" for d in args.depths))
    for method in args.methods:
        marks = ["found    " if r["found"] else "not found" for r in results if r["method"] == method]
        print(f"{method:<13} " + "  ".join(marks) + f"   ({sum(r['found'] for r in results if r['method'] == method)}"
              f"/{len(args.depths)})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
