"""Indyk et al. head-to-tail statistics: Lemma 4.1 identity, known ratios, incremental == brute force, end to end."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from hf_sparse_attn.eval.head_tail import (
    HeadTailAccumulator,
    head_tail_ratio_bruteforce,
    head_tail_statistics,
    kernel_points,
    log_kernel_block,
    prefix_grid,
)
from hf_sparse_attn.methods.gaussian_kernel import gaussian_kernel_matrix, softmax_to_gaussian_kernel


def _random_qk(G=3, n=70, D=16, scale_norm=1.5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(G, n, D, generator=g, dtype=dtype) * scale_norm
    k = torch.randn(G, n, D, generator=g, dtype=dtype) * scale_norm
    return q, k


def test_lemma_4_1_identity_and_log_kernel():
    q, k = _random_qk(G=2, n=40, D=8)
    s = 8 ** -0.5
    x, y, log_d = softmax_to_gaussian_kernel(q, k, s)
    exact = torch.exp(s * q @ k.transpose(-1, -2))
    # exp(s q.k) = D_i K_ij, to float64 precision
    rebuilt = torch.exp(log_d[..., None]) * gaussian_kernel_matrix(x, y)
    torch.testing.assert_close(rebuilt, exact, rtol=1e-10, atol=0)
    # our block kernel (used by the statistics) is the same K
    torch.testing.assert_close(torch.exp(log_kernel_block(x, y)), gaussian_kernel_matrix(x, y), rtol=1e-10, atol=1e-300)
    # and kernel_points is that very reduction
    x2, y2 = kernel_points(q, k, s)
    assert torch.equal(x2, x) and torch.equal(y2, y)


def test_known_ratio_clustered_tokens():
    """c clusters of identical, far-apart points, tokens interleaved: K[:i,:i] is a block pattern of ones, so
    ratio_i = (sum_g m_g(i)^2) / i - 1 with m_g(i) the count of cluster g among the first i tokens."""
    c, n, D = 3, 40, 4
    directions = torch.eye(D, dtype=torch.float64)[:c] * 40.0  # equal norms: no extra coordinate, x_i == y_i
    k = directions[torch.arange(n) % c][None]  # [1, n, D]
    q = k.clone()
    x, y = kernel_points(q, k, 1.0)
    prefixes = list(range(5, n + 1))
    for causal in (False, True):
        stats = head_tail_statistics(x, y, causal=causal, prefix_lengths=prefixes)
        for col, i in enumerate(prefixes):
            counts = np.bincount(np.arange(i) % c, minlength=c)
            if causal:  # lower triangle with diagonal of each cluster's m x m block of ones
                expected = float((counts * (counts + 1) / 2).sum()) / i - 1
            else:
                expected = float((counts ** 2).sum()) / i - 1
            assert stats.ratios[0, col].item() == pytest.approx(expected, rel=1e-9, abs=1e-9), (causal, i)
    # identical points everywhere: K = ones, ratio = i - 1 (max n - 1)
    same = torch.ones(1, n, D, dtype=torch.float64)
    x, y = kernel_points(same, same, 1.0)
    stats = head_tail_statistics(x, y, causal=False, prefix_lengths=prefixes)
    assert stats.max_ratio().item() == pytest.approx(n - 1, rel=1e-12)
    assert stats.ratio_n_n1.item() == pytest.approx(1.0) and stats.ratio_n_2n.item() == pytest.approx(1.0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("prefixes,max_block", [("every", 1 << 24), ("sparse", 1 << 24), ("every", 300), ("sparse", 500)])
def test_incremental_equals_bruteforce(causal, prefixes, max_block):
    n = 64
    q, k = _random_qk(G=3, n=n, D=16, scale_norm=1.7, seed=1)
    x, y = kernel_points(q, k, 16 ** -0.5)
    K = gaussian_kernel_matrix(x, y)
    # "sparse": big gaps between prefixes, so large blocks take the thresholded path of the candidate update
    wanted = prefix_grid(n, 10, 1) if prefixes == "every" else [10, 33, 64]
    stats = head_tail_statistics(x, y, causal=causal, prefix_lengths=wanted, max_block_entries=max_block)
    brute = torch.stack([head_tail_ratio_bruteforce(K, i, causal) for i in wanted], dim=1)
    torch.testing.assert_close(stats.ratios, brute, rtol=1e-9, atol=1e-12)
    # experiment (ii) against a full sort of the (causal part of the) matrix
    values = K.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -1.0) if causal else K
    top = values.reshape(3, -1).sort(dim=1, descending=True).values
    torch.testing.assert_close(stats.ratio_n_n1, top[:, n - 1] / top[:, n], rtol=1e-9, atol=0)
    torch.testing.assert_close(stats.ratio_n_2n, top[:, n - 1] / top[:, 2 * n - 1], rtol=1e-9, atol=0)


def test_float32_inputs_close_to_float64():
    q, k = _random_qk(G=2, n=80, D=32, scale_norm=1.2, seed=2)
    wanted = prefix_grid(80, 50, 5)
    x, y = kernel_points(q, k, 32 ** -0.5)
    ref = head_tail_statistics(x, y, causal=True, prefix_lengths=wanted)
    x32, y32 = kernel_points(q.float(), k.float(), 32 ** -0.5)
    got = head_tail_statistics(x32, y32, causal=True, prefix_lengths=wanted)
    torch.testing.assert_close(got.ratios, ref.ratios, rtol=2e-4, atol=1e-6)


def test_ratio_does_not_depend_on_the_max_key_norm_used():
    """The prefix ratio is the same whether K is built from the whole sequence or from the prefix alone."""
    q, k = _random_qk(G=2, n=60, D=8, seed=3)
    k[:, 45] *= 3.0  # the max key norm lies beyond the prefix
    x, y = kernel_points(q, k, 0.3)
    whole = head_tail_statistics(x, y, causal=False, prefix_lengths=[40])
    xp, yp = kernel_points(q[:, :40], k[:, :40], 0.3)
    alone = head_tail_statistics(xp, yp, causal=False, prefix_lengths=[40])
    torch.testing.assert_close(whole.ratios, alone.ratios, rtol=1e-9, atol=0)


def test_float32_underflow_is_flagged_and_ratio_stays_finite():
    """Far-apart tokens: off-diagonal K ~ exp(-200): 0 in float32 (the paper's blank cells), finite in log domain."""
    n = 12
    k = torch.eye(n, dtype=torch.float64)[None] * 20.0  # ||x_i - y_j||^2 = (s/2) * 2 * 400 = 200 for s = 0.5
    x, y = kernel_points(k.clone(), k, 0.5)
    stats = head_tail_statistics(x, y, causal=False, prefix_lengths=[])
    assert bool(stats.float32_zero_n1[0]) and bool(stats.float32_zero_2n[0])
    assert math.isfinite(stats.ratio_n_n1.item())
    assert stats.ratio_n_n1.item() == pytest.approx(math.exp(200.0), rel=1e-6)
    assert stats.ratios.shape == (1, 0) and stats.max_ratio() is None  # n < any prefix: experiment (i) is empty


def test_memory_bound_splits_rows():
    """With a tiny block budget the result is unchanged (boundaries are split, nothing n x n is formed at once)."""
    q, k = _random_qk(G=2, n=100, D=8, seed=4)
    x, y = kernel_points(q, k, 0.35)
    a = head_tail_statistics(x, y, causal=True, prefix_lengths=[50, 100])
    b = head_tail_statistics(x, y, causal=True, prefix_lengths=[50, 100], max_block_entries=400)
    torch.testing.assert_close(a.ratios, b.ratios, rtol=1e-10, atol=0)
    torch.testing.assert_close(a.ratio_n_2n, b.ratio_n_2n, rtol=1e-10, atol=0)


def test_accumulator_max_median_and_infinities():
    L, H = 2, 3
    acc = HeadTailAccumulator(L, H)
    base = {"float32_zero_n1": [[False] * H] * L, "float32_zero_2n": [[False] * H] * L}
    acc.add({"n": 60, "max_ratio": [[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]], "ratio_n_n1": [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]],
             "ratio_n_2n": [[10.0, None, 1.0], [1.0, 1.0, 1.0]], "scaling": {"50": 3.0}, **base})
    acc.add({"n": 70, "max_ratio": [[4.0, 1.0, 1.0], [0.1, 0.7, 0.2]], "ratio_n_n1": [[3.0, 1.0, 1.0], [2.0, 2.0, 2.0]],
             "ratio_n_2n": [[20.0, None, 1.0], [1.0, 1.0, 1.0]], "scaling": {"50": 4.0}, **base})
    acc.add({"n": 30, "max_ratio": None, "ratio_n_n1": [[2.0, 1.0, 1.0], [2.0, 2.0, 2.0]],
             "ratio_n_2n": [[30.0, 5.0, 1.0], [1.0, 1.0, 1.0]], "scaling": {}, **base})
    result = acc.result()
    assert result["sequences"] == 3 and result["sequences_experiment_i"] == 2
    assert result["max_ratio"] == [[4.0, 2.0, 3.0], [0.5, 0.7, 0.5]]
    assert result["max_ratio_overall"] == 4.0 and result["max_ratio_at"] == {"layer": 0, "head": 0}
    assert result["median_n_n1"][0] == [2.0, 1.0, 1.0]
    assert result["median_n_2n"][0][0] == 20.0 and result["median_n_2n"][0][1] is None  # median of (inf, inf, 5) = inf
    assert result["inf_count_n_2n"][0] == [0, 2, 0]
    assert result["scaling"] == {"context_length": [50], "mean": [3.5], "std": [0.5], "sequences": [2]}
    json.dumps(result, allow_nan=False)  # strict JSON


