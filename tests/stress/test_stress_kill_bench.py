"""kill -9 during `hf-sparse-attn bench model` (a tiny random Llama with a word-level tokenizer trained on the
Wikipedia text, through --model-dir), then resume with the same command: nothing lost, nothing duplicated, and
every cell's perplexity and per-article losses equal those of a clean run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.stress  # CI runs the stress suite with the rest; `pytest -m stress` runs only it

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHODS = ["hyper", "kmv"]
KILL_AFTER_ARTICLES = 3  # article records of patched cells written before the kill


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from hf_sparse_attn.eval.data import wikipedia_articles

    path = tmp_path_factory.mktemp("tiny_llama")
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text for _, text in wikipedia_articles()],
                            trainers.WordLevelTrainer(vocab_size=3000, special_tokens=["[UNK]", "[PAD]", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=1, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def _command(model_dir: str, out: str) -> list[str]:
    return [sys.executable, "-m", "hf_sparse_attn.cli", "bench", "model", "--model-dir", model_dir, "--out", out,
            "--tokens", "256", "--articles", "6", "--methods", *METHODS, "--layers", "0", "1", "3",
            "--selections", "weight_norm", "--no-profile", "--no-progress", "--threads", "1",
            "--calibration-tokens", "64",
            "--method-param", "hyper.min_seq_len=32", "--method-param", "hyper.block_size=32",
            "--method-param", "hyper.sample_size=16", "--method-param", "hyper.num_sink_tokens=4",
            "--method-param", "kmv.min_seq_len=32", "--method-param", "kmv.causal_block=64"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _records(out: str) -> list[dict]:
    from hf_sparse_attn.eval.bench import read_jsonl

    return read_jsonl(os.path.join(out, "results.jsonl"))


def _cells(records):
    """key -> (perplexity, nll_sum, tokens_scored, [(title, nll_sum, tokens)]) of every finished cell."""
    out = {}
    for r in records:
        if r.get("kind") == "cell":
            out[r["key"]] = (r["perplexity"], r["nll_sum"], r["tokens_scored"],
                             [(a["title"], a["nll_sum"], a["tokens"]) for a in r["per_article"]])
    return out


def test_kill_during_bench_model_then_resume_equals_a_clean_run(tiny_model_dir, tmp_path):
    clean_out = str(tmp_path / "clean")
    subprocess.run(_command(tiny_model_dir, clean_out), env=_env(), cwd=ROOT, check=True, timeout=600,
                   capture_output=True)
    clean = _records(clean_out)
    clean_cells = _cells(clean)
    assert len(clean_cells) == 1 + len(METHODS) * 2  # the baseline and every (method, layers) cell

    # kill -9 while a patched cell is part-way through its articles; the kill races the run, so when it lands between
    # two cells (no unfinished cell has an article yet) the attempt is repeated on a fresh folder
    for attempt in range(5):
        killed_out = str(tmp_path / f"killed{attempt}")
        proc = subprocess.Popen(_command(tiny_model_dir, killed_out), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if sum(r.get("kind") == "article" for r in _records(killed_out)) >= KILL_AFTER_ARTICLES:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed: make it longer"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        before = _records(killed_out)
        finished_before = set(_cells(before))
        pending = {(r["key"], r["title"]) for r in before if r.get("kind") == "article" and r["key"] not in finished_before}
        if pending:
            break
    assert pending, "every kill landed between two cells"
    assert len(finished_before) < len(clean_cells), "nothing was left to resume"

    subprocess.run(_command(tiny_model_dir, killed_out), env=_env(), cwd=ROOT, check=True, timeout=600,
                   capture_output=True)
    after = _records(killed_out)
    assert after[: len(before)] == before  # the resumed run only appends

    # nothing duplicated: one cell record per cell, one article record per (cell, article)
    cell_keys = [r["key"] for r in after if r.get("kind") == "cell"]
    assert sorted(cell_keys) == sorted(set(cell_keys))
    article_keys = [(r["key"], r["title"]) for r in after if r.get("kind") == "article"]
    assert len(article_keys) == len(set(article_keys))
    # nothing lost: every cell finished, and the articles computed before the kill were reused, not recomputed
    resumed_cells = _cells(after)
    assert resumed_cells.keys() == clean_cells.keys()
    reused = {(r["key"], a["title"]) for r in after if r.get("kind") == "cell" and r["key"] not in finished_before
              for a in r["per_article"] if a.get("resumed")}
    assert pending <= reused, "the resumed run recomputed articles finished before the kill"
    # results equal the clean run (losses are deterministic; times are not compared)
    for key, want in clean_cells.items():
        got = resumed_cells[key]
        assert got[2] == want[2] and got[3] == want[3], f"{key}: per-article losses differ from the clean run"
        assert got[0] == pytest.approx(want[0], rel=1e-12) and got[1] == pytest.approx(want[1], rel=1e-12)
    with open(os.path.join(killed_out, "results.json")) as f:
        summary = json.load(f)
    assert summary  # the report was rewritten from the whole file
