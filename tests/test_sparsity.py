""""Attention is Naturally Sparse" k-sparsity audit: constructed rows, counting conventions, measured scores, patch_model(select="measured")."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from hf_sparse_attn.eval.sparsity import (
    SparsityCounts,
    measured_sparsity_scores,
    row_topk_mass,
    spearman,
)


def _brute_topk_mass(q, k, scale, causal, ks):
    H, N, _ = q.shape
    scores = scale * q.double() @ k.double().transpose(-1, -2)
    if causal:
        scores = scores.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), -math.inf)
    p = scores.softmax(-1).sort(-1, descending=True).values.cumsum(-1)
    return torch.stack([p[..., min(kk, N) - 1] for kk in ks], -1)


def test_constructed_rows_have_known_topk_mass():
    """Keys are orthogonal with norm a; query i equals key t(i): its row has one entry e^(a^2) and N-1 entries 1, so
    the top-1 mass is e^(a^2) / (e^(a^2) + N - 1) and the top-k mass adds (k-1) / (e^(a^2) + N - 1)."""
    N, a = 16, 2.0
    keys = torch.eye(N)[None] * a  # [1, N, N]
    targets = torch.tensor([3, 0, 7, 15] * 4)
    queries = keys[:, targets]
    mass, keys_per_row = row_topk_mass(queries, keys, 1.0, causal=False, ks=(1, 2, 4, 16, 99))
    z = math.exp(a * a) + N - 1
    expected = torch.tensor([math.exp(a * a) / z, (math.exp(a * a) + 1) / z, (math.exp(a * a) + 3) / z, 1.0, 1.0])
    torch.testing.assert_close(mass[0], expected.expand(N, 5).float(), rtol=1e-5, atol=1e-6)
    assert keys_per_row.tolist() == [N] * N
    # (k, eps)-sparse: with a = 2, the top-1 mass is e^4 / (e^4 + 15) = 0.784
    counts = SparsityCounts((1, 4), (0.1, 0.25), num_heads=1)
    counts.add(mass[:, :, [0, 2]], keys_per_row)
    prob = counts.head_probability()[0]  # [K, E]
    assert prob[0].tolist() == [0.0, 1.0]  # top-1 mass 0.784: not 0.1-sparse, 0.25-sparse
    assert prob[1].tolist() == [0.0, 1.0]  # top-4 mass (e^4 + 3) / (e^4 + 15) = 0.828: the same


@pytest.mark.parametrize("causal", [False, True])
def test_topk_mass_equals_bruteforce_and_chunking(causal):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 50, 8, generator=g) * 2, torch.randn(3, 50, 8, generator=g) * 2
    ks = (1, 3, 10, 64)
    mass, keys_per_row = row_topk_mass(q, k, 0.4, causal=causal, ks=ks)
    torch.testing.assert_close(mass.double(), _brute_topk_mass(q, k, 0.4, causal, ks), rtol=1e-5, atol=1e-6)
    chunked, _ = row_topk_mass(q, k, 0.4, causal=causal, ks=ks, max_block_entries=100)  # 1 row at a time
    torch.testing.assert_close(chunked, mass, rtol=1e-5, atol=1e-6)
    assert keys_per_row.tolist() == (list(range(1, 51)) if causal else [50] * 50)
    assert not torch.isnan(mass).any()


def test_rows_with_at_most_k_keys_are_not_counted():
    counts = SparsityCounts((1, 4), (0.1,), num_heads=2)
    mass = torch.tensor([[[0.95, 1.0], [0.5, 1.0], [0.5, 0.8], [0.99, 0.99], [0.2, 0.95]]] * 2)  # [H=2, N=5, K=2]
    keys_per_row = torch.arange(1, 6)  # causal: row i has i + 1 keys
    counts.add(mass, keys_per_row)
    assert counts.eligible.tolist() == [[4, 1]] * 2  # k=1: rows with >= 2 keys; k=4: only the row with 5 keys
    assert counts.sparse[0, :, 0].tolist() == [1, 1]  # k=1: rows 1..4 -> only 0.99; k=4: row 4 with 0.95
    np.testing.assert_allclose(counts.layer_probability()[:, 0], [0.25, 1.0])
    np.testing.assert_allclose(counts.head_mean_mass()[0], [(0.5 + 0.5 + 0.99 + 0.2) / 4, 0.95])


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40])["rho"] == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1])["rho"] == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 1, 1])["rho"] is None  # constant: undefined, not nan
    assert spearman([1, float("nan"), 3, 4, 5], [1, 2, 3, 4, 5])["n"] == 4


def test_measured_scores_match_captured_attention_and_drive_patch_model(tiny_model):
    from hf_sparse_attn import patch_model, unpatch_model
    from hf_sparse_attn.eval.sparsity import capture_qk
    from hf_sparse_attn.patches import capture_attention

    model = tiny_model("llama")
    ids = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(0))
    k, eps = 4, 0.5
    scores = measured_sparsity_scores(model, ids, k=k, eps=eps)
    assert len(scores) == 3 and all(0.0 <= s <= 1.0 + 1e-5 for s in scores)
    with capture_attention(model) as captured:
        with torch.no_grad():
            model(ids)
    for layer in range(3):
        sparse = eligible = 0
        mass_sum = 0.0
        for b in range(2):
            q, kk = capture_qk(captured[layer][0], b)
            m = _brute_topk_mass(q, kk, captured[layer][0].scale, True, (k,))[..., 0][:, k:]  # rows with > k keys
            sparse += int((m >= 1 - eps).sum())
            eligible += m.numel()
            mass_sum += float(m.sum())
        assert scores[layer] == pytest.approx(sparse / eligible + 1e-6 * mass_sum / eligible, abs=1e-6)
    # select="measured": layers in descending measured sparsity
    plan = patch_model(model, method="exact", layers=1, select="measured", calibration=ids)
    try:
        assert plan.patched_layers == [int(np.argmax(scores))]
    finally:
        unpatch_model(model)


def test_calibration_forms(tiny_model):
    model = tiny_model("bert")
    ids = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    a = measured_sparsity_scores(model, {"input_ids": ids, "attention_mask": mask})
    b = measured_sparsity_scores(model, [{"input_ids": ids[:1], "attention_mask": mask[:1]},
                                         {"input_ids": ids[1:, :15], "attention_mask": mask[1:, :15]}])
    assert a == pytest.approx(b, abs=1e-6)  # padding is removed: same rows as unpadded sequences
    with pytest.raises(TypeError, match="calibration inputs"):
        measured_sparsity_scores(model, "some text")


@pytest.mark.slow
def test_sparsity_cli_end_to_end_minilm(tmp_path, minilm, monkeypatch):
    from hf_sparse_attn.commands import sparsity as sparsity_cli
    from hf_sparse_attn.eval.data import wikipedia_sentences

    model, tokenizer = minilm
    text_file = tmp_path / "text.txt"
    text_file.write_text("\n".join(wikipedia_sentences(6, seed=5)) + "\n")
    monkeypatch.setattr(sparsity_cli, "load_model", lambda *a, **kw: (model, tokenizer))
    parser = argparse.ArgumentParser()
    sparsity_cli.configure(parser)
    out = tmp_path / "out"
    args = parser.parse_args(["--model", "minilm", "--text", str(text_file), "--out", str(out), "--k", "1", "4", "--eps", "0.1", "0.5"])
    assert sparsity_cli.run(args) == 0
    result = json.loads((out / "sparsity.json").read_text())
    assert result["sequences"] == 6 and len(result["weight_norm_R"]) == 6
    prob = np.array(result["layer_probability"], dtype=float)
    assert prob.shape == (6, 2, 2) and np.all((prob >= 0) & (prob <= 1))
    assert np.all(prob[:, :, 1] >= prob[:, :, 0])  # a larger eps can only make more rows sparse
    assert np.all(prob[:, 1, :] >= prob[:, 0, :])  # so can a larger k
    assert len(result["spearman"]) == 2 * 3 and all(c["layers"]["n"] == 6 for c in result["spearman"])
    for name in ("sparsity_vs_R.png", "sparsity_heads.png", "summary.txt"):
        assert (out / name).stat().st_size > 0
    assert sparsity_cli.run(args) == 0  # resume: nothing left to do, same numbers
    assert json.loads((out / "sparsity.json").read_text())["layer_probability"] == result["layer_probability"]
