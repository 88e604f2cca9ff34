"""Retrieval on the speed-quality frontier: RULER / pass-key scores of patched SmolLM2 plans, with intervals.

    python scripts/ruler_frontier.py --out eval/results/ruler_frontier_smollm2 [--configs exact,local_w1024_30]
        [--tasks passkey:8192,niah_single_1:4096] [--samples 11] [--report-only]

Each configuration is one `hf-sparse-attn ruler` run into OUT/<configuration>/ (resumable: rerun the same command to
finish it; one torch thread, OMP_NUM_THREADS=1). The report reads every configuration's per-sample records and gives,
per task and length, the score with a 95% interval (Clopper-Pearson from scipy's binomial test where every sample
scores 0 or 1, a percentile bootstrap otherwise), beside the perplexity change and prefill speed-up that the
configuration measured on 20 articles in its own experiment (read from that experiment's results.json, named in the
table). A configuration differs from the unpatched model on a task only where the two intervals do not overlap. The
mean column averages the tasks that can show a loss: those where the unpatched model's interval lies above that of a
plan answering nothing (:func:`separates`).
Writes OUT/frontier.json, OUT/frontier.md, OUT/frontier.png (speed against perplexity, colour = the mean score over
the tasks every plotted configuration has) and OUT/retrieval.png (one panel per task most of them have, or two plans
have where it can show a loss: speed against its score with the interval).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from typing import Any, Optional

# the layers a plan does not choose: block_select's prefill (its defaults) and local decode (its defaults, spelled out)
LOCAL_DECODE_ELSEWHERE = ('other_layers={method = "block_select", decode_method = "local", '
                          'decode_params = {window = 1024, num_sink_tokens = 64}}')

# the 8k perplexity and prefill speed-up of the frontier's plans come from the runs that timed the exact model and the
# plan article by article in turn (bench model's paired protocol), on the same 10 articles with the other core busy
W512_PAIRED = "eval/results/model_bench_block_select_w512_paired"  # the recommended prefill, window 512
FRONTIER_PAIRED = "eval/results/model_bench_frontier_paired"  # local w1024 and block_select's windows by R
W1024_S64_PAIRED = "eval/results/model_bench_block_select_w1024_s64_paired"  # local w1024 + 64 columns, and local

# the recommended prefill (block_select window 1024 + 64 selected columns): its arguments, the same as other_layers'
# TOML, and where its 8k perplexity / speed come from
W1024_S64_ARGS = ["--param", "window=1024", "--param", "num_selected=64"]
W1024_S64_LAYERS = 'method = "block_select", window = 1024, num_selected = 64'
W1024_S64_SOURCE = (W1024_S64_PAIRED, "block_select", 30, {"window": 1024, "num_selected": 64})
# the layers a decode split does not choose: the same prefill, local decode (its defaults, spelled out)
W1024_S64_LOCAL_ELSEWHERE = (f'other_layers={{{W1024_S64_LAYERS}, decode_method = "local", '
                             'decode_params = {window = 1024, num_sink_tokens = 64}}')

# the single passes and kmv as the 8k frontier measured them (eval/experiments/model_bench_causal.toml)
SPARSE_HYPER_SINGLE_ARGS = ["--param", "causal_mode=single_pass", "--param", "window=512", "--param", "block_size=128"]
HYPER_SINGLE_ARGS = ["--param", "causal_mode=single_pass", "--param", "window=256", "--param", "block_size=128",
                     "--param", "sample_size=128"]
KMV_BLOCKS_ARGS = ["--param", "engine=blocks", "--param", "eps=0.3"]
# calibrate's plans at 8k over local's windows (eval/experiments/calibrate_smollm2_windows.toml)
CALIBRATED = "eval/results/calibrate_smollm2_windows"

# name -> (ruler patch arguments, where its perplexity / speed come from: (results dir, method, layers, params[,
# selection of that row, where it is not the configuration's own]), or None where they were not measured)
CONFIGS: dict[str, tuple[list[str], Optional[tuple]]] = {
    "exact": ([], None),
    "local_w1024_30": (["--method", "local", "--layers", "all", "--param", "window=1024"],
                       (FRONTIER_PAIRED, "local", 30, {"window": 1024})),
    "local_w1024_15": (["--method", "local", "--layers", "15", "--param", "window=1024"],
                       ("eval/results/model_bench_causal", "local", 15, {"window": 1024})),
    # the same 15 layers' count chosen by the needle mass of a pass-key probe (least first) instead of the weight norm
    "local_w1024_15_retrieval": (["--method", "local", "--layers", "15", "--select", "retrieval", "--param",
                                  "window=1024"],
                                 ("eval/results/model_bench_retrieval_select", "local", 15, {"window": 1024})),
    "block_select_30": (["--method", "block_select", "--layers", "all"],
                        (W512_PAIRED, "block_select", 30, {})),
    "block_select_w1024_30": (["--method", "block_select", "--layers", "all", "--param", "window=1024"],
                              ("eval/results/model_bench_block_select_w1024", "block_select", 30, {"window": 1024})),
    "block_select_w768_30": (["--method", "block_select", "--layers", "all", "--param", "window=768"],
                             ("eval/results/model_bench_block_select_w768_paired", "block_select", 30,
                              {"window": 768})),
    # window 768 and 256 selected columns: 64 + 768 + 256 = 1088 keys per row, as many as local w1024 reads
    "block_select_w768_s256_30": (["--method", "block_select", "--layers", "all", "--param", "window=768", "--param",
                                   "num_selected=256"],
                                  ("eval/results/model_bench_block_select_w768_s256_paired", "block_select", 30,
                                   {"window": 768, "num_selected": 256})),
    # local w1024's window and sinks plus 64 selected columns: 64 + 1024 + 64 = 1152 keys per row, 6% more than local
    "block_select_w1024_s64_30": (["--method", "block_select", "--layers", "all", *W1024_S64_ARGS], W1024_S64_SOURCE),
    # the same prefill with recommended(model)'s decode: exact on the 20 layers of largest R, local on the others
    "block_select_w1024_s64_30_decode_split_20": (["--method", "block_select", "--layers", "20", *W1024_S64_ARGS,
                                                   "--decode-method", "exact", "--param", W1024_S64_LOCAL_ELSEWHERE],
                                                  W1024_S64_SOURCE),
    # the same prefill with quest decode (its defaults) on those 20 layers instead of exact, local on the others
    "block_select_w1024_s64_30_decode_quest_split_20": (["--method", "block_select", "--layers", "20", *W1024_S64_ARGS,
                                                         "--decode-method", "quest", "--param",
                                                         W1024_S64_LOCAL_ELSEWHERE],
                                                        W1024_S64_SOURCE),
    # ... and with quest at a budget of 4096 keys on those 20 layers
    "block_select_w1024_s64_30_decode_quest_b4096_split_20": (["--method", "block_select", "--layers", "20",
                                                               *W1024_S64_ARGS, "--decode-method", "quest",
                                                               "--decode-param", "token_budget=4096", "--param",
                                                               W1024_S64_LOCAL_ELSEWHERE],
                                                              W1024_S64_SOURCE),
    # the same prefill with recommended(model, tokenizer)'s decode: local on the 20 layers of least needle attention
    # on a pass-key probe, exact on the other 10 (every layer prefills with block_select: the prefill row is the plan's)
    "block_select_w1024_s64_30_decode_local_20_retrieval": (["--method", "block_select", "--layers", "20", "--select",
                                                             "retrieval", *W1024_S64_ARGS, "--decode-method", "local",
                                                             "--decode-param", "window=1024", "--decode-param",
                                                             "num_sink_tokens=64", "--param",
                                                             f'other_layers={{{W1024_S64_LAYERS}, '
                                                             'decode_method = "exact"}'],
                                                            (*W1024_S64_SOURCE, "weight_norm")),
    # block_select (window 1024) on the 15 layers of largest R, where the needle mass sits, local w512 on the others
    "hybrid_15": (["--method", "block_select", "--layers", "15", "--param", "window=1024", "--param",
                   'other_layers={method = "local", window = 512}'],
                  ("eval/results/model_bench_hybrid", "block_select", 15, {"window": 1024})),
    # block_select everywhere, its window following R: 1024 on the 15 layers of largest R, its default 512 on the others
    "hybrid_windows_15": (["--method", "block_select", "--layers", "15", "--param", "window=1024", "--param",
                           'other_layers={method = "block_select", window = 512}'],
                          (FRONTIER_PAIRED, "block_select", 15, {"window": 1024})),
    # the rest of the 8k speed-perplexity frontier (README's table): narrower windows, the recursions and single passes
    # of hyper / sparse_hyper (their parameters in model_bench_causal / model_bench_grid), kmv's blocks engine, and the
    # calibrated plans
    "local_w512_30": (["--method", "local", "--layers", "all", "--param", "window=512"],
                      ("eval/results/model_bench_local_w512", "local", 30, {"window": 512})),
    "local_w512_15": (["--method", "local", "--layers", "15", "--param", "window=512"],
                      ("eval/results/model_bench_local_w512", "local", 15, {"window": 512})),
    "local_w256_30": (["--method", "local", "--layers", "all", "--param", "window=256"],
                      ("eval/results/model_bench_local_w256", "local", 30, {"window": 256})),
    "sparse_hyper_recursive_15": (["--method", "sparse_hyper", "--layers", "15"],
                                  ("eval/results/model_bench_grid", "sparse_hyper", 15, {})),
    "sparse_hyper_recursive_30": (["--method", "sparse_hyper", "--layers", "all"],
                                  ("eval/results/model_bench_grid", "sparse_hyper", 30, {})),
    "hyper_recursive_15": (["--method", "hyper", "--layers", "15"],
                           ("eval/results/model_bench_grid", "hyper", 15, {})),
    "hyper_recursive_30": (["--method", "hyper", "--layers", "all"],
                           ("eval/results/model_bench_grid", "hyper", 30, {})),
    "sparse_hyper_single_15": (["--method", "sparse_hyper", "--layers", "15", *SPARSE_HYPER_SINGLE_ARGS],
                               ("eval/results/model_bench_causal", "sparse_hyper", 15, {"causal_mode": "single_pass"})),
    "sparse_hyper_single_30": (["--method", "sparse_hyper", "--layers", "all", *SPARSE_HYPER_SINGLE_ARGS],
                               ("eval/results/model_bench_causal", "sparse_hyper", 30, {"causal_mode": "single_pass"})),
    "hyper_single_30": (["--method", "hyper", "--layers", "all", *HYPER_SINGLE_ARGS],
                        ("eval/results/model_bench_causal", "hyper", 30, {"causal_mode": "single_pass"})),
    "kmv_15": (["--method", "kmv", "--layers", "15", *KMV_BLOCKS_ARGS],
               ("eval/results/model_bench_causal", "kmv", 15, {"eps": 0.3})),
    "kmv_30": (["--method", "kmv", "--layers", "all", *KMV_BLOCKS_ARGS],
               ("eval/results/model_bench_causal", "kmv", 30, {"eps": 0.3})),
    # calibrate's plans for a perplexity budget of 1% and 3% (windows 1024 / 512 / 256 of local per layer)
    "calibrated_1pct": (["--plan", f"{CALIBRATED}/plan_0.01.json"], ("calibrated", CALIBRATED, 0.01)),
    "calibrated_3pct": (["--plan", f"{CALIBRATED}/plan_0.03.json"], ("calibrated", CALIBRATED, 0.03)),
    # the recommended prefill with a decode method over the KV cache (the prefill speed is block_select_30's)
    "block_select_30_decode_local": (["--method", "block_select", "--layers", "all", "--decode-method", "local"],
                                     (W512_PAIRED, "block_select", 30, {})),
    "block_select_30_decode_lsh": (["--method", "block_select", "--layers", "all", "--decode-method", "lsh"],
                                   (W512_PAIRED, "block_select", 30, {})),
    # quest at a budget of 1024 keys (its default until the runs below chose 2048), pages of 32 and of 16
    "block_select_30_decode_quest": (["--method", "block_select", "--layers", "all", "--decode-method", "quest",
                                      "--decode-param", "token_budget=1024"],
                                     (W512_PAIRED, "block_select", 30, {})),
    "block_select_30_decode_quest_p16": (["--method", "block_select", "--layers", "all", "--decode-method", "quest",
                                          "--decode-param", "page_size=16", "--decode-param", "token_budget=1024"],
                                         (W512_PAIRED, "block_select", 30, {})),
    "block_select_30_decode_quest_b2048": (["--method", "block_select", "--layers", "all", "--decode-method", "quest",
                                            "--decode-param", "token_budget=2048"],
                                           (W512_PAIRED, "block_select", 30, {})),
    # the recommended prefill unchanged (block_select on all 30 layers); decode exact on the 10 / 15 / 20 layers of
    # largest R, where the needle mass sits, sinks + window (local) on the others (other_layers with its own decode method)
    "block_select_30_decode_split_10": (["--method", "block_select", "--layers", "10", "--decode-method", "exact",
                                         "--param", LOCAL_DECODE_ELSEWHERE],
                                        (W512_PAIRED, "block_select", 30, {})),
    "block_select_30_decode_split_15": (["--method", "block_select", "--layers", "15", "--decode-method", "exact",
                                         "--param", LOCAL_DECODE_ELSEWHERE],
                                        (W512_PAIRED, "block_select", 30, {})),
    "block_select_30_decode_split_20": (["--method", "block_select", "--layers", "20", "--decode-method", "exact",
                                         "--param", LOCAL_DECODE_ELSEWHERE],
                                        (W512_PAIRED, "block_select", 30, {})),
    # the roles turned: local decode on the 20 layers that carry the least needle attention on a pass-key probe
    # (select="retrieval" chooses those first), exact decode on the other 10
    "block_select_30_decode_local_20_retrieval": (["--method", "block_select", "--layers", "20", "--select", "retrieval",
                                                   "--decode-method", "local", "--decode-param", "window=1024",
                                                   "--decode-param", "num_sink_tokens=64", "--param",
                                                   'other_layers={method = "block_select", decode_method = "exact"}'],
                                                  # every layer prefills with block_select: the selection only
                                                  # decides the decode, so the prefill row is block_select_30's
                                                  (W512_PAIRED, "block_select", 30, {},
                                                   "weight_norm")),
}
DEFAULT_CONFIGS = ("exact", "local_w1024_30", "block_select_30")
SMOLLM2_POSITIONS = 8192


def parse_tasks(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        task, _, length = item.partition(":")
        if not length.isdigit():
            raise SystemExit(f"--tasks takes TASK:LENGTH items, e.g. passkey:8192; got {item!r}")
        out.append((task.strip(), int(length)))
    return out


def run_config(name: str, out: str, tasks: list[tuple[str, int]], samples: int, seed: int = 0) -> None:
    """One `ruler` run per length of the configuration (its tasks at that length) into OUT/<name>/<length>; ``seed``
    draws the samples (another seed: other needles, keys and haystacks)."""
    args, _ = CONFIGS[name]
    by_length: dict[int, list[str]] = {}
    for task, length in tasks:
        by_length.setdefault(length, []).append(task)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for length, names in sorted(by_length.items()):
        command = [sys.executable, "-m", "hf_sparse_attn.cli", "ruler", "--model", "smollm2", "--tasks",
                   ",".join(names), "--lengths", str(length), "--samples", str(samples),
                   "--seed", str(seed), "--out", os.path.join(out, name, str(length)), *args]
        if length > SMOLLM2_POSITIONS:  # beyond the checkpoint's positions: RoPE YaRN-scaled, as model_bench_scaling
            command += ["--rope-scaling", "yarn"]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True, env=env)


def measured(out: str) -> tuple[list[str], list[tuple[str, int]]]:
    """The configurations with a directory in OUT (in CONFIGS' order) and every (task, length) they have records of
    (sorted): the report covers the whole directory, whichever [[run]] of the experiment wrote a part of it."""
    configs = [c for c in CONFIGS if os.path.isdir(os.path.join(out, c))]
    tasks = set()
    for name in configs:
        for length in os.listdir(os.path.join(out, name)):
            if length.isdigit():
                tasks.update((f[:-len(".jsonl")], int(length)) for f in os.listdir(os.path.join(out, name, length))
                             if f.endswith(".jsonl"))
    return configs, sorted(tasks, key=lambda t: (t[1], t[0]))


def recorded_hits(run_dir: str, task: str) -> dict[str, list[bool]]:
    """Sample id -> which of its references the recorded prediction holds (one bool per reference, in order)."""
    from hf_sparse_attn.eval.store import read_records

    records = read_records(os.path.join(run_dir, f"{task}.jsonl"))
    return {r["id"]: [bool(h) for h in r["hits"]] for r in records if r.get("hits")}


def sample_scores(hits: dict[str, list[bool]]) -> dict[str, float]:
    """Sample id -> score in [0, 1] (RULER's string_match_all: the fraction of references found), from
    :func:`recorded_hits`."""
    return {i: sum(h) / len(h) for i, h in hits.items()}


def kept_answers(hits: dict[str, list[bool]], exact_hits: dict[str, list[bool]]) -> Optional[list[int]]:
    """For a task with several references per sample (niah_multivalue, niah_multiquery: partial credit), [references
    the unpatched model finds that this configuration also finds, references the unpatched model finds], over the
    samples both ran; None for a task of one reference per sample (there "kept" counts whole samples already)."""
    if not any(len(h) > 1 for h in hits.values()):
        return None
    common = [i for i in exact_hits if i in hits]
    found = sum(sum(exact_hits[i]) for i in common)
    both = sum(sum(a and b for a, b in zip(exact_hits[i], hits[i])) for i in common)
    return [both, found]


def served_share(run_dir: str) -> Optional[list[int]]:
    """[prefill calls the plan's method served, prefill calls of its patched layers] of the run, or None unpatched;
    for a run that counted calls against the KV cache apart, two more: [decode steps its decode method served, decode
    steps of its patched layers]."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        counts = json.load(f).get("plan_counts_this_invocation") or {}
    if not counts.get("prefill_calls"):
        return None
    share = [counts["served"], counts["prefill_calls"]]
    if "decode_served" in counts:
        share += [counts["decode_served"], counts["decode_served"] + counts["decode_steps_exact"]]
    return share


def interval(scores: list[float]) -> tuple[float, float]:
    """95% interval of the mean score, in points (0-100)."""
    import numpy as np
    from scipy import stats

    n = len(scores)
    if all(s in (0.0, 1.0) for s in scores):
        ci = stats.binomtest(int(sum(scores)), n).proportion_ci(confidence_level=0.95, method="exact")
        return 100 * ci.low, 100 * ci.high
    rng = np.random.default_rng(0)
    means = rng.choice(np.asarray(scores), size=(10000, n), replace=True).mean(axis=1)
    return 100 * float(np.percentile(means, 2.5)), 100 * float(np.percentile(means, 97.5))


def model_cell(name: str) -> Optional[dict]:
    """Perplexity change and prefill speed-up of the configuration at 8k from its own experiment's results.json
    (None: not measured)."""
    if name == "exact":
        return {"ppl_change_pct": 0.0, "speedup": 1.0, "source": "reference"}
    source = CONFIGS[name][1]
    if source is None:
        return None
    if source[0] == "calibrated":  # a calibrated plan: its held-out change and speed-up in calibrate's results.json
        return calibrated_cell(*source[1:])
    results_dir, method, layers, params = source[:4]
    args = CONFIGS[name][0]
    select = source[4] if len(source) > 4 else args[args.index("--select") + 1] if "--select" in args else "weight_norm"
    for cell in read_results(results_dir).get("rows", []):
        if cell.get("method") == method and cell.get("layers") == layers and cell.get("tokens", 8192) == 8192 \
                and cell.get("select", "weight_norm") == select \
                and all(cell.get("params", {}).get(k) == v for k, v in params.items()):
            if cell.get("ppl_change_pct") is not None and cell.get("speedup") is not None:
                # the 95% bootstrap intervals over articles are the benchmark report's own (bench.report.summarize)
                return {"ppl_change_pct": cell["ppl_change_pct"], "speedup": cell["speedup"],
                        "articles": cell.get("articles"), "source": results_dir,
                        **{k: cell[k] for k in ("ppl_change_ci", "speedup_ci", "timing") if cell.get(k)}}
    return None


def separates(reference: Optional[dict]) -> bool:
    """Whether a task can show what a plan loses: the unpatched model's 95% interval (``reference``, its cell) lies
    above the interval of a plan that answers none of as many samples. Where it does not (vt on SmolLM2: 14 [6, 22] at
    8k against 0 [0, 15] for no answer), no score a plan makes differs from the unpatched model's: the task cannot
    separate the methods and is kept out of the mean."""
    return reference is not None and reference["low"] > interval([0.0] * reference["samples"])[1]


def read_results(results_dir: str) -> dict:
    """An experiment's results.json ({} where it is missing)."""
    path = os.path.join(results_dir, "results.json")
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def calibrated_cell(results_dir: str, budget: float) -> Optional[dict]:
    """Perplexity change and prefill speed-up of calibrate's plan for ``budget`` on its held-out articles (timed in
    calibrate's own run against the exact model; calibrate reports no interval), or None where it is missing."""
    for cell in read_results(results_dir).get("budgets", []):
        if cell.get("budget") == budget and cell.get("heldout_change") is not None:
            return {"ppl_change_pct": 100 * cell["heldout_change"], "speedup": cell["heldout_speedup"],
                    "articles": cell.get("heldout_articles"), "source": results_dir}
    return None


def report(out: str, configs: list[str], tasks: list[tuple[str, int]]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    # the unpatched model's hits, read once per task: every configuration's "kept" counts are against them
    exact_hits = {(task, length): recorded_hits(os.path.join(out, "exact", str(length)), task)
                  if "exact" in configs else {} for task, length in tasks}
    for name in configs:
        cells = {}
        for task, length in tasks:
            hits = recorded_hits(os.path.join(out, name, str(length)), task)
            by_id = sample_scores(hits)
            if by_id:
                scores = list(by_id.values())
                low, high = interval(scores)
                cells[f"{task}@{length}"] = {"score": 100 * sum(scores) / len(scores), "low": low, "high": high,
                                             "samples": len(scores)}
                # the facts the unpatched model finds (samples it scores 1 on), and how many of them this one keeps
                exact = sample_scores(exact_hits[(task, length)])
                found = [i for i, v in exact.items() if v == 1.0 and i in by_id]
                cells[f"{task}@{length}"]["kept"] = [sum(by_id[i] == 1.0 for i in found), len(found)]
                answers = kept_answers(hits, exact_hits[(task, length)])
                if answers is not None:
                    cells[f"{task}@{length}"]["kept_answers"] = answers
                cells[f"{task}@{length}"]["served"] = served_share(os.path.join(out, name, str(length)))
        rows[name] = {"cells": cells, "model": model_cell(name)}
    reference = rows.get("exact", {}).get("cells", {})
    for name, row in rows.items():
        for key, cell in row["cells"].items():
            ref = reference.get(key)
            cell["differs_from_exact"] = bool(ref and name != "exact" and
                                              (cell["high"] < ref["low"] or cell["low"] > ref["high"]))
    keys = [f"{t}@{n}" for t, n in tasks]
    compared = [key for key in keys if separates(reference.get(key))] if reference else keys
    for row in rows.values():
        # the mean over the tasks that can show a loss; none where one of them was not run (a mean of fewer tasks
        # would not compare)
        scores = [row["cells"][key]["score"] for key in compared if key in row["cells"]]
        row["mean_score"] = sum(scores) / len(scores) if compared and len(scores) == len(compared) else None
    result = {"date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU; one torch thread per run",
              "command": "python scripts/ruler_frontier.py --out " + out,
              "tasks": keys, "compared_tasks": compared, "rows": rows}
    from hf_sparse_attn.eval.store import write_json

    write_json(os.path.join(out, "frontier.json"), result)
    write_markdown(out, result)
    plot(out, result)
    return result


def write_markdown(out: str, result: dict) -> None:
    from hf_sparse_attn.eval.bench.grid import PAIRED_TIMING

    keys = result["tasks"]
    lines = [f"# RULER / pass key of patched SmolLM2-135M-Instruct plans: {os.path.basename(os.path.normpath(out))}", "",
             f"Written by `scripts/ruler_frontier.py` (eval/experiments/{os.path.basename(os.path.normpath(out))}.toml) on "
             f"{result['date']}; machine: {result['machine']}.",
             "Scores 0-100 with 95% intervals; `*` marks a score whose interval does not overlap the unpatched "
             "model's. \"kept a/b\": of the b samples the unpatched model answers fully (the same prompts, "
             "the same seed), the configuration answers a: the facts a plan loses; \"answers kept a/b\" (tasks with several answers per sample, "
             "scored by the fraction found): of the b answers the unpatched model finds, the configuration finds a. "
             "\"served s/c\": prefill attention calls "
             "of the patched layers its method ran (the rest ran exact attention, e.g. prompts under `min_seq_len`); \"decode served\": "
             "decode steps its decode method ran (`_decode_<method>` configurations; the others decode with exact attention: `patch_model`'s `exact` decode, or, in plan files saved without a decode method such as calibrate's, the model's own attention, counted as 0 served). Perplexity change and prefill speed-up: 8k, Wikipedia articles (count in the last column), from the experiment named "
             "in the last column (each against its own exact run; \"paired\": the exact model and the plan timed article by article in turn, "
             "the others every article exact, then every article patched), with 95% bootstrap intervals over articles; "
             "calibrated plans: calibrate's held-out articles, timed in its own run, no interval. RULER's essay haystack is replaced by offline "
             "Wikipedia articles (niah tasks).", "",
             mean_note(result), "",
             "| configuration | " + " | ".join(keys) + " | mean | perplexity change | prefill speed-up | source |",
             "|---|" + "---|" * (len(keys) + 4)]
    for name, row in result["rows"].items():
        cells = []
        for key in keys:
            c = row["cells"].get(key)
            cells.append("—" if c is None else f"{c['score']:.0f} [{c['low']:.0f}, {c['high']:.0f}] "
                         f"(n={c['samples']}){' *' if c['differs_from_exact'] else ''}; kept "
                         f"{c['kept'][0]}/{c['kept'][1]}"
                         + ("" if "kept_answers" not in c else
                            f"; answers kept {c['kept_answers'][0]}/{c['kept_answers'][1]}")
                         + ("" if not c.get("served") else f"; served {c['served'][0]}/{c['served'][1]}")
                         + ("" if not c.get("served") or len(c["served"]) < 4 or not c["served"][3] else
                            f"; decode served {c['served'][2]}/{c['served'][3]}"))
        m = row["model"]
        mean = "—" if row["mean_score"] is None else f"{row['mean_score']:.0f}"
        ppl = "not measured" if m is None else f"{m['ppl_change_pct']:+.1f}%" + (
            f" [{m['ppl_change_ci'][0]:+.1f}, {m['ppl_change_ci'][1]:+.1f}]" if "ppl_change_ci" in m else "")
        speed = "not measured" if m is None else f"{m['speedup']:.2f}x" + (
            f" [{m['speedup_ci'][0]:.2f}, {m['speedup_ci'][1]:.2f}]" if "speedup_ci" in m else "")
        source = "—" if m is None else m["source"] + (f" ({m['articles']} articles" if m.get("articles") else "") + (
            ", paired" if m.get("timing") == PAIRED_TIMING else "") + (")" if m.get("articles") else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean} | {ppl} | {speed} | "
                     f"{source} |")
    keys = plotted_tasks(result)
    if keys:
        shown = keys[0] if len(keys) == 1 else "mean of " + " and ".join(keys)
        missing = {key: [n for n, r in plotted_rows(result) if key not in r["cells"]] for key in panel_tasks(result)}
        lacking = "; ".join(f"not run for {key}: {', '.join(names)}" for key, names in missing.items() if names)
        lines += ["", f"Plots: every prefill plan with a perplexity and speed-up (a `_decode_` configuration shares its "
                  f"prefill's point and is left out); frontier.png coloured by its {shown} score, retrieval.png one "
                  f"panel per task most of them ran or, where it can show a loss, two plans ran ({', '.join(missing)})" + (f"; {lacking}." if lacking else ".")]
    lines += ["", "![frontier](frontier.png)", "", "![retrieval](retrieval.png)", ""]
    with open(os.path.join(out, "frontier.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def mean_note(result: dict) -> str:
    """The report's line on what the mean column averages and which tasks it leaves out."""
    compared, keys = result["compared_tasks"], result["tasks"]
    left_out = [key for key in keys if key not in compared]
    text = ("Mean: over " + ", ".join(compared) + " (a row without one of them has none)") if compared else \
        "Mean: none, no task here can show a loss"
    if left_out:
        text += ("; left out: " + ", ".join(left_out) + ", where the unpatched model's 95% interval overlaps that of "
                 "a plan answering none of as many samples, so no plan's score there can differ from its own")
    return text + "."


def plotted_rows(result: dict) -> list[tuple[str, dict]]:
    """The configurations the plots show: those with a perplexity / speed-up, but the decode variants (a
    `_decode_` configuration shares its prefill's point)."""
    return [(n, r) for n, r in result["rows"].items() if r["model"] and "_decode_" not in n]


def plotted_tasks(result: dict) -> list[str]:
    """The task cells (e.g. "passkey@8192") that every plotted configuration has, in the report's order: frontier.png's
    colour is their mean (a mean over tasks would not compare rows that ran different tasks); empty if there is none."""
    rows = [r for _, r in plotted_rows(result)]
    return [key for key in result["tasks"] if rows and all(key in r["cells"] for r in rows)]


def panel_tasks(result: dict) -> list[str]:
    """The task cells that more than half of the plotted configurations have, or that can show a loss
    (:func:`separates`) and two plotted plans besides the unpatched model have: one panel each in retrieval.png (a
    configuration without the task is absent from its panel)."""
    named = plotted_rows(result)
    rows, plans = [r for _, r in named], [r for n, r in named if n != "exact"]
    return [key for key in result["tasks"] if 2 * _ran(key, rows) > len(rows) or
            (key in result["compared_tasks"] and _ran(key, plans) >= 2)]


def _ran(key: str, rows: list[dict]) -> int:
    """How many of ``rows`` have the task cell ``key``."""
    return sum(key in r["cells"] for r in rows)


def plot(out: str, result: dict) -> None:
    """frontier.png: speed-up against perplexity change, colour = the mean score over the plotted tasks; retrieval.png:
    one panel per task of :func:`panel_tasks`, speed-up against its score with the 95% interval, colour = perplexity
    change; the points carry the same numbers in both figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = plotted_tasks(result)
    points = plotted_rows(result) if keys else []
    score = {n: sum(r["cells"][key]["score"] for key in keys) / len(keys) for n, r in points}
    numbers = _numbers(points)
    fig, ax = plt.subplots(figsize=(10, 5.5))
    if points:
        sc = ax.scatter([r["model"]["speedup"] for _, r in points], [r["model"]["ppl_change_pct"] for _, r in points],
                        c=[score[n] for n, _ in points], cmap="viridis", vmin=0, vmax=100, s=80)
        _label(ax, numbers, [(n, r["model"]["speedup"], r["model"]["ppl_change_pct"]) for n, r in points])
        ax.text(1.3, 1.0, _key(numbers), transform=ax.transAxes, fontsize=7, va="top", ha="left", family="monospace")
        label = f"{keys[0]} score" if len(keys) == 1 else "mean score of " + ", ".join(keys)
        fig.colorbar(sc, ax=ax, label=label)
    ax.set_xlabel("prefill speed-up at 8k (x)")
    ax.set_ylabel("perplexity change (%)")
    ax.set_title("SmolLM2-135M: speed, perplexity and retrieval", fontsize=9)
    fig.subplots_adjust(left=0.08, right=0.58)
    fig.savefig(os.path.join(out, "frontier.png"), dpi=120)
    plt.close(fig)

    panels = panel_tasks(result) if points else []
    ppl_low = min((r["model"]["ppl_change_pct"] for _, r in points), default=0.0)
    ppl_high = max((r["model"]["ppl_change_pct"] for _, r in points), default=1.0)
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)) + 5.5, 5.5), sharex=True,
                             sharey=True, squeeze=False)
    for i, ax in enumerate(axes[0]):
        if panels:
            ran = [(n, r) for n, r in points if panels[i] in r["cells"]]
            xs = [r["model"]["speedup"] for _, r in ran]
            ppl = [r["model"]["ppl_change_pct"] for _, r in ran]
            cells = [r["cells"][panels[i]] for _, r in ran]
            ax.errorbar(xs, [c["score"] for c in cells], yerr=[[c["score"] - c["low"] for c in cells],
                                                               [c["high"] - c["score"] for c in cells]],
                        fmt="none", ecolor="0.7", elinewidth=1, zorder=1)
            sc = ax.scatter(xs, [c["score"] for c in cells], c=ppl, cmap="magma_r", vmin=ppl_low, vmax=ppl_high, s=60,
                            zorder=2)
            _label(ax, numbers, [(n, x, c["score"]) for (n, _), x, c in zip(ran, xs, cells)])
            ax.set_title(f"{panels[i]} (95% interval)", fontsize=9)
        ax.set_xlabel("prefill speed-up at 8k (x)")
    axes[0][0].set_ylabel("score")
    if panels:
        fig.colorbar(sc, cax=fig.add_axes((0.68, 0.11, 0.012, 0.77)), label="perplexity change (%)")
        fig.text(0.75, 0.88, _key(numbers), fontsize=7, va="top", ha="left", family="monospace")
    fig.suptitle("SmolLM2-135M: what each plan's speed costs in facts", fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.66)
    fig.savefig(os.path.join(out, "retrieval.png"), dpi=120)
    plt.close(fig)


def _numbers(points: list[tuple[str, dict]]) -> dict[str, int]:
    """One number per plotted configuration, in order of speed-up, the same in every panel: names of nearby points would
    overlap, so the plots show numbers and list the names beside the axes."""
    order = sorted(points, key=lambda p: (p[1]["model"]["speedup"], p[1]["model"]["ppl_change_pct"], p[0]))
    return {name: i for i, (name, _) in enumerate(order, start=1)}


def _label(ax: Any, numbers: dict[str, int], points: list[tuple[str, float, float]]) -> None:
    """Write each point's number beside it (configurations at one point share a label, "3,4")."""
    at: dict[tuple[float, float], list[int]] = {}
    for name, x, y in points:
        at.setdefault((x, y), []).append(numbers[name])
    for (x, y), nums in at.items():
        ax.annotate(",".join(str(n) for n in sorted(nums)), (x, y), fontsize=7, xytext=(5, 3),
                    textcoords="offset points")
    ax.margins(x=0.1, y=0.15)


def _key(numbers: dict[str, int]) -> str:
    return "\n".join(f"{i}  {name}" for name, i in sorted(numbers.items(), key=lambda item: item[1]))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help=f"comma-separated, from: {', '.join(CONFIGS)}")
    parser.add_argument("--tasks", default="passkey:8192,niah_single_1:4096", help="TASK:LENGTH items")
    parser.add_argument("--samples", type=int, default=11, help="samples per task and length (passkey: 11 = one "
                                                                "per depth 0, 10, ..., 100%%)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples (and of each plan), passed to ruler")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    tasks = parse_tasks(args.tasks)
    if not args.report_only:
        for name in configs:
            run_config(name, args.out, tasks, args.samples, args.seed)
    done, found = measured(args.out)
    report(args.out, done, [t for t in tasks if t in found] + [t for t in found if t not in tasks])
    print(open(os.path.join(args.out, "frontier.md"), encoding="utf-8").read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
