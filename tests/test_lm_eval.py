"""lm-evaluation-harness integration, offline: a YAML task over a JSONL file written here, a tiny random Llama
checkpoint with an offline-built tokenizer. ``hf-sparse`` with an exact plan scores like lm-eval's own ``hf`` model;
a fast method runs, serves, and reports its plan in the results."""

from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("lm_eval")

from tiny_checkpoint import WORDS, save_tiny_checkpoint  # noqa: E402

HYPER_SMALL = "block_size=16,sample_size=16,min_seq_len=32,causal_min_seq_len=32,window=8,num_sink_tokens=4"


@pytest.fixture(scope="module")
def task_and_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    save_tiny_checkpoint(root / "model")
    rng = random.Random(0)
    with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
        for _ in range(8):
            context = " ".join(rng.choice(WORDS) for _ in range(70))  # 70 words = 70 tokens: long enough to be served
            choices = [" ".join(rng.choice(WORDS) for _ in range(3)) for _ in range(3)]
            f.write(json.dumps({"context": context, "choices": choices, "gold": rng.randrange(3)}) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tiny_local.yaml").write_text(
        "task: tiny_local\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'docs.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{gold}}'\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        encoding="utf-8")
    return root, tasks


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _evaluate(model_type: str, model_args: str, tasks_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import hf_sparse_attn.lm_eval  # noqa: F401  (registers hf-sparse)

    return lm_eval.simple_evaluate(model=model_type, model_args=model_args, tasks=["tiny_local"], device="cpu",
                                   batch_size=1, task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
                                   log_samples=True)


def test_exact_plan_scores_like_the_plain_hf_model(task_and_checkpoint):
    root, tasks = task_and_checkpoint
    plain = _evaluate("hf", f"pretrained={root / 'model'}", tasks)
    exact = _evaluate("hf-sparse", f"pretrained={root / 'model'},method=exact,layers=all", tasks)
    metrics = lambda r: {k: v for k, v in r["results"]["tiny_local"].items() if k.startswith("acc")}
    assert metrics(exact) == metrics(plain)
    ll = lambda r: [resp[0][0] for s in r["samples"]["tiny_local"] for resp in s["resps"]]
    assert ll(exact) == pytest.approx(ll(plain), abs=1e-4)  # per-choice log-likelihoods, not only the accuracy
    assert exact["config"]["hf_sparse_attn_served"] > 0  # exact ran in every layer instead of sdpa
    assert "hf_sparse_attn_plan" not in plain["config"]


def test_fast_method_runs_and_reports_its_plan(task_and_checkpoint):
    root, tasks = task_and_checkpoint
    result = _evaluate("hf-sparse", f"pretrained={root / 'model'},method=hyper,layers=0;2,{HYPER_SMALL}", tasks)
    plan = result["config"]["hf_sparse_attn_plan"]
    assert [layer["method"] for layer in plan["layers"]] == ["hyper", None, "hyper"]
    assert plan["layers"][0]["params"]["block_size"] == 16
    assert plan["layers"][0]["served"] > 0 and result["config"]["hf_sparse_attn_served"] > 0
    assert 0.0 <= result["results"]["tiny_local"]["acc,none"] <= 1.0


def test_saved_plan_and_cli(task_and_checkpoint, tmp_path, monkeypatch):
    import transformers as T
    from lm_eval.tasks import TaskManager

    from hf_sparse_attn import patch_model
    from hf_sparse_attn.cli import main

    root, tasks = task_and_checkpoint
    model = T.AutoModelForCausalLM.from_pretrained(root / "model")
    patch_model(model, method="exact", layers=[1]).save(tmp_path / "plan.json")
    # lm-eval's CLI indexes its ~14k built-in task files first (~40 s here); this test needs only its own task
    init = TaskManager.__init__
    monkeypatch.setattr(TaskManager, "__init__", lambda self, *a, **kw: init(self, *a, **{**kw, "include_defaults": False}))
    out = tmp_path / "out"
    code = main(["lm-eval", "run", "--model", "hf-sparse", "--model_args", f"pretrained={root / 'model'},plan={tmp_path / 'plan.json'}",
                 "--tasks", "tiny_local", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "1",
                 "--output_path", str(out)])
    assert code == 0
    written = list(out.rglob("results_*.json"))
    assert len(written) == 1
    result = json.loads(written[0].read_text())
    assert [layer["method"] for layer in result["config"]["hf_sparse_attn_plan"]["layers"]] == [None, "exact", None]
    assert "acc,none" in result["results"]["tiny_local"]
