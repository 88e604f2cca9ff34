"""The options of `hf-sparse-attn bench kernel` and `bench model`, in a module of their own: the ``bench`` command
adds them to its parser, and an experiment config (:mod:`hf_sparse_attn.commands.experiments`) is checked against
them, key by key."""

from __future__ import annotations

import argparse

from .models import add_model_arguments

# = hf_sparse_attn.eval.bench.grid.SELECTIONS (tests/test_run_trust.py checks it), spelled out here so that building
# the parser imports no torch
SELECTIONS = ("weight_norm", "last", "first", "measured", "random", "retrieval")
DEFAULT_SELECTIONS = ("weight_norm", "last", "first", "measured", "random")  # retrieval: asked for by name


def add_kernel_and_model_levels(levels: argparse._SubParsersAction) -> None:
    """Add the ``kernel`` and ``model`` levels, with their options, to the sub-parsers ``levels`` of ``bench``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory (results.json / results.jsonl, results.md, *.png); "
                                                     "giving it again resumes")
    common.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default, all cores)")
    common.add_argument("--method-param", action="append", metavar="METHOD.NAME=VALUE",
                        help="a method parameter, repeatable (e.g. sparse_hyper.block_size=128)")
    common.add_argument("--machine-note", default="", help="added to the machine description in the report (e.g. 'shared with other jobs')")
    common.add_argument("--report-only", action="store_true", help="only rewrite results.md / JSON / plots from what is in --out")
    common.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    common.add_argument("--experiment", default=None, metavar="CONFIG",
                        help="the experiment config (eval/experiments/<name>.toml) this run belongs to: the report "
                             "names it and (model) checks its [[goal]] tables; `bench run CONFIG` passes it")

    kernel = levels.add_parser("kernel", parents=[common], help="every method vs torch SDPA on the same inputs",
                               description="Time, peak extra memory, useful GFLOP/s and output error (relative Frobenius, vs fp32 SDPA) "
                                           "of each method against torch SDPA on the same q, k, v, alternating them on every repeat.")
    kernel.add_argument("--methods", nargs="+", default=None, help="registered methods (default: all of them)")
    kernel.add_argument("--inputs", nargs="+", default=["random"], choices=["random", "smollm2", "minilm"],
                        help="random: standard normal B=1 H=8 D=64; smollm2: q/k/v captured from the largest-R layer on a Wikipedia "
                             "article (N <= 8192); minilm: same for MiniLM at N=512 only (its position limit)")
    kernel.add_argument("--ns", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384, 32768], help="sequence lengths N")
    kernel.add_argument("--causal", choices=["both", "causal", "bidirectional"], default="both", help="attention kind (MiniLM: always bidirectional)")
    kernel.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32"], help="input dtypes")
    kernel.add_argument("--repeats", type=int, default=3, help="timed repeats per cell (median and spread reported)")
    kernel.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (>= 1)")
    kernel.add_argument("--max-n", action="append", metavar="METHOD=N", help="largest N a slow method runs at, repeatable (e.g. exact=8192)")
    kernel.add_argument("--overwrite", action="store_true",
                        help="--out holds results made with other settings (--method-param, --device, --repeats, "
                             "--warmup): delete them (only the files this command writes) and start afresh; without "
                             "it such a rerun is refused")
    kernel.add_argument("--device", default="cpu",
                        help="where the calls run: cpu (default) or cuda[:i] (inputs moved there; hyper / sparse_hyper use "
                             "their Triton kernel when triton imports; time waits for the GPU, memory is the allocator's peak)")

    model = levels.add_parser("model", parents=[common], help="prefill time and perplexity of patched SmolLM2 on Wikipedia",
                              description="Prefill time and perplexity of real SmolLM2-135M on real Wikipedia articles for each method x "
                                          "replaced layers x selection; speed-ups against the exact model measured in the same run; "
                                          "attention's share of the exact prefill from torch.profiler (the Amdahl ceiling).")
    model.add_argument("--shard", default=None, metavar="I/N",
                       help="run shard I of N (0 <= I < N) of the grid in this process, into its own results file in "
                            "--out (every shard re-times the exact baseline; the report reads every shard's file)")
    model.add_argument("--overwrite", action="store_true",
                       help="--out holds results made with other settings (model, --method-param, ...): delete them "
                            "(only the files this command writes) and start afresh; without it such a rerun is refused")
    model.add_argument("--tokens", nargs="+", type=int, default=[2048, 4096, 8192], help="context lengths N (each article cut to N tokens)")
    model.add_argument("--articles", type=int, default=20, help="articles per N (the first ones with >= N tokens; identical for every cell). Raising it on an existing --out extends finished cells: their articles are reused, only the new ones computed")
    model.add_argument("--methods", nargs="+", default=["sparse_hyper", "hyper"], help="methods to patch with")
    model.add_argument("--layers", nargs="+", type=int, default=list(range(0, 31, 3)) + [15],
                       help="numbers of replaced layers (0 = the exact baseline, always run)")
    model.add_argument("--selections", nargs="+", default=list(DEFAULT_SELECTIONS), choices=list(SELECTIONS),
                       help="layer selections (retrieval: the needle-mass order of a 2048-token pass-key probe, or the model's positions if fewer; not run unless named)")
    model.add_argument("--random-seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the random selection")
    model.add_argument("--compare-selections-at", nargs="+", type=int, default=None,
                       help="run selections other than weight_norm only at these layer counts (default: at every count)")
    model.add_argument("--compare-methods", nargs="+", default=None,
                       help="methods that run the selections other than weight_norm (default: every method)")
    model.add_argument("--method-layers", action="append", metavar="METHOD=L1,L2",
                       help="layer counts for one method only (repeatable; default: --layers for every method)")
    model.add_argument("--calibration-tokens", type=int, default=2048,
                       help="tokens of the calibration article for select=measured (an article not among the scored ones)")
    model.add_argument("--no-profile", action="store_true", help="skip the torch.profiler run of the exact prefill")
    model.add_argument("--rope-scaling", choices=["yarn", "linear", "dynamic"], default=None,
                       help="for --tokens beyond the checkpoint's max_position_embeddings: scale its RoPE to each N "
                            "(factor N / max positions) before that N's cells, baseline included")
    model.add_argument("--decode-tokens", type=int, default=0, metavar="N",
                       help="after a prefill of each article, time N greedy single-token decode steps against the KV "
                            "cache, the exact model and each cell's model alternating, one article after another "
                            "(0 = off, the default)")
    model.add_argument("--decode-cache", choices=["dynamic", "growing"], default="dynamic",
                       help="the cells' KV cache for --decode-tokens: transformers' DynamicCache (default) or "
                            "hf_sparse_attn's GrowingCache (appends without copying the cache)")
    model.add_argument("--decode-baseline-cache", choices=["dynamic", "growing"], default=None,
                       help="the exact model's KV cache in the decode comparison (default: --decode-cache); with "
                            "--layers 0 and another --decode-cache this measures one cache against the other")
    model.add_argument("--decode-method", default="exact",
                       help="what the patched layers of the cells run on the --decode-tokens steps against the KV "
                            "cache (patch_model's decode_method): exact (default), local, lsh, quest "
                            "(hf_sparse_attn.list_decode_methods(); lsh and quest need --decode-cache growing, with a "
                            "DynamicCache it falls back to the model's attention), or 'none' (the model's own "
                            "attention); recorded with each decode record, a rerun with another one measures again")
    model.add_argument("--decode-param", action="append", default=[], metavar="NAME=VALUE",
                       help="a parameter of --decode-method, repeatable (e.g. --decode-param window=512)")
    model.add_argument("--concat-articles", action="store_true",
                       help="texts made of consecutive articles joined until N tokens (for N longer than any article); "
                            "default: whole articles with >= N tokens")
    add_model_arguments(model, default="smollm2", aliases=("--model-dir",),
                        help="the causal LM to patch: 'smollm2' (default: real SmolLM2-135M) or a local transformers "
                             "causal-LM directory with its tokenizer (e.g. a tiny random model for tests; --model-dir "
                             "is the older spelling)")
