"""The outputs of a RULER run: ``result.json``, ``summary.json``, ``report.md`` and the plots (matplotlib, Agg).

Scores: RULER's metric per task and length (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"; string_match_all for every generated task), and ``average`` per length: the mean over
the RULER tasks of the run (passkey, not a RULER task, is left out of the average unless it is the only task).

Depth: for the tasks with a needle (passkey, niah_*), each answer's needle depth (percent of the context) is binned
to the nearest 10 % and the share of answers found per (depth bin, length) is the heatmap cell.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Any, Optional

from ..store import write_json
from .metrics import score
from .tasks import TASK_SPECS

__all__ = ["write_outputs", "compute_result", "depth_table", "SUBSTITUTION", "LEFT_OUT"]

SUBSTITUTION = ("Essay haystack: RULER's Paul Graham essays cannot be downloaded here; the offline English Wikipedia "
                "articles (gensim's test dump) stand in for them in niah_single_2/3, niah_multikey_1, niah_multivalue "
                "and niah_multiquery.")
LEFT_OUT = "qa_1 / qa_2 are left out: their SQuAD and HotpotQA documents cannot be downloaded here."


def compute_result(records: dict[str, list[dict]], lengths: list[int]) -> dict[str, Any]:
    """{task: {length: score}} and ``average`` {length: mean over the RULER tasks (passkey too if alone)}."""
    result: dict[str, Any] = {}
    for task, recs in records.items():
        result[task] = {}
        for n in lengths:
            mine = [r for r in recs if r["length"] == n]
            if mine:
                result[task][str(n)] = score(task, [r["pred"] for r in mine], [r["answers"] for r in mine])
    averaged = [t for t in records if t != "passkey"] or list(records)
    result["average"] = {}
    for n in lengths:
        scores = [result[t][str(n)] for t in averaged if str(n) in result[t]]
        if scores:
            result["average"][str(n)] = round(sum(scores) / len(scores), 2)
    return result


def _bin(depth: float) -> int:
    return int(min(100, max(0, 10 * round(depth / 10))))


def depth_table(records: dict[str, list[dict]], lengths: list[int]) -> dict[str, dict[str, dict[str, float]]]:
    """{task: {length: {depth bin: % of answers found}}} for the tasks with needles."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for task, recs in records.items():
        if not TASK_SPECS[task].has_depth:
            continue
        table[task] = {}
        for n in lengths:
            cells: dict[int, list[int]] = {}
            for r in recs:
                if r["length"] != n or not r.get("answer_depths"):
                    continue
                for hit, depth in zip(r["hits"], r["answer_depths"]):
                    cell = cells.setdefault(_bin(depth), [0, 0])
                    cell[0] += int(bool(hit))
                    cell[1] += 1
            table[task][str(n)] = {str(b): round(100.0 * f / t, 2) for b, (f, t) in sorted(cells.items())}
    return table


def _environment() -> dict[str, Any]:
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown(result: dict, samples: dict, depths: dict, meta: dict, plan_summary: Optional[dict],
             lengths: list[int]) -> str:
    env = meta["environment"]
    machine = (f"{env['cpu_count']}-core CPU ({platform.machine()}), "
               + (f"GPU: {env['cuda']}" if env["cuda"] else "no GPU")
               + f"; torch {env['torch']} ({env['torch_threads']} threads), transformers {env['transformers']}, "
               f"Python {env['python']}")
    settings = meta["settings"]
    method = (f"plan {settings['plan']['path']}" if settings.get("plan") else settings.get("method") or "none")
    lines = [f"# RULER (offline): {meta['model']}, method {method}", "",
             f"Machine: {machine}. Date: {meta['date']}.", "",
             f"Command: `{meta['command']}`", "",
             "Benchmark: Hsieh et al. 2024, \"RULER: What's the Real Context Size of Your Long-Context Language "
             "Models?\", its synthetic tasks generated offline by `hf_sparse_attn.eval.ruler` (official templates, "
             "answer prefixes, output lengths and metrics; string_match_all). `passkey`: a 5-digit key in the "
             "repeated filler \"The grass is green. ...\" at depths 0-100 % (not a RULER task, not in the average).",
             "", f"- **Substitution.** {SUBSTITUTION}", f"- **Left out.** {LEFT_OUT}",
             f"- Samples per task and length: {settings['samples']}; seed {settings['seed']}; greedy decoding; "
             f"chat template {'applied' if settings['generation']['chat_template'] else 'not applied'} (the RULER "
             "prompt is plain text; an instruct model's chat template wraps it, the answer prefix follows the "
             "generation prompt). Each sample's input + output tokens fit its length exactly (this tokenizer).",
             ]
    if settings.get("rope_scaling"):
        lines.append(f"- RoPE: {settings['rope_scaling']}-scaled to each length beyond the model's {meta['positions']} "
                     "positions.")
    if settings.get("params"):
        lines.append(f"- Method parameters: {settings['params']}")
    if plan_summary is not None:
        if plan_summary.get("warning"):
            lines += ["", f"**{plan_summary['warning']}**"]
        lines += ["", f"Plan (this invocation): patched layers {plan_summary['patched_layers']}; prefill calls served "
                      f"{plan_summary['served']} of {plan_summary['prefill_calls']}; fallbacks "
                      f"{plan_summary['fallbacks'] or 'none'}; "
                      + (f"decode steps served by the decode method {plan_summary['decode_served']}, exact "
                         f"{plan_summary['decode_steps_exact']} ({plan_summary.get('decode_fallbacks') or 'none'})."
                         if "decode_served" in plan_summary else
                         f"decode steps (exact attention by design): {plan_summary['decode_steps_exact']}.")]
    lines += ["", "## Scores (0-100)", "", "| task | " + " | ".join(str(n) for n in lengths) + " |",
              "|---|" + "---:|" * len(lengths)]
    for task in [t for t in result if t != "average"]:
        lines.append(f"| {task} | " + " | ".join(_fmt(result[task].get(str(n))) for n in lengths) + " |")
    lines.append("| **average** | " + " | ".join(_fmt(result["average"].get(str(n))) for n in lengths) + " |")
    lines += ["", "Samples scored: " + "; ".join(
        f"{t}: " + ", ".join(f"{count} at {n}" for n, count in per_length.items()) for t, per_length in samples.items())]
    if depths:
        lines += ["", "## Needle depth (% of answers found, depth binned to 10 %)", ""]
        for task, per_length in depths.items():
            bins = sorted({int(b) for cells in per_length.values() for b in cells})
            lines += [f"**{task}**", "", "| length | " + " | ".join(f"{b}%" for b in bins) + " |",
                      "|---|" + "---:|" * len(bins)]
            for n, cells in per_length.items():
                lines.append(f"| {n} | " + " | ".join(_fmt(cells.get(str(b))) for b in bins) + " |")
            lines.append("")
    lines += ["", "Plots: `scores.png` (score by task and length), `depth_heatmap.png` (needle depth x length).", ""]
    return "\n".join(lines)


