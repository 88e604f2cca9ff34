"""`hf-sparse-attn bench kernel|model|run`: speed and error of the methods alone, and of a patched real model.

    hf-sparse-attn bench kernel --inputs random smollm2 minilm --ns 1024 4096 16384 --dtypes fp32 bf16 --out DIR
    hf-sparse-attn bench model --tokens 8192 --articles 20 --methods sparse_hyper hyper --layers 0 8 15 23 30 \\
        --selections weight_norm last first measured random --out DIR
    hf-sparse-attn bench run eval/experiments/model_bench_grid.toml [--shard I/N] [--report-only] [--dry-run]

All are resumable (give the same --out again: finished cells are skipped) and write JSON, a markdown table and
PNG plots into --out. Every speed-up is measured against torch SDPA / the exact model in the same run. `run` runs
an experiment config: the commands it declares, into eval/results/<name>/ (hf_sparse_attn.commands.experiments).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
from typing import Any, Optional

from .arguments import decode_arguments, parse_method_params, parse_shard
from .bench_options import SELECTIONS, add_kernel_and_model_levels  # noqa: F401  (SELECTIONS: tests/test_run_trust.py)
from .experiments import configure_run, load_config, run_experiment_command
from .models import SMOLLM2_NAMES, load_model


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


def machine_description(note: str = "", hardware: Optional[str] = None) -> str:
    """A report's machine, e.g. "2-core CPU (x86_64), no GPU; NOTE": ``hardware`` (default: this machine's CPU
    cores and GPU), then the note."""
    if hardware is None:
        import torch

        cuda = torch.cuda.is_available()
        hardware = f"{os.cpu_count()}-core CPU ({platform.machine()}), {'GPU: ' + torch.cuda.get_device_name(0) if cuda else 'no GPU'}"
    return hardware + (f"; {note}" if note else "")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = __doc__.split("\n\n", 1)[1]
    levels = parser.add_subparsers(dest="level", metavar="LEVEL")
    add_kernel_and_model_levels(levels)
    configure_run(levels)


def run_facts(args: argparse.Namespace) -> dict:
    """What a report states of the run: machine, date, torch, threads, python. For a run that measures, this
    process's; with --report-only, what --out's results.json recorded of the run that measured its cells (the
    hardware part of its machine, with the machine note of this command; ``bench model``: its latest run record for
    torch, threads and python; this process's for anything not recorded), so that a rebuild on another day or
    machine reproduces the report."""
    import torch

    facts = {"machine": machine_description(args.machine_note), "date": datetime.date.today().isoformat(),
             "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    path = os.path.join(args.out, "results.json")
    if not getattr(args, "report_only", False) or not os.path.exists(path):
        return facts
    import json

    with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    last_run = (stored.get("runs") or [{}])[-1]
    facts = {key: stored.get(key, last_run.get(key, value)) for key, value in facts.items()}
    if stored.get("machine"):
        facts["machine"] = machine_description(args.machine_note, hardware=stored["machine"].split("; ", 1)[0])
    return facts


def _header(args: argparse.Namespace, what: str, facts: dict) -> list[str]:
    return [f"# {what}", "",
            f"Machine: {facts['machine']}; torch {facts['torch']}, {facts['threads']} threads, "
            f"Python {facts['python']}. Date: {facts['date']}.",
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
    from ..eval.run_dir import RunDir

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
    from ..eval.bench.kernel_suite import kernel_report_markdown, run_kernel_suite, suite_cells
    from ..eval.plots import plot_kernel_time_vs_n

    methods = args.methods or list_methods()
    params = _parse_method_params(args.method_param)
    causal_modes = {"both": [False, True], "causal": [True], "bidirectional": [False]}[args.causal]
    cells = suite_cells(args.inputs, args.ns, causal_modes, args.dtypes)
    header = {"machine": machine_description(args.machine_note), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
              "methods": methods, "params": params,
              "max_n": _parse_max_n(args.max_n), "device": args.device}
    if not args.report_only:
        results = run_kernel_suite(args.out, cells, methods, repeats=args.repeats, warmup=args.warmup, params=params,
                                   max_n=_parse_max_n(args.max_n), header=header, progress=not args.no_progress,
                                   device=args.device)
    else:
        import json

        with open(os.path.join(args.out, "results.json"), encoding="utf-8") as f:
            results = json.load(f)
    lines = _header(args, "Kernel benchmark: every method vs torch SDPA on the same inputs", run_facts(args))
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
    from ..eval.run_dir import path_fingerprint

    return {"command": "bench model", "model": args.model, "model_fingerprint": path_fingerprint(args.model),
            "method_params": _parse_method_params(args.method_param), "rope_scaling": args.rope_scaling,
            "concat_articles": bool(args.concat_articles), "calibration_tokens": args.calibration_tokens}


MODEL_FILES = ["results.jsonl", "results.json", "results.md"]
MODEL_PATTERNS = [r"results\.shard-\d+-of-\d+\.jsonl", r"ppl_vs_speedup_\d+\.png",
                  r"selections_by_article_.+layers_\d+\.png", r"selections_vs_layers_.+_\d+\.png"]


def run_model(args: argparse.Namespace) -> int:
    from ..eval.run_dir import RunDir

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
    from ..eval.data import wikipedia_articles
    from ..eval.bench.grid import shard_cells
    from ..eval.bench.results import RESULTS_FILE, results_files, shard_results_file
    from ..eval.bench import article_token_sets, build_grid, run_grid, selection_order_measured, write_model_results

    unknown = [m for m in args.methods if m not in list_methods()]
    if unknown:
        print(f"unknown method(s) {unknown}; registered: {', '.join(list_methods())}", file=sys.stderr)
        return 2
    if shard is not None and args.report_only:
        print("--report-only reads every shard's results file: give it without --shard", file=sys.stderr)
        return 2
    try:
        from ..validation import check_decode

        decode = decode_arguments(args)
        check_decode(decode["decode_method"], decode["decode_params"])
    except ValueError as err:
        print(f"--decode-method / --decode-param: {err}", file=sys.stderr)
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
    facts = run_facts(args)
    header = _header(args, f"Model benchmark: patched {model_name.split(' (')[0]} on Wikipedia, prefill time and perplexity",
                     facts)
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

        def retrieval_order():
            from ..eval.bench.grid import selection_order_retrieval
            from ..retrieval import probe_length

            positions = getattr(model.config, "max_position_embeddings", None)
            return selection_order_retrieval(model, tokenizer, length=probe_length(positions))

        prepare = None
        if args.rope_scaling:
            from ..eval.bench.measure import scale_rope

            def prepare(n: int) -> None:
                print(f"RoPE for {n} tokens: {scale_rope(model, n, args.rope_scaling)}", file=sys.stderr)

        results_file = os.path.join(args.out, RESULTS_FILE)
        if shard is not None:  # its own file; the cells finished in any file of --out count as done
            cells = shard_cells(cells, *shard)
            results_file = os.path.join(args.out, shard_results_file(*shard))
        other_results = results_files(args.out)
        run_grid(model, cells, texts_for, results_file, other_results=other_results,
                 method_params=_parse_method_params(args.method_param), measured_order_for=measured_order,
                 retrieval_order_for=retrieval_order, profile=not args.no_profile, progress=not args.no_progress,
                 prepare_tokens=prepare, decode=decode)
        if args.decode_tokens > 0:
            from ..eval.bench.grid import run_decode_cells

            run_decode_cells(model, cells, texts_for, results_file, steps=args.decode_tokens,
                             cell_cache=args.decode_cache, baseline_cache=args.decode_baseline_cache,
                             method_params=_parse_method_params(args.method_param), measured_order_for=measured_order,
                             retrieval_order_for=retrieval_order, other_results=other_results,
                             progress=not args.no_progress, prepare_tokens=prepare,
                             **decode)
    ranking = rank_layers(model)
    extra = {"machine": facts["machine"], "date": facts["date"],
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
        return run_experiment_command(args)
    print("choose a level: `hf-sparse-attn bench kernel|model|run --help`", file=sys.stderr)
    return 2
