"""How long `hf-sparse-attn calibrate` takes at its defaults on one 4k-token text of SmolLM2, one thread.

    taskset -c 1 python scripts/calibrate_default_run.py --out eval/results/calibrate_default_run

Writes OUT/animal_farm_4k.txt (the first 4,096 SmolLM2 tokens of the offline Wikipedia article "Animal Farm"), runs
`hf-sparse-attn calibrate --model smollm2 --text OUT/animal_farm_4k.txt --threads 1 --out OUT/plan.json` in a
subprocess with every other option at its default, and writes OUT/results.json (wall time, the load average before
and after, the machine, the date, the plan's layers and methods) and OUT/results.md. The load average says whether
the core was quiet: the other core's jobs show in it too. `--report-only` rebuilds results.md from results.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ARTICLE = "Animal Farm"
TOKENS = 4096


def write_text(out: Path) -> Path:
    from transformers import AutoTokenizer

    from hf_sparse_attn.eval.data import smollm2_path, wikipedia_articles

    text = dict(wikipedia_articles())[ARTICLE]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < TOKENS:
        raise SystemExit(f"{ARTICLE!r} has {len(ids)} tokens, fewer than {TOKENS}")
    path = out / "animal_farm_4k.txt"
    path.write_text(tokenizer.decode(ids[:TOKENS]), encoding="utf-8")
    return path


def retrieval_summary(calibration: dict) -> dict | None:
    """The retrieval probe of the calibration: the exact model's score and the returned plan's."""
    probe = calibration.get("retrieval")
    if not probe or not probe.get("plans"):
        return None
    last = probe["plans"][-1]
    return {"samples": probe["samples"], "exact_score": probe["exact_score"], "plan_score": last["score"],
            "passes": last["passes"], "budget_points": probe["budget"]}


def report(out: Path) -> None:
    result = json.loads((out / "results.json").read_text())
    plan = result["plan"]
    lines = [
        "# calibrate at its defaults: one 4k-token text, SmolLM2, one thread",
        "",
        f"Made by `{result['command']}` (script: `scripts/calibrate_default_run.py`, config: "
        "`eval/experiments/calibrate_default_run.toml`) on {machine}, {date}.".format(**result),
        "",
        f"- wall time: **{result['wall_s'] / 60:.1f} min** (goal: under 10 min)",
        f"- 1-minute load average: {result['load_before'][0]:.2f} before, {result['load_after'][0]:.2f} after "
        "(2 cores: about 1 means the other core was busy, the calibrating core not shared)",
        f"- calibrate's own clock: {plan['elapsed_s']:.0f} s; its printed estimate before starting: "
        f"{plan['estimate_s']:.0f} s ({'; '.join(f'{what} {s:.0f} s' for what, s in plan['steps'])})",
        f"- the plan: {plan['layers']} of {plan['num_layers']} layers, perplexity change on the calibration text "
        f"{100 * plan['ppl_change']:+.2f}% (budget +3%)",
        *[f"  - {count} layers: {what}" for what, count in plan["methods"].items()],
        "- retrieval probe ({samples} samples): exact model {exact_score:.0f}, the plan {plan_score:.0f} (may lose "
        "{budget_points:g} points): {verdict}".format(**plan["retrieval"], verdict="passes" if plan["retrieval"]["passes"]
                                                      else "fails") if plan["retrieval"] else "- no retrieval probe",
        f"- exit status {result['returncode']}",
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report_only:
        report(out)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    text = write_text(out)
    plan_path = out / "plan.json"
    command = [sys.executable, "-m", "hf_sparse_attn.cli", "calibrate", "--model", "smollm2", "--text", str(text),
               "--threads", "1", "--out", str(plan_path)]
    load_before = os.getloadavg()
    start = time.perf_counter()
    done = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - start
    load_after = os.getloadavg()
    plan_info = {"layers": None, "num_layers": None, "methods": None, "ppl_change": None, "estimate_s": None,
                 "elapsed_s": None, "steps": None, "retrieval": None}
    if plan_path.exists():
        plan = json.loads(plan_path.read_text())
        layers = [entry for entry in plan.get("layers", []) if entry.get("method")]
        methods: dict[str, int] = {}
        for entry in layers:
            name = entry["method"] + " " + json.dumps(entry.get("params", {}), sort_keys=True)
            methods[name] = methods.get(name, 0) + 1
        calibration = plan.get("calibration", {})
        plan_info = {"layers": len(layers), "num_layers": len(plan.get("layers", [])), "methods": methods,
                     "ppl_change": calibration.get("calibration_change"),
                     "estimate_s": calibration.get("estimate_s"), "elapsed_s": calibration.get("elapsed_s"),
                     "steps": calibration.get("estimate"), "retrieval": retrieval_summary(calibration)}
    result = {
        "command": "taskset -c 1 python scripts/calibrate_default_run.py --out " + args.out,
        "calibrate_command": " ".join(command[1:]),
        "wall_s": wall, "returncode": done.returncode,
        "load_before": list(load_before), "load_after": list(load_after),
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})",
        "date": datetime.date.today().isoformat(), "plan": plan_info,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    report(out)
    print((out / "results.md").read_text())
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())