def plot_scores(result: dict, lengths: list[int], path: str) -> None:
    """Grouped bars: one group per task (and the average), one bar per length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t for t in result if t != "average"] + ["average"]
    width = 0.8 / len(lengths)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) * max(1, len(lengths)) ** 0.5 + 2), 4.5))
    for j, n in enumerate(lengths):
        xs = [i + (j - (len(lengths) - 1) / 2) * width for i in range(len(names))]
        ys = [result[t].get(str(n), float("nan")) for t in names]
        bars = ax.bar(xs, ys, width=width, label=f"{n} tokens")
        for bar, y in zip(bars, ys):
            if y == y:  # not NaN
                ax.text(bar.get_x() + bar.get_width() / 2, y + 1, f"{y:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 108)
    ax.set_ylabel("score (string_match_all, 0-100)")
    ax.set_title("RULER (offline) by task and length")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_depths(depths: dict, lengths: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(depths)
    bins = list(range(0, 101, 10))
    fig, axes = plt.subplots(1, len(tasks), figsize=(1.5 + 1.1 * len(lengths) * len(tasks) + 1.5 * len(tasks), 4.5),
                             squeeze=False)
    image = None
    for ax, task in zip(axes[0], tasks):
        grid = np.full((len(bins), len(lengths)), np.nan)
        for j, n in enumerate(lengths):
            for b, value in depths[task].get(str(n), {}).items():
                grid[bins.index(int(b)), j] = value
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)))
        ax.set_xticklabels([str(n) for n in lengths], rotation=45)
        ax.set_yticks(range(len(bins)))
        ax.set_yticklabels([f"{b}%" for b in bins])
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("length")
        for i in range(len(bins)):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=7)
    axes[0][0].set_ylabel("needle depth")
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="% found")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_outputs(out_dir: str, records: dict[str, list[dict]], lengths: list[int], meta: dict,
                  plan_summary: Optional[dict], plan_dict: Optional[dict]) -> dict:
    """Write result.json, summary.json, report.md, scores.png and depth_heatmap.png; return the result."""
    result = compute_result(records, lengths)
    depths = depth_table(records, lengths)
    samples = {t: {str(n): sum(1 for r in recs if r["length"] == n) for n in lengths} for t, recs in records.items()}
    meta = dict(meta, environment=_environment(), written=datetime.datetime.now(datetime.timezone.utc).isoformat())
    write_json(os.path.join(out_dir, "result.json"), result)
    summary = {"result": result, "samples": samples, "depth": depths, "substitutions": [SUBSTITUTION],
               "left_out": LEFT_OUT, "chat_template": meta["settings"]["generation"]["chat_template"],
               "plan_counts_this_invocation": plan_summary, "meta": meta, "plan": plan_dict}
    with open(os.path.join(out_dir, "summary.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, ensure_ascii=False, default=str)
    os.replace(os.path.join(out_dir, "summary.json.tmp"), os.path.join(out_dir, "summary.json"))
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown(result, samples, depths, meta, plan_summary, lengths))
    plot_scores(result, lengths, os.path.join(out_dir, "scores.png"))
    if depths:
        plot_depths(depths, lengths, os.path.join(out_dir, "depth_heatmap.png"))
    return result
