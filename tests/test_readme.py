"""The README's three ways in run as written (extracted and executed): patch_model; attn_implementation= with
from_pretrained, save_pretrained and hf_sparse_attn.from_pretrained; lm-eval's command line with hf-sparse."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(marker: str, language: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"<!-- {marker}")
    return re.search(rf"```{language}\n(.*?)```", text[start:], re.S).group(1)


def _skip_without_real_weights():
    if os.environ.get("HF_SPARSE_ATTN_SKIP_REAL_WEIGHTS") == "1":
        pytest.skip("real weights are tested in the main environment only")


def test_readme_usage_example_runs(tmp_path):
    _skip_without_real_weights()
    text = README.read_text(encoding="utf-8")
    marker = text.index("<!-- readme-example")
    code = re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)
    assert 6 <= len(code.strip().splitlines()) <= 12
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "perplexity" in result.stdout and (tmp_path / "plan.json").exists()
    ppl = float(result.stdout.rsplit("perplexity", 1)[1].split()[0])
    assert 1.0 < ppl < 100.0  # a patched model that still models real text


def test_cli_help_for_every_command():
    from hf_sparse_attn.cli import COMMANDS, build_parser

    parser = build_parser()
    help_text = parser.format_help()
    for name in COMMANDS:
        assert name in help_text, f"command {name} is missing from --help (its module failed to import?)"


LAMBADA_STANDIN = """task: lambada_openai
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_readme_load_and_lm_eval_examples_run(tmp_path, monkeypatch):
    """The attn_implementation= / from_pretrained example, then the lm-eval command on the checkpoint it saved.
    Offline, lambada_openai's hub data is replaced by a local task of the same name (lm-eval's --include_path takes
    precedence over its built-in tasks); the command is otherwise run as written."""
    _skip_without_real_weights()
    code = _block("readme-example-load", "python")
    assert len(code.strip().splitlines()) <= 10
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("The river") and len(result.stdout.split()) > 2
    plan = json.loads((tmp_path / "patched" / "hf_sparse_attn_plan.json").read_text())
    assert sum(layer["method"] == "sparse_hyper" for layer in plan["layers"]) == 15

    from hf_sparse_attn.eval.data import wikipedia_sentences
    from lm_eval.tasks import TaskManager

    from hf_sparse_attn.cli import main

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    with open(tmp_path / "lambada.jsonl", "w", encoding="utf-8") as f:
        for sentence in wikipedia_sentences(8, min_words=12, max_words=40):
            f.write(json.dumps({"text": sentence}) + "\n")
    (tasks / "lambada_openai.yaml").write_text(LAMBADA_STANDIN.format(data=tmp_path / "lambada.jsonl"), encoding="utf-8")
    command = " ".join(_block("readme-example-lm-eval", "bash").replace("\\\n", " ").split())
    argv = shlex.split(command)
    assert argv[:2] == ["hf-sparse-attn", "lm-eval"]
    init = TaskManager.__init__  # skip indexing lm-eval's ~14k built-in task files (~40 s here)
    monkeypatch.setattr(TaskManager, "__init__", lambda self, *a, **kw: init(self, *a, **{**kw, "include_defaults": False}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert main(argv[1:] + ["--include_path", str(tasks)]) == 0
    written = list((tmp_path / "lm_eval_out").rglob("results_*.json"))
    assert len(written) == 1
    results = json.loads(written[0].read_text())
    assert 1.0 < results["results"]["lambada_openai"]["perplexity,none"] < 1e6
    assert sum(layer["method"] == "sparse_hyper" for layer in results["config"]["hf_sparse_attn_plan"]["layers"]) == 15