def test_prefix_grid():
    assert prefix_grid(40, 50, 1) == []
    assert prefix_grid(53, 50, 1) == [50, 51, 52, 53]
    assert prefix_grid(230, 50, 50, extra=[75, 300]) == [50, 75, 100, 150, 200, 230]
    with pytest.raises(ValueError):
        prefix_grid(10, 0, 1)


@pytest.mark.slow
def test_end_to_end_minilm(tmp_path, minilm, monkeypatch):
    """Real MiniLM, a handful of sentences (two long enough for experiment (i)): JSON, plots, resume, and one head
    checked against a brute-force computation on the captured q/k."""
    from hf_sparse_attn.commands import head_tail as head_tail_cli
    from hf_sparse_attn.eval.data import wikipedia_sentences
    from hf_sparse_attn.eval.sparsity import model_forward
    from hf_sparse_attn.patches import capture_attention

    model, tokenizer = minilm
    sentences = wikipedia_sentences()
    long_ones = [s for s in sentences if 60 <= len(tokenizer(s)["input_ids"]) <= 90][:2]
    texts = long_ones + wikipedia_sentences(4, seed=3)
    text_file = tmp_path / "text.txt"
    text_file.write_text("\n".join(texts) + "\n")
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    head_tail_cli.configure(parser)
    args = parser.parse_args(["--model", "minilm", "--text", str(text_file), "--out", str(out), "--prefix-step", "5"])
    monkeypatch.setattr(head_tail_cli, "load_model", lambda *a, **kw: (model, tokenizer))  # reuse the session's model
    assert head_tail_cli.run(args) == 0
    result = json.loads((out / "head_tail.json").read_text())
    assert result["sequences"] == 6 and result["sequences_experiment_i"] >= 2
    assert np.array(result["max_ratio"], dtype=float).shape == (6, 12)
    assert np.array(result["median_n_2n"], dtype=float).shape == (6, 12)
    for name in ("max_ratio.png", "median_n_n1.png", "median_n_2n.png", "scaling.png", "summary.txt"):
        assert (out / name).stat().st_size > 0
    # resume: nothing is recomputed, same result
    lines = (out / "state" / "sequences.jsonl").read_text().splitlines()
    assert head_tail_cli.run(args) == 0
    assert (out / "state" / "sequences.jsonl").read_text().splitlines() == lines
    assert json.loads((out / "head_tail.json").read_text())["max_ratio"] == result["max_ratio"]

    # brute force for layer 2 on the first long sentence
    ids = tokenizer(long_ones[0], return_tensors="pt")["input_ids"]
    with capture_attention(model, layers=[2]) as captured:
        model_forward(model, ids)
    cap = captured[2][0]
    x, y = kernel_points(cap.query[0].double(), cap.key[0].double(), cap.scale)
    K = gaussian_kernel_matrix(x, y)
    n = ids.shape[1]
    grid = prefix_grid(n, 50, 5, range(50, 513, 50))
    brute = torch.stack([head_tail_ratio_bruteforce(K, i) for i in grid], 1).amax(1)
    record = json.loads(lines[0])
    torch.testing.assert_close(torch.tensor(record["max_ratio"][2], dtype=torch.float64), brute, rtol=1e-3, atol=1e-5)
