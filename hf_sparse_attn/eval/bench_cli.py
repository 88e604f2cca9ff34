"""`hf-sparse-attn bench kernel|model|run`: speed and error of the methods alone, and of a patched real model.

    hf-sparse-attn bench kernel --inputs random smollm2 minilm --ns 1024 4096 16384 --dtypes fp32 bf16 --out DIR
    hf-sparse-attn bench model --tokens 8192 --articles 20 --methods sparse_hyper hyper --layers 0 8 15 23 30 \\
        --selections weight_norm last first measured random --out DIR
    hf-sparse-attn bench run eval/experiments/model_bench_grid.toml [--shard I/N] [--report-only] [--dry-run]

All are resumable (give the same --out again: finished cells are skipped) and write JSON, a markdown table and
PNG plots into --out. Every speed-up is measured against torch SDPA / the exact model in the same run. `run` runs
an experiment config: the commands it declares, into eval/results/<name>/ (hf_sparse_attn.eval.experiments).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from typing import Any, Optional

from ..commands.arguments import parse_method_params
from ..commands.loading import SMOLLM2_NAMES, add_model_arguments, load_model

# = hf_sparse_attn.eval.bench.grid.SELECTIONS (tests/test_run_trust.py checks it), spelled out here so that building
# the parser imports no torch
SELECTIONS = ("weight_norm", "last", "first", "measured", "random")


def _parse_method_params(items: Optional[list[str]]) -> dict[str, dict[str, Any]]:
    """["hyper.block_size=128", ...] -> {"hyper": {"block_size": 128}} (:func:`hf_sparse_attn.commands.arguments.parse_method_params`)."""
    try:
        return parse_method_params(items, option="--method-param")
    except ValueError as err:
        raise SystemExit(str(err)) from None


def _parse_max_n(items: Optional[list[str]]) -> dict[str, int]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--max-n {item!r}: write METHOD=N, e.g. kmv=8192")
        method, n = item.split("=", 1)
        out[method] = int(n)
    return out


def parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
    """"I/N" -> (I, N) with 0 <= I < N; None -> None. SystemExit with what to write otherwise."""
    if text is None:
        return None
    i, sep, n = text.partition("/")
    if not sep or not i.strip().isdigit() or not n.strip().isdigit() or not 0 <= int(i) < int(n):
        raise SystemExit(f"--shard {text!r}: write I/N with 0 <= I < N, e.g. --shard 0/2 and --shard 1/2")
    return int(i), int(n)


def machine_description(note: str = "") -> str:
    import torch

    cuda = torch.cuda.is_available()
    desc = f"{os.cpu_count()}-core CPU ({platform.machine()}), {'GPU: ' + torch.cuda.get_device_name(0) if cuda else 'no GPU'}"
    return desc + (f"; {note}" if note else "")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    levels = parser.add_subparsers(dest="level", metavar="LEVEL")

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
    model.add_argument("--selections", nargs="+", default=list(SELECTIONS), choices=list(SELECTIONS), help="layer selections")
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
    model.add_argument("--concat-articles", action="store_true",
                       help="texts made of consecutive articles joined until N tokens (for N longer than any article); "
                            "default: whole articles with >= N tokens")
    add_model_arguments(model, default="smollm2", aliases=("--model-dir",),
                        help="the causal LM to patch: 'smollm2' (default: real SmolLM2-135M) or a local transformers "
                             "causal-LM directory with its tokenizer (e.g. a tiny random model for tests; --model-dir "
                             "is the older spelling)")

    from .experiments import configure_run

    configure_run(levels)


def _header(args: argparse.Namespace, what: str) -> list[str]:
    import torch

    return [f"# {what}", "",
            f"Machine: {machine_description(args.machine_note)}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"Python {platform.python_version()}. Date: {datetime.date.today().isoformat()}.",
            f"Command: `hf-sparse-attn bench {' '.join(shlex.quote(a) for a in getattr(args, '_argv', []))}`"
            if getattr(args, "_argv", None) else f"Command: `{' '.join(shlex.quote(a) for a in [os.path.basename(sys.argv[0]), *sys.argv[1:]])}`"
            + (" (this report was rewritten from the saved results; the same command without --report-only ran the cells)"
               if getattr(args, "report_only", False) else "")]


def kernel_settings(args: argparse.Namespace) -> dict:
    """What the cells of a ``bench kernel`` results directory depend on (recorded in run_settings.json; a rerun
    with other values is refused): method parameters, device and timing protocol. Methods, inputs, lengths, dtypes
    and per-method limits are left out: more of them extend the directory, each cell keyed by its own."""
    return {"command": "bench kernel", "method_params": _parse_method_params(args.method_param),
            "device": args.device, "repeats": args.repeats, "warmup": args.warmup}


KERNEL_FILES = ["results.json", "results.md"]
KERNEL_PATTERNS = [r"time_vs_n_(random|smollm2|minilm)\.png"]


def run_kernel(args: argparse.Namespace) -> int:
    import torch

    from ..methods import list_methods
    from .run_dir import RunDir

    methods = args.methods or list_methods()
    unknown = [m for m in methods if m not in list_methods()]
    if unknown:
        print(f"unknown method(s) {unknown}; registered: {', '.join(list_methods())}", file=sys.stderr)
        return 2
    if not args.report_only and args.device != "cpu":
        if not args.device.startswith("cuda"):
            print(f"--device {args.device!r}: choose cpu or cuda[:index]", file=sys.stderr)
            return 2
        if not torch.cuda.is_available():
            print(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device; run on a GPU machine with a "
                  f"CUDA build of torch, or use --device cpu", file=sys.stderr)
            return 2
    if args.overwrite and args.report_only:
        print("--overwrite starts the directory afresh: give it without --report-only", file=sys.stderr)
        return 2
    with RunDir(args.out, kernel_settings(args), overwrite=args.overwrite, owned_files=KERNEL_FILES,
                owned_patterns=KERNEL_PATTERNS, record=not args.report_only, command="bench kernel"):
        return _run_kernel(args)


def _run_kernel(args: argparse.Namespace) -> int:
    import torch

    from ..methods import list_methods
    from .kernel_suite import kernel_report_markdown, run_kernel_suite, suite_cells
    from .plots import plot_kernel_time_vs_n

    methods = args.methods or list_methods()
    params = _parse_method_params(args.method_param)
    causal_modes = {"both": [False, True], "causal": [True], "bidirectional": [False]}[args.causal]
    cells = suite_cells(args.inputs, args.ns, causal_modes, args.dtypes)
    header = {"machine": machine_description(args.machine_note), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "methods": methods, "params": params,
              "max_n": _parse_max_n(args.max_n), "device": args.device}
    if not args.report_only:
        results = run_kernel_suite(args.out, cells, methods, repeats=args.repeats, warmup=args.warmup, params=params,
                                   max_n=_parse_max_n(args.max_n), header=header, progress=not args.no_progress,
                                   device=args.device)
    else:
        import json

        with open(os.path.join(args.out, "results.json"), encoding="utf-8") as f:
            results = json.load(f)
    lines = _header(args, "Kernel benchmark: every method vs torch SDPA on the same inputs")
    lines += ["", "Time = median of the repeats (spread = max - min), method and SDPA alternated on every repeat. Useful GFLOP/s = "
              "4*B*H*N^2*D (halved for causal) / time. Rel. error = ||out - ref||_F / ||ref||_F with ref = SDPA in fp32 on the "
              "same inputs; 'SDPA err' is SDPA's own error in the cell's dtype (0 in fp32); load = 1-minute load average after the cell. Method parameters: "
              f"defaults except {results.get('params') or 'none'} (each cell's JSON lists them). Called on bare tensors as here, "
              "a method runs its own algorithm at every N: min_seq_len is applied by the model adapter (kmv, poly and "
              "feature_sketch fall back to exact inside the call below theirs; hyper and sparse_hyper approximate; on "
              "near-uniform random attention the exact output is small, so relative errors above 1 occur). Per-method N limits: "
              f"{results.get('max_n') or 'none'}."]
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(kernel_report_markdown(results, lines))
    for kind in ("random", "smollm2"):
        kind_cells = [c for c in results["cells"].values() if c["inputs"] == kind]
        if len({c["n"] for c in kind_cells}) > 1:
            plot_kernel_time_vs_n(kind_cells, os.path.join(args.out, f"time_vs_n_{kind}.png"), title=f"{kind} inputs: time vs N")
    print(f"wrote {args.out}/results.json, results.md and plots")
    return 0


def model_settings(args: argparse.Namespace) -> dict:
    """What the cells of a ``bench model`` results directory depend on (recorded in run_settings.json; a rerun
    with other values is refused). The grid (tokens, articles, methods, layers, selections) is left out: a rerun
    with a larger grid extends the directory, each cell keyed by its own settings."""
    from .run_dir import path_fingerprint

    return {"command": "bench model", "model": args.model, "model_fingerprint": path_fingerprint(args.model),
            "method_params": _parse_method_params(args.method_param), "rope_scaling": args.rope_scaling,
            "concat_articles": bool(args.concat_articles), "calibration_tokens": args.calibration_tokens}


MODEL_FILES = ["results.jsonl", "results.json", "results.md"]
MODEL_PATTERNS = [r"results\.shard-\d+-of-\d+\.jsonl", r"ppl_vs_speedup_\d+\.png",
                  r"selections_by_article_.+layers_\d+\.png", r"selections_vs_layers_.+_\d+\.png"]


def run_model(args: argparse.Namespace) -> int:
    from .run_dir import RunDir

    shard = parse_shard(args.shard)
    if args.overwrite and (shard is not None or args.report_only):
        print("--overwrite starts the directory afresh: give it to one process without --shard or --report-only",
              file=sys.stderr)
        return 2
    # the lock of a shard covers its own results file: shards of one grid run side by side in one --out
    lock = f".run.shard-{shard[0]}-of-{shard[1]}.lock" if shard is not None else ".run.lock"
    with RunDir(args.out, model_settings(args), overwrite=args.overwrite, owned_files=MODEL_FILES,
                owned_patterns=MODEL_PATTERNS, record=not args.report_only, lock_name=lock, command="bench model"):
        return _run_model(args, shard)


def _run_model(args: argparse.Namespace, shard) -> int:
    import torch

    from .. import list_methods, rank_layers
    from .data import wikipedia_articles
    from .bench.grid import shard_cells
    from .bench.store import RESULTS_FILE, results_files, shard_results_file
    from .model_bench import article_token_sets, build_grid, run_grid, selection_order_measured, write_model_results

    unknown = [m for m in args.methods if m not in list_methods()]
    if unknown:
        print(f"unknown method(s) {unknown}; registered: {', '.join(list_methods())}", file=sys.stderr)
        return 2
    if shard is not None and args.report_only:
        print("--report-only reads every shard's results file: give it without --shard", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    model, tokenizer = load_model(args.model, args.trust_remote_code, dtype=torch.float32, causal_lm=True)
    model_name = ("SmolLM2-135M-Instruct (real weights, fp32)" if args.model.lower() in SMOLLM2_NAMES
                  else f"{args.model} (fp32)")
    num_layers = getattr(model.config, "num_hidden_layers", None) or model.config.num_layers  # ChatGLM: num_layers
    method_layers = {}
    for item in args.method_layers or []:
        method, _, counts = item.partition("=")
        if method not in args.methods or not counts:
            print(f"--method-layers {item!r}: write METHOD=L1,L2 for a method in --methods", file=sys.stderr)
            return 2
        method_layers[method] = [int(x) for x in counts.split(",")]
    bad = [n for counts in [args.layers, *method_layers.values()] for n in counts if not 0 <= n <= num_layers]
    if bad:
        print(f"layer counts {bad}: the model has {num_layers} layers", file=sys.stderr)
        return 2
    cells = build_grid(args.methods, args.tokens, args.layers, args.selections, args.random_seeds, args.compare_selections_at,
                       method_layers, args.compare_methods)
    articles = wikipedia_articles(min_chars=0 if args.concat_articles else min(args.tokens + [args.calibration_tokens]))
    # the calibration article for select=measured: the last long-enough article, never one of the scored ones
    calibration_title, calibration_text = next(
        (t, x) for t, x in reversed(articles) if len(tokenizer(x).input_ids) >= args.calibration_tokens)
    header = _header(args, f"Model benchmark: patched {model_name.split(' (')[0]} on Wikipedia, prefill time and perplexity")
    if not args.report_only:
        cache: dict[int, list] = {}

        def texts_for(n: int):
            if n not in cache:
                cache[n] = article_token_sets(tokenizer, n, args.articles, articles, skip_titles=[calibration_title],
                                              concatenate=args.concat_articles)
            return cache[n]

        def measured_order():
            ids = tokenizer(calibration_text, return_tensors="pt").input_ids[:, : args.calibration_tokens]
            return selection_order_measured(model, ids)

        prepare = None
        if args.rope_scaling:
            from .bench.measure import scale_rope

            def prepare(n: int) -> None:
                print(f"RoPE for {n} tokens: {scale_rope(model, n, args.rope_scaling)}", file=sys.stderr)

        results_file = os.path.join(args.out, RESULTS_FILE)
        if shard is not None:  # its own file; the cells finished in any file of --out count as done
            cells = shard_cells(cells, *shard)
            results_file = os.path.join(args.out, shard_results_file(*shard))
        other_results = results_files(args.out)
        run_grid(model, cells, texts_for, results_file, other_results=other_results,
                 method_params=_parse_method_params(args.method_param), measured_order_for=measured_order,
                 profile=not args.no_profile, progress=not args.no_progress, prepare_tokens=prepare)
    ranking = rank_layers(model)
    extra = {"machine": machine_description(args.machine_note), "date": datetime.date.today().isoformat(),
             "model": model_name, "num_layers": num_layers, "rope_scaling": args.rope_scaling,
             "concat_articles": args.concat_articles,
             "weight_norm_order": ranking.order, "calibration_article": calibration_title,
             "grid": {"tokens": args.tokens, "articles": args.articles, "methods": args.methods, "layers": args.layers,
                      "selections": args.selections, "random_seeds": args.random_seeds, "method_layers": method_layers,
                      "compare_methods": args.compare_methods,
                      "compare_selections_at": args.compare_selections_at}}
    header += ["", f"Grid: tokens {args.tokens}, {args.articles} articles per N (cells of an earlier run on fewer articles "
               f"and not asked for here keep theirs: see the articles column), methods {args.methods}, layers {args.layers} "
               f"(per method: {method_layers or 'the same'}), "
               f"selections {args.selections} (random seeds {args.random_seeds}; selections other than weight_norm at "
               f"{args.compare_selections_at or 'every layer count'}, for {args.compare_methods or 'every method'}). Weight-norm order of the layers: {ranking.order}. "
               f"Calibration article for select=measured: '{calibration_title}' ({args.calibration_tokens} tokens)."
               + (" Texts: consecutive articles joined until N tokens." if args.concat_articles else "")
               + (f" RoPE: {args.rope_scaling}-scaled to each N beyond the checkpoint's trained length (factor N / "
                  "trained positions), baseline included." if args.rope_scaling else "")]
    goals = []
    if args.experiment:
        from .experiments import load_config

        config = load_config(args.experiment)
        goals = config.get("goal", [])
        header.insert(4, f"Experiment: `{args.experiment}` (`hf-sparse-attn bench run {args.experiment}` re-makes this directory).")
        runs = len(config.get("run", []))
        if runs > 1:  # the grid line describes this command only; the tables hold the cells of every run
            header[-1] = header[-1].replace("Grid: ", f"Grid of this command (the last of the config's {runs} [[run]] "
                                            "blocks; the others' options are in the config, their cells in the tables "
                                            "below): ", 1)
    write_model_results(args.out, num_layers, header_lines=header, extra=extra, goals=goals)
    print(f"wrote {args.out}/results.jsonl, results.json, results.md and plots")
    return 0


def run(args: argparse.Namespace) -> int:
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)
    if args.level == "kernel":
        return run_kernel(args)
    if args.level == "model":
        return run_model(args)
    if args.level == "run":
        from .experiments import run_experiment_command

        return run_experiment_command(args)
    print("choose a level: `hf-sparse-attn bench kernel|model|run --help`", file=sys.stderr)
    return 2
