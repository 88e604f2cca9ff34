"""`hf-sparse-attn demo` (`make demo`): the whole job on a real model (SmolLM2-135M, real Wikipedia text).

1. rank SmolLM2's 30 layers by Q/K weight norm and print the ranking;
2. patch the fast plan's layers with `exact` and check that the logits are unchanged (<= 1e-5) and unpatching is bit-identical;
3. patch with a fast plan (default: ``recommended(model)``, the plan the project's measurements recommend; or
   ``--method`` on ``--layers``) and print prefill time and perplexity, exact vs patched, on a long real article, with
   the plan (what ran where, and every fallback); write a figure (R per layer with the patched layers marked; loss
   along the article, exact vs patched);
4. hide pass keys in a ``--tokens`` prompt (RULER's passkey task) and ask the exact and the patched model for them: a
   faster model that loses a fact is a wrong answer that perplexity does not show.

Every argument is checked before anything loads (an unknown method is an error, not a skipped step). The timed
prefills take minutes on a small CPU: a progress bar on stderr counts the decoder layers of each forward pass.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

from .arguments import BUILTIN_METHODS, SELECT_PRESETS, one_of

DEMO_SELECTIONS = tuple(s for s in SELECT_PRESETS if s not in ("measured", "retrieval"))  # these need calibration
DEMO_METHODS = ("recommended",) + tuple(BUILTIN_METHODS)
# RULER passkey samples (seed 0) at depths 10, 20 and 50%: at 8192 tokens the unpatched SmolLM2 finds these keys
# (4 of the 11 depths 0-100%: eval/results/ruler_frontier_smollm2/exact/8192/passkey.jsonl)
DEMO_PASSKEY_INDEXES = (1, 2, 5)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="recommended", type=one_of(DEMO_METHODS, "method"),
                        help="fast method of the timed run (default: hf_sparse_attn.recommended(model), its method, "
                             f"layers and parameters; or one of {', '.join(BUILTIN_METHODS)} with its defaults)")
    parser.add_argument("--layers", type=float, default=None,
                        help="fraction of layers to patch, in (0, 1] (default: the recommendation's layers, 0.5 with "
                             "another --method)")
    parser.add_argument("--select", default=None, type=one_of(DEMO_SELECTIONS, "selection"),
                        help="layer selection (default: the recommendation's, which ranks the layers on a pass-key "
                             f"probe for its decode; weight_norm with another --method; one of {', '.join(DEMO_SELECTIONS)})")
    parser.add_argument("--tokens", type=int, default=8192,
                        help="tokens of the article in the timed run (default 8192; causal calls shorter than 2 x min_seq_len = 4096 run exact by default)")
    parser.add_argument("--check-tokens", type=int, default=1024, help="tokens of the exactness check with method exact (default 1024)")
    parser.add_argument("--plan-out", default="demo_plan.json", help="where to save the fast plan (default demo_plan.json)")
    parser.add_argument("--plot-out", default="demo.png",
                        help="where to write the figure: R per layer, loss along the article exact vs patched (default demo.png)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--passkeys", type=int, default=len(DEMO_PASSKEY_INDEXES), choices=range(len(DEMO_PASSKEY_INDEXES) + 1),
                        help="pass keys (depths 10, 20, 50%%) hidden in a --tokens prompt and asked of the exact and the "
                             f"patched model (default {len(DEMO_PASSKEY_INDEXES)}; 0: skip)")


def check_arguments(args: argparse.Namespace) -> None:
    """What argparse cannot check, before anything loads."""
    if args.layers is not None and not 0 < args.layers <= 1:
        raise SystemExit(f"--layers is a fraction of the layers in (0, 1], got {args.layers:g}")
    if args.tokens < 2 or args.check_tokens < 2:
        raise SystemExit(f"--tokens and --check-tokens must be >= 2, got {args.tokens} and {args.check_tokens}")
    if args.threads < 0:
        raise SystemExit(f"--threads must be >= 0 (0: all cores), got {args.threads}")
    for option, path in (("--plan-out", args.plan_out), ("--plot-out", args.plot_out)):
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise SystemExit(f"{option} {path}: the directory {folder} does not exist")


def decoder_layers(model) -> list:
    """The model's decoder layers (the ModuleList as long as config.num_hidden_layers), or [] if none is found."""
    import torch

    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return list(module)
    return []


