"""`hf-sparse-attn demo` (`make demo`): the whole job on a real model (SmolLM2-135M, real Wikipedia text).

1. rank SmolLM2's 30 layers by Q/K weight norm and print the ranking;
2. patch half of them with `exact` and check that the logits are unchanged (<= 1e-5) and unpatching is bit-identical;
3. patch the same half with a fast method (default `sparse_hyper`) and print prefill time and perplexity, exact vs patched,
   on a long real article, with the plan (what ran where, and every fallback); write a figure (R per layer with the
   patched layers marked; loss along the article, exact vs patched).

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

DEMO_SELECTIONS = tuple(s for s in SELECT_PRESETS if s != "measured")  # "measured" needs calibration text


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="sparse_hyper", type=one_of(BUILTIN_METHODS, "method"),
                        help=f"fast method of the timed run (default sparse_hyper; one of {', '.join(BUILTIN_METHODS)})")
    parser.add_argument("--layers", type=float, default=0.5, help="fraction of layers to patch, in (0, 1] (default 0.5)")
    parser.add_argument("--select", default="weight_norm", type=one_of(DEMO_SELECTIONS, "selection"),
                        help=f"layer selection (default weight_norm; one of {', '.join(DEMO_SELECTIONS)})")
    parser.add_argument("--tokens", type=int, default=8192,
                        help="tokens of the article in the timed run (default 8192; causal calls shorter than 2 x min_seq_len = 4096 run exact by default)")
    parser.add_argument("--check-tokens", type=int, default=1024, help="tokens of the exactness check with method exact (default 1024)")
    parser.add_argument("--plan-out", default="demo_plan.json", help="where to save the fast plan (default demo_plan.json)")
    parser.add_argument("--plot-out", default="demo.png",
                        help="where to write the figure: R per layer, loss along the article exact vs patched (default demo.png)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")


def check_arguments(args: argparse.Namespace) -> None:
    """What argparse cannot check, before anything loads."""
    if not 0 < args.layers <= 1:
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

    from .. import list_methods, patch_model, rank_layers, unpatch_model
    from ..eval.data import load_smollm2, wikipedia_articles
    from ..eval.perplexity import token_losses_and_time
    from ..eval.plots import plot_demo

    if args.method not in list_methods():  # BUILTIN_METHODS out of date: say so rather than skip
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

    check = ids[:, : args.check_tokens]
    with torch.no_grad():
        reference = model(check).logits
        plan = patch_model(model, method="exact", layers=args.layers, select=args.select)
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
    print(f"timing two prefills of {long_ids.shape[1]} tokens: exact, then {args.method} (progress on stderr)",
          flush=True)
    with layer_progress(model, f"exact prefill, {long_ids.shape[1]} tokens"):
        exact_losses, t_exact = token_losses_and_time(model, long_ids)
    plan = patch_model(model, method=args.method, layers=args.layers, select=args.select)
    with layer_progress(model, f"{args.method} prefill, {long_ids.shape[1]} tokens"):
        fast_losses, t_fast = token_losses_and_time(model, long_ids)
    plan.save(args.plan_out)
    unpatch_model(model)
    n_scored = exact_losses.numel()
    ppl_exact, ppl_fast = (math.exp(losses.double().mean().item()) for losses in (exact_losses, fast_losses))
    plot_demo(ranking.weight_norms, plan.patched_layers, exact_losses.tolist(), fast_losses.tolist(), args.plot_out,
              method=args.method)
    print(plan, "\n")
    print(f"{'configuration':<44} {'prefill s':>9} {'perplexity':>10}")
    print(f"{'exact (sdpa), all 30 layers':<44} {t_exact:>9.2f} {ppl_exact:>10.3f}")
    name = f"{args.method} on {len(plan.patched_layers)} layers ({args.select})"
    print(f"{name:<44} {t_fast:>9.2f} {ppl_fast:>10.3f}")
    print(f"\nspeed-up {t_exact / t_fast:.2f}x, perplexity {100 * (ppl_fast / ppl_exact - 1):+.1f}% over {n_scored} scored tokens "
          f"(one run each; `hf-sparse-attn bench` repeats and profiles). Plan written to {args.plan_out}, "
          f"figure to {args.plot_out}.")
    return 0 if ok else 1
