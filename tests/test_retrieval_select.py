"""select="retrieval" (hf_sparse_attn/retrieval.py): the pass-key probe, the per-layer needle mass against
transformers' own attention probabilities, the order patch_model takes from it, the bad input, and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_sparse_attn import RetrievalProbe, current_plan, patch_model, retrieval_probe, retrieval_scores, unpatch_model
from hf_sparse_attn.selection import LayerRanking, selection_order
from tiny_checkpoint import build_tokenizer, save_tiny_checkpoint, tiny_llama

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny():
    tokenizer = build_tokenizer()
    return tiny_llama(len(tokenizer), num_layers=4).eval(), tokenizer


def test_the_probe_has_the_length_the_needle_at_spread_depths_and_the_question_last(tiny):
    _, tokenizer = tiny
    probe = retrieval_probe(tokenizer, length=300, samples=3, seed=1)
    assert probe.input_ids.shape == probe.needle_mask.shape == (3, 300)
    first = [int(torch.nonzero(row)[0]) for row in probe.needle_mask]
    assert first == sorted(first) and first[0] < 100 < first[1] < 200 < first[2]  # depths 1/6, 3/6, 5/6
    question = tokenizer(" What is the pass key? The pass key is", add_special_tokens=False)["input_ids"]
    assert all(row[-len(question):].tolist() == question for row in probe.input_ids)
    assert torch.equal(retrieval_probe(tokenizer, length=300, samples=3, seed=1).input_ids, probe.input_ids)
    with pytest.raises(ValueError, match="too short for a pass-key probe"):
        retrieval_probe(tokenizer, length=30)


def test_needle_mass_equals_transformers_attention_probabilities(tiny):
    """The mass is computed from captured q / k; transformers' eager attention (output_attentions) gives the same."""
    model, tokenizer = tiny
    probe = retrieval_probe(tokenizer, length=200, samples=2, query_rows=4)
    scores = retrieval_scores(model, probe)
    model.config._attn_implementation = "eager"
    per_layer = torch.zeros(len(scores), model.config.num_attention_heads)
    with torch.no_grad():
        for b in range(2):
            attentions = model(probe.input_ids[b:b + 1], output_attentions=True).attentions
            for i, a in enumerate(attentions):  # [1, H, N, N]
                per_layer[i] += a[0, :, -4:][..., probe.needle_mask[b]].sum(-1).mean(-1) / 2
    model.config._attn_implementation = "sdpa"
    assert scores == pytest.approx(per_layer.max(-1).values.tolist(), abs=1e-5)
    assert all(0.0 < s < 1.0 for s in scores)


def test_select_retrieval_approximates_the_least_needle_layers_first(tiny):
    model, tokenizer = tiny
    probe = retrieval_probe(tokenizer, length=200, samples=2)
    scores = retrieval_scores(model, probe)
    plan = patch_model(model, method="local", layers=2, select="retrieval", calibration=probe, window=16,
                       num_sink_tokens=2, min_seq_len=8)
    try:
        least = sorted(range(4), key=lambda i: scores[i])[:2]
        assert sorted(plan.patched_layers) == sorted(least)
        assert current_plan(model).select == "retrieval"
    finally:
        unpatch_model(model)
    ranking = LayerRanking([1.0, 2.0, 3.0], [[1.0]] * 3, "spectral", "mean", ["q"] * 3)
    assert selection_order(ranking, "retrieval", retrieval_scores=[0.5, 0.1, 0.5]) == [1, 0, 2]  # ties by index


def test_bad_retrieval_calibration_says_what_to_pass(tiny):
    model, tokenizer = tiny
    ids = torch.randint(4, 50, (1, 64))
    for calibration in (None, ids):
        with pytest.raises(ValueError, match=r"select='retrieval' needs calibration=hf_sparse_attn.retrieval_probe"):
            patch_model(model, method="local", layers=1, select="retrieval", calibration=calibration)
    assert current_plan(model) is None  # nothing half-applied
    with pytest.raises(ValueError, match="used only by select='measured' .* and select='retrieval'"):
        patch_model(model, method="local", layers=1, calibration=retrieval_probe(tokenizer, length=200))
    with pytest.raises(ValueError, match="needle_mask must be a bool tensor"):
        RetrievalProbe(ids, torch.zeros(1, 63, dtype=torch.bool))
    with pytest.raises(ValueError, match="needle tokens, all before its last query_rows"):
        RetrievalProbe(ids, torch.zeros(1, 64, dtype=torch.bool))


def test_smollm2_has_retrieval_layers_far_above_a_uniform_share(smollm2):
    """On the real model the needle mass is concentrated in some layers (the premise of keeping them exact): the most
    retrieving layer puts 10x more than a uniform share on the key's tokens, and layers differ by more than 5x."""
    model, tokenizer = smollm2
    probe = retrieval_probe(tokenizer, length=1024, samples=2)
    key = tokenizer.decode(probe.input_ids[0][probe.needle_mask[0]]).split()
    assert len(key) == 2 and key[0] == key[1] and key[0].isdigit() and len(key[0]) == 5
    scores = retrieval_scores(model, probe)
    uniform = float(probe.needle_mask.sum(-1).float().mean()) / 1024
    assert len(scores) == 30 and max(scores) > 10 * uniform and max(scores) > 5 * min(scores)


def test_ruler_command_line_selects_by_retrieval_and_records_the_probe(tmp_path):
    model_dir = tmp_path / "model"
    save_tiny_checkpoint(model_dir)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "hf_sparse_attn.cli", "ruler", "--model", str(model_dir), "--tasks",
                           "passkey", "--lengths", "300", "--samples", "1", "--method", "local", "--layers", "1",
                           "--select", "retrieval", "--out", str(out), "--no-progress"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    settings = json.loads((out / "run_settings.json").read_text())
    assert settings["select"] == "retrieval"
    assert settings["retrieval_probe"] == {"length": 512, "samples": 4, "seed": 0}  # the model's 512 positions
    plan = json.loads((out / "plan.json").read_text())
    assert plan["select"] == "retrieval" and sum(layer["method"] == "local" for layer in plan["layers"]) == 1


def test_longbench_refuses_a_selection_it_cannot_calibrate_before_loading(tmp_path, capsys):
    from hf_sparse_attn.cli import main

    rc = main(["longbench", "--model", "smollm2", "--suite", "offline", "--method", "local",
               "--select", "retrieval", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "--select retrieval needs calibration input" in err and "--plan" in err
    assert not (tmp_path / "out").exists()