@contextlib.contextmanager
def layer_progress(model, description: str):
    """A tqdm bar on stderr that advances as each decoder layer of one forward pass finishes."""
    from tqdm import tqdm

    layers = decoder_layers(model)
    bar = tqdm(total=len(layers) or None, desc=description, unit="layer", file=sys.stderr, leave=True)
    def advance(*_) -> None:  # a forward hook that returns something replaces the layer's output: return None
        bar.update(1)

    hooks = [layer.register_forward_hook(advance) for layer in layers]
    try:
        yield bar
    finally:
        for hook in hooks:
            hook.remove()
        bar.close()


def run(args: argparse.Namespace) -> int:
    check_arguments(args)

    import torch

    from .. import list_methods, patch_model, rank_layers, recommended, unpatch_model
    from ..eval.data import load_smollm2, wikipedia_articles
    from ..eval.perplexity import token_losses_and_time
    from ..eval.plots import plot_demo

    if args.method != "recommended" and args.method not in list_methods():  # BUILTIN_METHODS out of date
        raise SystemExit(f"method {args.method!r} is not registered (available: {', '.join(list_methods())})")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2()
    title, text = max(wikipedia_articles(), key=lambda a: len(a[1]))
    ids = tokenizer(text, return_tensors="pt").input_ids
    print(f"model: SmolLM2-135M-Instruct (real weights, fp32, {torch.get_num_threads()} threads); "
          f"text: Wikipedia '{title}' ({ids.shape[1]} tokens)\n")

    ranking = rank_layers(model)
    print(ranking, "\n")
    if args.method == "recommended":
        fast = recommended(model, tokenizer)
        shown = {k: v for k, v in fast.items() if k != "calibration"}
        print(f"the recommended plan (hf_sparse_attn.recommended(model, tokenizer)): {shown}"
              + (", calibration: a pass-key probe" if "calibration" in fast else "") + "\n")
    else:
        fast = {"method": args.method, "layers": 0.5}
    if args.layers is not None:
        fast["layers"] = args.layers
    if args.select is not None and args.select != fast.get("select"):
        fast["select"] = args.select
        fast.pop("calibration", None)  # the probe serves select="retrieval" only
    fast.setdefault("select", "weight_norm")
    method = fast["method"]

    check = ids[:, : args.check_tokens]
    with torch.no_grad():
        reference = model(check).logits
        # the fast plan chooses its layers once (a retrieval probe, where it selects by one); the check patches the
        # same layers with exact attention, and the timed run re-applies the plan as it is
        fast_plan = patch_model(model, **fast)
        unpatch_model(model)
        plan = patch_model(model, method="exact", layers=fast_plan.patched_layers)
        diff = (model(check).logits - reference).abs().max().item()
        unpatch_model(model)
        identical = torch.equal(model(check).logits, reference)
    # float32 summation order differs between our exact kernel and SDPA: compare relative to the logits' scale
    relative = diff / max(1.0, reference.abs().max().item())
    print(f"check with method='exact' on {len(plan.patched_layers)} layers {plan.patched_layers}: "
          f"max |logit diff| = {diff:.2e}, relative to max |logit| = {relative:.2e} "
          f"({'OK' if relative <= 1e-5 else 'FAILED'}, limit 1e-5); unpatched bit-identical: {identical}\n")
    ok = relative <= 1e-5 and identical

    long_ids = ids[:, : args.tokens]
    print(f"timing two prefills of {long_ids.shape[1]} tokens: exact, then {method} (progress on stderr)",
          flush=True)
    with layer_progress(model, f"exact prefill, {long_ids.shape[1]} tokens"):
        exact_losses, t_exact = token_losses_and_time(model, long_ids)
    plan = patch_model(model, plan=fast_plan)
    with layer_progress(model, f"{method} prefill, {long_ids.shape[1]} tokens"):
        fast_losses, t_fast = token_losses_and_time(model, long_ids)
    plan.save(args.plan_out)
    passkeys = passkey_samples(tokenizer, args.tokens, args.passkeys)
    fast_answers = [ask(model, tokenizer, sample, f"{method}, pass key {i + 1}") for i, sample in enumerate(passkeys)]
    unpatch_model(model)
    exact_answers = [ask(model, tokenizer, sample, f"exact, pass key {i + 1}") for i, sample in enumerate(passkeys)]
    n_scored = exact_losses.numel()
    ppl_exact, ppl_fast = (math.exp(losses.double().mean().item()) for losses in (exact_losses, fast_losses))
    plot_demo(ranking.weight_norms, plan.patched_layers, exact_losses.tolist(), fast_losses.tolist(), args.plot_out,
              method=method)
    print(plan, "\n")
    print(f"{'configuration':<44} {'prefill s':>9} {'perplexity':>10}")
    print(f"{'exact (sdpa), all 30 layers':<44} {t_exact:>9.2f} {ppl_exact:>10.3f}")
    name = f"{method} on {len(plan.patched_layers)} layers ({fast['select']})"
    print(f"{name:<44} {t_fast:>9.2f} {ppl_fast:>10.3f}")
    print(f"\nspeed-up {t_exact / t_fast:.2f}x, perplexity {100 * (ppl_fast / ppl_exact - 1):+.1f}% over {n_scored} scored tokens "
          f"(one run each; `hf-sparse-attn bench` repeats and profiles). Plan written to {args.plan_out}, "
          f"figure to {args.plot_out}.")
    if passkeys:
        print_passkeys(passkeys, exact_answers, fast_answers, method)
    return 0 if ok else 1


