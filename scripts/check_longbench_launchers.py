"""Run the CPU launch lines of docs/longbench.md on a tiny random model and say what each one really does.

    python scripts/check_longbench_launchers.py [--workdir DIR]

For each launcher: the number of processes the run reports (summary.json ``meta.num_processes``), whether every
sample was predicted exactly once (``shard`` field of each merged line), and whether the predictions equal a
single-process run's. The launchers:

- ``hf-sparse-attn longbench ...`` (one process: the reference)
- ``torchrun --standalone --nproc_per_node 2 -m hf_sparse_attn.cli longbench ...``
- ``torchrun --nnodes 1 --node_rank 0 --master_addr 127.0.0.1 --master_port PORT --nproc_per_node 2 ...``
  (the multi-node form, with one node)
- ``accelerate launch --multi_gpu --num_processes 2 -m hf_sparse_attn.cli longbench ...``
- ``accelerate launch --cpu --num_processes 2 -m hf_sparse_attn.cli longbench ...``

The tiny model and the LongBench-format samples come from the test helpers (tests/longbench_tiny.py), so the
script and the tests use the same fixture.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from longbench_tiny import cli_env, samples, tiny_llama, write_jsonl  # noqa: E402

BIN = os.path.dirname(sys.executable)
TASKS = {"hotpotqa": 10, "samsum": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_args(model_dir: str, data_dir: str, out: str) -> list[str]:
    return ["longbench", "--model", model_dir, "--data", data_dir, "--tasks", ",".join(TASKS), "--out", out,
            "--method", "exact", "--layers", "1", "--max-length", "300", "--max-new-tokens", "8", "--no-progress"]


def _launchers() -> dict[str, list[str]]:
    module = ["-m", "hf_sparse_attn.cli"]
    return {
        "hf-sparse-attn (one process)": [os.path.join(BIN, "hf-sparse-attn")],
        "torchrun --standalone --nproc_per_node 2": [os.path.join(BIN, "torchrun"), "--standalone",
                                                     "--nproc_per_node", "2", *module],
        "torchrun --nnodes 1 --node_rank 0 --master_addr ... --nproc_per_node 2": [
            os.path.join(BIN, "torchrun"), "--nnodes", "1", "--node_rank", "0", "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "--nproc_per_node", "2", *module],
        "accelerate launch --multi_gpu --num_processes 2": [os.path.join(BIN, "accelerate"), "launch", "--multi_gpu",
                                                            "--num_processes", "2", *module],
        "accelerate launch --cpu --num_processes 2": [os.path.join(BIN, "accelerate"), "launch", "--cpu",
                                                      "--num_processes", "2", *module],
    }


def _predictions(out: str) -> dict:
    found = {}
    for task in TASKS:
        with open(os.path.join(out, f"{task}.jsonl"), encoding="utf-8") as f:
            found[task] = [json.loads(line) for line in f]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where the model, data and runs go (default: a temporary directory)")
    workdir = parser.parse_args().workdir or tempfile.mkdtemp(prefix="longbench_launchers_")
    model_dir, data_dir = os.path.join(workdir, "model"), os.path.join(workdir, "data")
    tiny_llama(model_dir)
    for i, (task, n) in enumerate(TASKS.items()):
        write_jsonl(os.path.join(data_dir, f"{task}.jsonl"), samples(task, n, seed=i))
    env = cli_env()
    env["HOME"] = os.path.join(workdir, "home")  # no user accelerate config: the launcher's own defaults
    reference = None
    rows = []
    for i, (name, launcher) in enumerate(_launchers().items()):
        out = os.path.join(workdir, f"run{i}")
        proc = subprocess.run([*launcher, *_run_args(model_dir, data_dir, out)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            rows.append((name, f"failed (exit {proc.returncode})", "-", "-"))
            print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
            continue
        with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
            processes = json.load(f)["meta"]["num_processes"]
        predictions = _predictions(out)
        ids = [r["_id"] for records in predictions.values() for r in records]
        once = len(ids) == len(set(ids)) == sum(TASKS.values())
        shards = sorted({r.get("shard", "-") for records in predictions.values() for r in records})
        preds = {task: [r["pred"] for r in records] for task, records in predictions.items()}
        if reference is None:
            reference = preds
        rows.append((name, str(processes), f"{once} (shards {', '.join(shards)})", str(preds == reference)))
    print("| launcher | processes | each sample once | predictions equal one process |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