def passkey_samples(tokenizer, tokens: int, count: int) -> list:
    """RULER passkey samples (seed 0) of ``tokens`` tokens at the depths of DEMO_PASSKEY_INDEXES (the first
    ``count``)."""
    from ..eval.ruler.tasks import generate_sample

    return [generate_sample("passkey", tokenizer, tokens, seed=0, index=i) for i in DEMO_PASSKEY_INDEXES[:count]]


def ask(model, tokenizer, sample, description: str) -> str:
    """The model's greedy answer to ``sample`` (as ``hf-sparse-attn ruler`` asks it), with a note on stderr."""
    from ..eval.ruler import predict

    print(f"asking: {description} ({sample.prompt_tokens} tokens)", file=sys.stderr, flush=True)
    return predict(model, tokenizer, sample)


def print_passkeys(samples: list, exact_answers: list[str], fast_answers: list[str], method: str) -> None:
    """The pass-key table: depth, key, each model's answer and whether it holds the key (RULER's string match)."""
    from ..eval.ruler.metrics import sample_hits

    def cell(answer: str, sample) -> str:
        found = all(sample_hits(answer, sample.answers))
        return f"{'found' if found else 'MISSED'} ({answer.strip()[:24]!r})"

    print(f"\npass keys hidden in {samples[0].prompt_tokens}-token prompts (RULER passkey, greedy, chat template):")
    print(f"{'depth':>6} {'key':>7}  {'exact':<36} {method}")
    found = {"exact": 0, method: 0}
    for sample, exact_answer, fast_answer in zip(samples, exact_answers, fast_answers):
        print(f"{sample.depth:>5.0f}% {sample.answers[0]:>7}  {cell(exact_answer, sample):<36} {cell(fast_answer, sample)}")
        found["exact"] += all(sample_hits(exact_answer, sample.answers))
        found[method] += all(sample_hits(fast_answer, sample.answers))
    print(f"found: exact {found['exact']}/{len(samples)}, {method} {found[method]}/{len(samples)} (a key the exact model "
          "finds and the patched one misses is a fact the speed-up lost)")
